"""Lumina 2 and Z-Image (Turbo and base): one list of joint blocks (``layers``) after two refiners.

Read from the hosts' source: ersatzForge ``backend/nn/lumina2.py`` (``Lumina2DiT``, ``JointTransformerBlock``,
``JointAttention``) and Forge Neo ``backend/nn/lumina.py`` (``NextDiT``, same block and attention classes).

- The latent is padded (circular) to whole 2x2 patches and cut row-major: the grid is ceil(H/2) x ceil(W/2).
- ``patchify_and_embed`` runs ``context_refiner`` on the caption tokens alone and ``noise_refiner`` on the
  image tokens alone, then every ``layers`` block gets one joint sequence ``cat(caption, image)``: caption
  first, the image tokens right after it, then Z-Image's pad tokens (``x_pad_token``, up to a multiple of
  ``pad_tokens_multiple``, 32). Z-Image pads the caption to that multiple too (ersatzForge with zero features
  before ``cap_embedder``, Neo with ``cap_pad_token`` after it), so the image tokens start at the caption
  length rounded up. The whole batch shares one caption length (Forge's cond batching repeats shorter
  captions to a common length), and the main layers get no mask (ersatzForge passes ``None``; Neo builds
  ``mask = None``; only Neo's context refiner takes the caption mask).
- ``JointAttention.forward`` applies ``q_norm``, then RoPE (``apply_rotary_emb``), repeats the k/v heads
  (Lumina 2 has 8 k/v heads for 24 query heads), and calls the module-level ``attention_function(q, k, v,
  heads, mask, skip_reshape=True)`` on ``[B, heads, L, D]``: that name gets the final queries.
- Per row: the block inputs ``x``, ``freqs_cis`` (ids made per row), ``adaln_input``, ersatzForge's Z-Image
  control hints (a tuple of ``[B, L, D]`` tensors); one value for the whole batch: ersatzForge's ``negpip``
  (the first row's token weights, ``negpip[0]``, whatever its length) and control strength, Neo's
  ``transformer_options``. Neo's ``unpatchify`` takes per-row lists made for the host's rows.

Only the main ``layers`` are selectable. The context refiner has no image tokens; the noise refiner's are
the image before it has seen the caption (an input adapter, two blocks, like the patch embedding SEG never
touches), and the joint attention of the main stack is where the image tokens' self-attention and the
caption meet, as in the DiT blocks SEG smooths on Flux and SD3.5.

Default blocks: no published layer ablation for guidance on Lumina 2 or Z-Image was found (searched: Skip
Layer Guidance, PAG, STG, SEG for Lumina-Image 2.0 / Next-DiT / Z-Image; the only public Z-Image setting seen,
``fblissjr/llm-dit-experiments`` ``src/llm_dit/guidance/skip_layer.py``, suggests "middle layers" untested
and miscounts the layers). So the default is three blocks in the middle of the stack: 12-14 of Lumina 2's 26
layers, 14-16 of Z-Image's 30, as the SEG paper smooths the middle of the UNet; three blocks, like the
three of Skip Layer Guidance that the Flux and SD3.5 defaults take.
"""

from __future__ import annotations

from torch import nn

from seg_lib.families.dit import DitFamily

_STACKS = (("layer", "layers"),)


def _is_next_dit(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("cap_embedder", "context_refiner", "noise_refiner", "x_embedder"))


def _is_z_image(model: nn.Module) -> bool:
    """Z-Image's blocks take the 256-wide timestep embedding straight into their modulation's Linear
    (``z_modulation`` / ``z_image_modulation``); Lumina 2's put a SiLU first (Forge's operations replace
    ``nn.Linear`` by their own class, never ``nn.SiLU``). The hosts tell the two apart by width (2304 is
    Lumina 2), which a reduced model does not keep."""
    layers = getattr(model, "layers", None)
    modulation = getattr(layers[0], "adaLN_modulation", None) if layers else None
    if not isinstance(modulation, nn.Sequential) or not len(modulation):
        return False
    return not isinstance(modulation[0], nn.SiLU)


def _text_multiple(model: nn.Module) -> int | None:
    multiple = getattr(model, "pad_tokens_multiple", None)
    return multiple if isinstance(multiple, int) and multiple > 1 else None


_COMMON = {
    "stacks": _STACKS,
    "after": ("final_layer",),
    "text_first": True,
    "ceil_grid": True,
    "text_multiple": _text_multiple,
    "shared_args": ("negpip", "strength", "transformer_options"),
    "row_methods": ("unpatchify",),
}
_SOURCE = "no published layer ablation for Lumina 2 / Z-Image: three blocks in the middle of the stack"

LUMINA2 = DitFamily(
    name="Lumina 2",
    default_layers="layer12-14",
    default_source=_SOURCE,
    real_cfg=True,
    is_model=lambda model: _is_next_dit(model) and not _is_z_image(model),
    **_COMMON,
)
ZIMAGE = DitFamily(
    name="Z-Image",
    default_layers="layer14-16",
    default_source=_SOURCE,
    real_cfg=False,  # Turbo (the common one) runs at CFG 1; base is trained for CFG and guides the same way
    is_model=lambda model: _is_next_dit(model) and _is_z_image(model),
    **_COMMON,
)
