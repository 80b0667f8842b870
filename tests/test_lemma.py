"""Lemma 3.1 of the SEG paper and the query-blur identity, as property tests on the real blur.

Lemma 3.1: a normalised Gaussian blur of the attention logits keeps their mean and does not raise their
variance, more so as sigma grows; infinite blur makes the logits uniform over the queries. The lemma is
about the blur itself, away from any border: with the official reflect padding the pixels next to the
border are weighted unevenly, so the exact statements are checked on maps whose variation lies at least
one kernel radius (plus the mirrored edge pixel) inside the grid, where reflect padding only ever sees the
constant background. Infinite blur is checked on arbitrary maps.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seg_lib.core.blur import gaussian_blur_2d, kernel_size, smooth_queries

SIGMAS = (0.3, 0.7, 1.0, 1.5, 2.0, 3.0, 4.5)
KEYS = 5


def _interior_queries(inner_h: int, inner_w: int, channels: int, seed: int) -> tuple[torch.Tensor, int, int]:
    gen = torch.Generator().manual_seed(seed)
    margin = kernel_size(max(SIGMAS), 10_000) // 2 + 1
    height, width = inner_h + 2 * margin, inner_w + 2 * margin
    background = torch.randn(1, 1, 1, channels, generator=gen, dtype=torch.float64)
    grid = background.expand(1, height, width, channels).clone()
    bump = torch.randn(1, inner_h, inner_w, channels, generator=gen, dtype=torch.float64)
    grid[:, margin : margin + inner_h, margin : margin + inner_w] += 3 * bump
    return grid.reshape(1, height * width, channels), height, width


def _logits(q: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.randn(1, KEYS, q.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=q.dtype)
    return q @ keys.transpose(1, 2), keys


@given(
    inner_h=st.integers(1, 6),
    inner_w=st.integers(1, 6),
    channels=st.integers(1, 6),
    seed=st.integers(0, 9999),
)
@settings(max_examples=80, deadline=None)
def test_blur_keeps_mean_and_never_raises_variance_as_sigma_grows(inner_h, inner_w, channels, seed):
    q, height, width = _interior_queries(inner_h, inner_w, channels, seed)
    logits, keys = _logits(q, seed + 1)
    previous_var = logits.var(dim=1)
    for sigma in SIGMAS:
        blurred = smooth_queries(q, height, width, sigma) @ keys.transpose(1, 2)
        # The taps are the official float32 ones, normalised in float32: the mean holds to that precision.
        torch.testing.assert_close(blurred.mean(dim=1), logits.mean(dim=1), rtol=1e-6, atol=1e-6)
        variance = blurred.var(dim=1)
        assert (variance <= previous_var * (1 + 1e-9) + 1e-12).all(), sigma
        previous_var = variance


@given(
    height=st.integers(1, 20),
    width=st.integers(1, 20),
    channels=st.integers(1, 6),
    seed=st.integers(0, 9999),
    sigma=st.sampled_from([1e4, 1e9, math.inf]),
)
@settings(max_examples=60, deadline=None)
def test_infinite_blur_makes_every_query_row_identical(height, width, channels, seed, sigma):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, height * width, channels, generator=gen, dtype=torch.float64)
    logits, keys = _logits(q, seed + 1)
    smoothed = smooth_queries(q, height, width, sigma)
    assert torch.equal(smoothed, smoothed[:, :1].expand_as(smoothed))
    blurred = smoothed @ keys.transpose(1, 2)
    torch.testing.assert_close(blurred, blurred[:, :1].expand_as(blurred), rtol=0, atol=1e-12)
    torch.testing.assert_close(blurred.mean(dim=1), logits.mean(dim=1), rtol=1e-9, atol=1e-9)


@given(
    height=st.integers(1, 16),
    width=st.integers(1, 16),
    sigma=st.one_of(st.floats(0.05, 40.0), st.just(math.inf)),
    seed=st.integers(0, 9999),
)
@settings(max_examples=80, deadline=None)
def test_blurring_queries_equals_blurring_logits_along_the_query_axis(height, width, sigma, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, height * width, 8, generator=gen, dtype=torch.float64)
    keys = torch.randn(2, KEYS, 8, generator=gen, dtype=torch.float64)
    via_queries = smooth_queries(q, height, width, sigma) @ keys.transpose(1, 2)
    logits = q @ keys.transpose(1, 2)  # [B, N, K]: one query map per key
    as_maps = logits.transpose(1, 2).reshape(2, KEYS, height, width)
    via_logits = gaussian_blur_2d(as_maps, sigma).reshape(2, KEYS, -1).transpose(1, 2)
    torch.testing.assert_close(via_queries, via_logits, rtol=1e-9, atol=1e-9)
