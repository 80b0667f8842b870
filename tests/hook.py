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
