"""The query blur against the official definition, on every grid shape, dtype and sigma regime."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seg_lib.core.blur import (
    gaussian_blur_2d,
    kernel_size,
    smooth_queries,
    smooth_query_rows_,
    validate_sigma,
)
from tests.reference_blur import (
    map_to_tokens,
    official_blur,
    official_kernel_size,
    per_dimension_blur,
    tokens_to_map,
)

FINITE_SIGMAS = [0.01, 0.3, 1.0, 2.5, 10.0, 100.0, 9999.0]
INFINITE_SIGMAS = [9999.5, 1e6, math.inf]


def _queries(batch: int, height: int, width: int, channels: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, height * width, channels, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(("sigma", "expected"), [(1.0, 7), (10.0, 61), (0.5, 3), (0.01, 1), (2.0, 13)])
def test_kernel_size_matches_official_formula_on_a_wide_grid(sigma, expected):
    assert kernel_size(sigma, 10_000) == expected == official_kernel_size(sigma)


@pytest.mark.parametrize(("side", "expected"), [(8, 9), (7, 7), (2, 3), (1, 1), (64, 61)])
def test_kernel_size_clamp_keeps_padding_inside_the_side(side, expected):
    size = kernel_size(10.0, side)
    assert size == expected
    assert size % 2 == 1
    assert size // 2 < side or side == 1


@pytest.mark.parametrize("size", [8, 16, 32, 33, 64])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 10.0, 100.0])
def test_equals_official_blur_on_square_grids(size, sigma):
    x = _queries(2, size, size, 6)
    ours = smooth_queries(x, size, size, sigma)
    reference = map_to_tokens(official_blur(tokens_to_map(x, size, size), sigma))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 1), (1, 9), (9, 1), (2, 17), (17, 2), (3, 5), (5, 80), (88, 120), (96, 40), (1, 2), (2, 1)],
)
@pytest.mark.parametrize("sigma", FINITE_SIGMAS)
def test_equals_per_dimension_reference_on_any_grid(height, width, sigma):
    x = _queries(1, height, width, 3, seed=height * 131 + width)
    ours = smooth_queries(x, height, width, sigma)
    reference = map_to_tokens(per_dimension_blur(tokens_to_map(x, height, width), sigma))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(ours).all()


def test_official_width_only_clamp_fails_where_ours_works():
    # SDXL 1536x640 middle block: a 48x20 grid. Sigma 10 gives k = 61; the width clamp leaves 21, and
    # reflect padding of 10 rows works, but on a 6x80 grid the official clamp pads 40 rows of 6.
    x = _queries(1, 6, 80, 2)
    with pytest.raises(RuntimeError):
        official_blur(tokens_to_map(x, 6, 80), 10.0)
    out = smooth_queries(x, 6, 80, 10.0)
    assert torch.isfinite(out).all()


def test_gaussian_blur_2d_matches_token_form():
    x = _queries(2, 12, 20, 5)
    as_map = tokens_to_map(x, 12, 20)
    torch.testing.assert_close(map_to_tokens(gaussian_blur_2d(as_map, 2.0)), smooth_queries(x, 12, 20, 2.0))
    torch.testing.assert_close(map_to_tokens(gaussian_blur_2d(as_map, math.inf)), smooth_queries(x, 12, 20, math.inf))


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 512), (512, 1), (2, 300), (512, 512)])
@pytest.mark.parametrize("sigma", [0.01, 1.0, 10.0, 9999.0, math.inf])
def test_any_grid_any_sigma_no_error_no_nan(height, width, sigma):
    x = torch.randn(1, height * width, 2)
    out = smooth_queries(x, height, width, sigma)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sigma", INFINITE_SIGMAS)
def test_above_threshold_is_exact_mean(sigma):
    x = _queries(3, 7, 11, 4)
    out = smooth_queries(x, 7, 11, sigma)
    expected = x.mean(dim=1, keepdim=True).expand_as(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_finite_sigma_is_not_the_mean_and_sigmas_differ():
    # The regression diffusers shipped: finite sigmas collapsed to the mean.
    x = _queries(1, 32, 32, 8)
    mean = smooth_queries(x, 32, 32, math.inf)
    blurred = {sigma: smooth_queries(x, 32, 32, sigma) for sigma in (1.0, 2.0, 9999.0)}
    for sigma, out in blurred.items():
        assert (out - mean).abs().max() > 1e-3, sigma
        assert (out - x).abs().max() > 1e-3, sigma
    assert (blurred[1.0] - blurred[2.0]).abs().max() > 1e-3


def test_returns_new_tensor_and_leaves_input_alone():
    x = _queries(2, 8, 8, 4)
    before = x.clone()
    for sigma in (1.0, math.inf):
        out = smooth_queries(x, 8, 8, sigma)
        assert out.data_ptr() != x.data_ptr()
        assert out.is_contiguous()
        assert out.shape == x.shape
        assert out.dtype == x.dtype
        assert out.device == x.device
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sigma", [1.0, 10.0, math.inf])
def test_half_precision_keeps_dtype_and_matches_float32(dtype, sigma):
    x32 = torch.randn(2, 24 * 16, 64, generator=torch.Generator().manual_seed(3))
    out = smooth_queries(x32.to(dtype), 24, 16, sigma)
    assert out.dtype == dtype
    reference = smooth_queries(x32, 24, 16, sigma)
    eps = torch.finfo(dtype).eps
    # A few roundings of values of order 1, plus the input's own rounding.
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=8 * eps)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, -math.inf, math.nan, "1", None, True, [1.0]])
def test_bad_sigma_names_blur_sigma(bad):
    x = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="blur sigma"):
        smooth_queries(x, 2, 2, bad)
    with pytest.raises(ValueError, match="blur sigma"):
        gaussian_blur_2d(torch.zeros(1, 2, 2, 2), bad)
    with pytest.raises(ValueError, match="blur sigma"):
        validate_sigma(bad)


def test_grid_must_hold_the_tokens():
    with pytest.raises(ValueError, match="does not hold"):
        smooth_queries(torch.zeros(1, 10, 2), 3, 3, 1.0)


@pytest.mark.parametrize("sigma", [1.0, math.inf])
@pytest.mark.parametrize("rows", [slice(4, 6), slice(2, None), [0, 5], torch.tensor([1, 3])])
def test_chosen_rows_only(sigma, rows):
    q = _queries(6, 8, 8, 4)
    original = q.clone()
    storage = q.data_ptr()
    smooth_query_rows_(q, 8, 8, sigma, rows)
    chosen = torch.zeros(6, dtype=torch.bool)
    chosen[rows] = True
    assert q.data_ptr() == storage
    assert torch.equal(q[~chosen], original[~chosen])
    torch.testing.assert_close(q[chosen], smooth_queries(original[chosen], 8, 8, sigma), rtol=0, atol=1e-12)


def test_chosen_rows_do_not_copy_the_other_rows():
    # Record every tensor the call creates: none may be as large as the whole batch.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for item in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(item, torch.Tensor) and item.untyped_storage().data_ptr() != storage:
                    self.largest = max(self.largest, item.numel())
            return out

    q = torch.randn(8, 16 * 16, 32)
    storage = q.untyped_storage().data_ptr()
    for sigma in (2.0, math.inf):
        with Sizes() as mode:
            smooth_query_rows_(q, 16, 16, sigma, slice(6, 8))
        assert 0 < mode.largest <= q[6:8].numel()


@given(
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    sigma=st.floats(0.01, 50.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_blur_is_a_weighted_average(height, width, sigma, seed):
    # Every output is a normalised average of inputs: a constant map stays constant and values stay in
    # range, up to the rounding of the official float32 taps (their sum is 1 to float32 precision).
    x = _queries(1, height, width, 3, seed)
    out = smooth_queries(x, height, width, sigma)
    slack = 1e-6 * x.abs().max()
    assert (out.amax(dim=1) <= x.amax(dim=1) + slack).all()
    assert (out.amin(dim=1) >= x.amin(dim=1) - slack).all()
    constant = torch.full_like(x, 2.5)
    torch.testing.assert_close(smooth_queries(constant, height, width, sigma), constant, rtol=1e-6, atol=0)


def test_operator_cache_stays_bounded_over_a_long_session():
    # Every new (grid side, sigma) pair adds an operator; a long session of sizes and sigmas must not pile them up.
    from seg_lib.core import blur

    for side in range(2, 42):
        for sigma in (1.5, 3.0):
            blur.gaussian_blur_2d(torch.zeros(1, 1, side, 3), sigma)
    assert blur._axis_operator.cache_info().currsize <= 64
    assert blur._axis_operator_f64.cache_info().currsize <= 64
