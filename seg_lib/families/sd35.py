"""SD3.5 (Medium, Large; MMDiT and MMDiT-X): one list of joint blocks. Each joint attention's query is
``cat(context, image)``, context first (77 CLIP + 256 T5 tokens, registers before them where the model has
them), so the image tokens are the last ones; Medium's extra image-only attention (``attn2``) in its first
blocks has image tokens only. The q norm (``ln_q``) is applied before the kernel and there is no RoPE (a
sin-cos position embedding is added once), so the kernel gets the final queries. The image is cut in 2x2
patches by a strided convolution: the grid is floor(H/2) x floor(W/2)."""

from __future__ import annotations

from seg_lib.families.dit import DitFamily

SD35 = DitFamily(
    name="SD3.5",
    stacks=(("joint", "joint_blocks"),),
    after=("final_layer",),
    # Skip Layer Guidance's layers for SD3.5 (ComfyUI's SkipLayerGuidanceSD3 node: layers 7, 8, 9).
    default_layers="joint7-9",
    default_source="Skip Layer Guidance for SD3.5 (ComfyUI SkipLayerGuidanceSD3: layers 7, 8, 9)",
    text_first=False,
    ceil_grid=False,
    real_cfg=True,
    is_model=lambda model: hasattr(model, "x_embedder") and hasattr(model, "context_embedder"),
)
