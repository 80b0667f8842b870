"""Read the attention layout of a loaded UNet (ldm, sgm or Forge's backend: they share the naming).

The layout tells the block selector which blocks have self-attention, how many transformers each holds,
and how many downsamples lie above it (so its token grid is known exactly for any latent size).
"""

from __future__ import annotations

from torch import nn

from seg_lib.core.blocks import AttentionBlock, LayerRef, UNetLayout


def _has(module: nn.Module, class_name: str) -> bool:
    return any(type(sub).__name__ == class_name for sub in module.modules())


def _find_transformer(block: nn.Module) -> nn.Module | None:
    """The block's SpatialTransformer, also when another extension wrapped the block in a module of its own
    (a Deep Shrink extension puts a resizing module in the block's place)."""
    return next((sub for sub in block.modules() if type(sub).__name__ == "SpatialTransformer"), None)


def _transformers(block: nn.Module) -> int:
    """attn1 layers in a block: the transformer_blocks of its SpatialTransformer (0 when it has none)."""
    found = _find_transformer(block)
    return 0 if found is None else len(found.transformer_blocks)


def is_stock_unet(unet: object) -> bool:
    """Whether ``unet`` has the input/middle/output block structure SEG addresses."""
    return all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks"))


def read_layout(unet: nn.Module) -> UNetLayout:
    """Blocks with self-attention, in input/middle/output order, each with the depth of its grid."""
    blocks: list[AttentionBlock] = []
    depth = 0
    for index, block in enumerate(unet.input_blocks):
        if count := _transformers(block):
            blocks.append(AttentionBlock("input", index, count, depth))
        if _has(block, "Downsample"):
            depth += 1
    if count := _transformers(unet.middle_block):
        blocks.append(AttentionBlock("middle", 0, count, depth))
    for index, block in enumerate(unet.output_blocks):
        if count := _transformers(block):
            blocks.append(AttentionBlock("output", index, count, depth))
        if _has(block, "Upsample"):
            depth -= 1
    return tuple(blocks)


def spatial_transformer(unet: nn.Module, ref: LayerRef) -> nn.Module:
    """The SpatialTransformer that holds the layer ``ref`` names: its input is the hidden state whose
    spatial shape is the layer's token grid."""
    if ref.part == "middle":
        block = unet.middle_block
    else:
        block = (unet.input_blocks if ref.part == "input" else unet.output_blocks)[ref.index]
    found = _find_transformer(block)
    if found is None:
        raise LookupError(f"{ref.part} block {ref.index} has no SpatialTransformer")
    return found


def attn1_module(unet: nn.Module, ref: LayerRef) -> nn.Module:
    """The self-attention module a LayerRef names."""
    return spatial_transformer(unet, ref).transformer_blocks[ref.transformer].attn1
