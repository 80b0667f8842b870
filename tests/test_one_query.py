"""Sigma = inf: the smoothed rows' self-attention is computed for one query per row and broadcast (exact)."""

from __future__ import annotations

import math

import pytest
import torch

from seg_lib.core.params import SegParams
from seg_lib.host.one_query import one_query_attention
from tests.standins_forge import forge_attention
from tests.test_a1111_adapter import Rig
from tests.test_forge_adapter import ForgeRig

pytestmark = pytest.mark.usefixtures("float64")


def test_one_query_attention_equals_full_attention_on_mean_queries():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 12, 8, generator=gen) for _ in range(3))
    rows = slice(3, None)
    mean = q[rows].mean(1, keepdim=True)
    full_q = torch.cat([q[:3], mean.expand(-1, 12, -1)])
    out = one_query_attention(forge_attention, q, k, v, 2, rows, mean)
    torch.testing.assert_close(out, forge_attention(full_q, k, v, 2), rtol=1e-12, atol=1e-12)


def _query_lengths(unet) -> list[int]:
    """Record the token count reaching each self-attention's output projection."""
    lengths: list[int] = []
    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module.attn1.to_out[0].register_forward_pre_hook(lambda _m, a: lengths.append(a[0].shape[1]))
    return lengths


@pytest.mark.parametrize("fast", [True, False])
def test_a1111_attends_with_one_query_at_infinite_sigma(fast):
    rig = Rig(SegParams(enabled=True, layers="d0"), fast=fast)
    lengths = _query_lengths(rig.unet)
    rig.step()
    # d0 (77 tokens, 2 transformers): the host's rows attend with 77 queries, the smoothed rows with 1
    assert lengths.count(1) == 2
    assert rig.run.failed is False


def test_a1111_finite_sigma_attends_in_full():
    rig = Rig(SegParams(enabled=True, layers="d0", blur_sigma=2.0))
    lengths = _query_lengths(rig.unet)
    rig.step()
    assert 1 not in lengths


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_forge_attends_with_one_query_at_infinite_sigma(fast, sigma):
    rig = ForgeRig(SegParams(enabled=True, layers="d0", blur_sigma=sigma), fast=fast)
    calls: list[tuple[int, int]] = []

    def attention(q, k, v, heads):
        calls.append((q.shape[0], q.shape[1]))
        return forge_attention(q, k, v, heads)

    rig.run.host.attention = attention
    rig.run.patch(rig.p)
    rig.step()
    if math.isinf(sigma):  # the host's rows in full, the smoothed rows with one query each
        assert calls == ([(1, 1), (2, 77)] * 2 if fast else [(1, 1)] * 2)
    else:
        assert calls == ([(3, 77)] * 2 if fast else [(1, 77)] * 2)
