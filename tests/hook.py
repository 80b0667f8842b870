"""Stand-in of what sd-webui-controlnet (``scripts/hook.py``) leaves on the UNet, named like it so SEG
recognises it as it recognises the real one: ``hacked_basic_transformer_inner_forward`` bound as the
transformer blocks' ``_forward``, closing over the hook object ``outer`` whose ``attention_auto_machine`` is
Read (idle: the stock block, row by row), Write (it records the batch's hidden states) or StyleAlign."""

from __future__ import annotations

import enum
from types import MethodType, SimpleNamespace

import torch
from torch import nn


class AutoMachine(enum.Enum):
    Read = "Read"
    Write = "Write"
    StyleAlign = "StyleAlign"


def install(block: nn.Module, state: AutoMachine) -> SimpleNamespace:
    """Replace ``block.forward`` (our stand-in's transformer block runs ``forward``) the way ControlNet
    replaces ``_forward``; return the hook object so a test can change its state."""
    outer = SimpleNamespace(attention_auto_machine=state, gn_auto_machine=AutoMachine.Read, bank=[])

    def hacked_basic_transformer_inner_forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor):
        x_norm1 = self.norm1(x)
        if outer.attention_auto_machine == AutoMachine.Write:
            outer.bank.append(x_norm1.detach().clone())
        if outer.attention_auto_machine == AutoMachine.StyleAlign:  # attention shared across the batch
            b, n, c = x_norm1.shape
            attn = self.attn1(x_norm1.reshape(1, b * n, c)).reshape(b, n, c)
        else:
            attn = self.attn1(x_norm1)
        x = attn + x
        return self.attn2(self.norm2(x), context=context) + x

    block.forward = MethodType(hacked_basic_transformer_inner_forward, block)
    return outer


def hook_unet(unet: nn.Module) -> None:
    """ControlNet's active UNet forward (``forward_webui`` bound to the UNet), here only calling the stock one."""
    stock = type(unet).forward

    def forward_webui(self: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
        return stock(self, *args, **kwargs)

    unet.forward = MethodType(forward_webui, unet)


def hook_unet_with_control(
    unet: nn.Module, *, t2i_after: tuple[int, ...] = (), post_process: bool = False, seed: int = 0
) -> None:
    """ControlNet's active forward with a unit, written from its ``forward``: the control is computed for the
    call's rows (here a per-row function of ``x``, as a control model's is), then its own loop runs the
    UNet's blocks and adds the residuals: T2I-adapter ones after the input blocks ``t2i_after``, ControlNet
    ones onto the middle block's output and onto each skip. ``post_process`` blends the output with ``x``
    after the last block, as its colorfix and inpaint-only units do."""
    from tests.standins import th, timestep_embedding

    def residual(x: torch.Tensor, like: torch.Tensor, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1000 + index)
        channels = torch.randn(like.shape[1], generator=gen, dtype=like.dtype)
        spatial = torch.nn.functional.interpolate(x.mean(1, keepdim=True), size=like.shape[-2:], mode="nearest")
        return torch.tanh(spatial) * channels[None, :, None, None]

    def forward_webui(self: nn.Module, x, timesteps=None, context=None, y=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for i, module in enumerate(self.input_blocks):
            h = module(h, emb, context)
            if i in t2i_after:
                h = h + residual(x, h, 100 + i)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        h = h + residual(x, h, 50)
        for j, module in enumerate(self.output_blocks):
            skip = hs.pop()
            h = th.cat([h, skip + residual(x, skip, j)], dim=1)
            h = module(h, emb, context)
        out = self.out(h.type(x.dtype))
        return 0.5 * out + 0.5 * x[:, : out.shape[1]] if post_process else out

    unet.forward = MethodType(forward_webui, unet)
