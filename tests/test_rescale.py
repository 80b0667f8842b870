"""SEG rescale: each mode against a direct computation of its definition, and rescale 0 = the plain formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seg_lib.core.guidance import cond_weights, needs_uncond, seg_guidance, snf_fuse
from seg_lib.core.params import SegParams


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sample_std(x: torch.Tensor) -> float:
    """The std of all elements, written out (n - 1 in the denominator, as torch.std by default)."""
    values = x.flatten().tolist()
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _direct_std_rescale(cfg, cond_pred, term, rescale, mode):
    """Definition: per image, factor = std(cond) / std(base + term) with base = cfg result (full) or cond
    (partial), blended as rescale * factor + (1 - rescale); result = cfg + term * factor."""
    out = torch.empty_like(cfg)
    for i in range(cfg.shape[0]):
        base = cfg[i] if mode == "full" else cond_pred[i]
        factor = _sample_std(cond_pred[i]) / _sample_std(base + term[i])
        out[i] = cfg[i] + term[i] * (rescale * factor + 1 - rescale)
    return out


def _direct_snf(cfg_term, seg_term):
    """Definition: blur |term| with the 3x3 Gaussian (sigma 1) as one 2D kernel with reflect padding, softmax
    over each image channel's elements, and take per element the term with the larger softmax (CFG on ties)."""
    taps = torch.exp(-0.5 * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    kernel = torch.outer(taps, taps) / taps.sum() ** 2

    def saliency(term):
        b, c, h, w = term.shape
        padded = F.pad(term.abs().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
        blurred = F.conv2d(padded, kernel.to(term.dtype).view(1, 1, 3, 3)).reshape(b, c, h * w)
        e = torch.exp(blurred - blurred.max(dim=-1, keepdim=True).values)
        return (e / e.sum(dim=-1, keepdim=True)).reshape(b, c, h, w)

    choice = torch.stack([saliency(cfg_term), saliency(seg_term)]).argmax(dim=0)
    return torch.where(choice == 1, seg_term, cfg_term)


def _case(seed: int = 0, images: int = 3, cfg_scale: float = 7.0):
    uncond, cond, cond_seg = (_rand(images, 4, 9, 7, seed=seed + s) for s in range(3))
    return uncond, cond, cond_seg, uncond + cfg_scale * (cond - uncond)


# -- rescale 0 is today's output, bit for bit ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["full", "partial", "snf"])
def test_rescale_zero_is_the_plain_formula_bit_for_bit(mode, dtype):
    uncond, cond, cond_seg, cfg = (t.to(dtype) for t in _case(seed=3))
    plain = cfg + 3.0 * (cond - cond_seg)  # the formula as it was before rescale existed
    out = seg_guidance(cfg, cond, cond_seg, 3.0, rescale=0.0, mode=mode, uncond=uncond)
    assert torch.equal(out, plain)
    assert torch.equal(seg_guidance(cfg, cond, cond_seg, 3.0), plain)
    # with AND weights (three cond rows for two images)
    rows = torch.cat([cond, cond[:1] * 0.5])
    rows_seg = torch.cat([cond_seg, cond_seg[:1] * 0.5])
    weights = cond_weights([[(0, 0.7), (3, 0.3)], [(1, 1.0)], [(2, 1.0)]], 4, dtype=dtype)
    old = cfg + 3.0 * (weights @ (rows - rows_seg).reshape(4, -1)).reshape(cfg.shape)
    out = seg_guidance(cfg, rows, rows_seg, 3.0, weights, rescale=0.0, mode=mode, uncond=uncond)
    assert torch.equal(out, old)


# -- full and partial --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "partial"])
@pytest.mark.parametrize("rescale", [0.25, 0.7, 1.0])
def test_std_modes_match_their_definition(mode, rescale):
    uncond, cond, cond_seg, cfg = _case(seed=1)
    out = seg_guidance(cfg, cond, cond_seg, 3.0, rescale=rescale, mode=mode, uncond=uncond)
    expected = _direct_std_rescale(cfg, cond, 3.0 * (cond - cond_seg), rescale, mode)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, cfg + 3.0 * (cond - cond_seg))


def test_at_cfg_one_full_and_partial_coincide_and_shrink_a_large_term():
    """At CFG 1 the CFG result is cond, so both modes divide by std(cond + term): a large SEG term shrinks."""
    _, cond, cond_seg, _ = _case(seed=2)
    term = 10.0 * (cond - cond_seg)
    full = seg_guidance(cond, cond, cond_seg, 10.0, rescale=1.0, mode="full")
    partial = seg_guidance(cond, cond, cond_seg, 10.0, rescale=1.0, mode="partial")
    assert torch.equal(full, partial)
    torch.testing.assert_close(full, _direct_std_rescale(cond, cond, term, 1.0, "full"), rtol=1e-12, atol=1e-12)
    for i in range(cond.shape[0]):
        assert _sample_std(full[i] - cond[i]) < 0.5 * _sample_std(term[i])


def test_and_weights_use_each_images_weighted_cond():
    uncond, cond, cond_seg, _ = _case(seed=4, images=2)
    rows = torch.cat([cond, _rand(1, 4, 9, 7, seed=9)])
    rows_seg = torch.cat([cond_seg, _rand(1, 4, 9, 7, seed=10)])
    conds_list = [[(0, 0.6), (2, 0.9)], [(1, 1.0)]]
    weights = cond_weights(conds_list, 3, dtype=torch.float64)
    cfg = uncond.clone()  # A1111's combine: each weighted row's CFG term
    for i, pairs in enumerate(conds_list):
        for row, w in pairs:
            cfg[i] += (rows[row] - uncond[i]) * (w * 5.0)
    out = seg_guidance(cfg, rows, rows_seg, 2.0, weights, rescale=0.5, mode="partial")
    term = torch.stack([sum(w * 2.0 * (rows[r] - rows_seg[r]) for r, w in pairs) for pairs in conds_list])
    mixed = torch.stack([sum(w * rows[r] for r, w in pairs) / sum(w for _, w in pairs) for pairs in conds_list])
    torch.testing.assert_close(out, _direct_std_rescale(cfg, mixed, term, 0.5, "partial"), rtol=1e-12, atol=1e-12)


def test_a_flat_guided_prediction_keeps_its_term():
    cond = torch.zeros(1, 4, 5, 5, dtype=torch.float64)
    cond_seg = torch.zeros_like(cond)
    out = seg_guidance(cond, cond, cond_seg, 3.0, rescale=1.0, mode="full")
    assert torch.isfinite(out).all()


# -- snf ------------------------------------------------------------------------------------------------------
def test_snf_selection_matches_its_definition():
    _, cond, cond_seg, _ = _case(seed=5)
    cfg_term, seg_term = _rand(3, 4, 9, 7, seed=20), 3.0 * (cond - cond_seg)
    fused = snf_fuse(cfg_term, seg_term)
    assert torch.equal(fused, _direct_snf(cfg_term, seg_term))
    assert (fused == seg_term).any()
    assert (fused == cfg_term).any()
    equal = torch.zeros_like(cfg_term)
    assert torch.equal(snf_fuse(equal, equal), equal)


@pytest.mark.parametrize("rescale", [1.0, 0.4])
def test_snf_mode_is_uncond_plus_the_fused_terms_blended_by_rescale(rescale):
    uncond, cond, cond_seg, cfg = _case(seed=6)
    term = 3.0 * (cond - cond_seg)
    out = seg_guidance(cfg, cond, cond_seg, 3.0, rescale=rescale, mode="snf", uncond=uncond)
    fused = uncond + _direct_snf(cfg - uncond, term)
    plain = cfg + term
    expected = fused if rescale == 1.0 else plain + rescale * (fused - plain)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if rescale == 1.0:
        assert torch.equal(out, fused)


def test_snf_at_cfg_one_with_an_uncond_prediction_fuses():
    uncond, cond, cond_seg, _ = _case(seed=7, cfg_scale=1.0)
    out = seg_guidance(cond, cond, cond_seg, 3.0, rescale=1.0, mode="snf", uncond=uncond)
    torch.testing.assert_close(out, uncond + _direct_snf(cond - uncond, 3.0 * (cond - cond_seg)))


@pytest.mark.parametrize("missing", ["none", "zeros", "fake"])
def test_snf_without_an_uncond_prediction_keeps_the_plain_result(missing):
    """Forge's CFG-1 shortcut leaves uncond zero; A1111's skipped-uncond steps put cond in its place."""
    _, cond, cond_seg, _ = _case(seed=8)
    uncond = {"none": None, "zeros": torch.zeros_like(cond), "fake": cond}[missing]
    out = seg_guidance(cond, cond, cond_seg, 3.0, rescale=1.0, mode="snf", uncond=uncond)
    assert torch.equal(out, cond + 3.0 * (cond - cond_seg))


def test_batches_are_per_image():
    uncond, cond, cond_seg, cfg = _case(seed=11, images=4)
    for mode in ("full", "partial", "snf"):
        whole = seg_guidance(cfg, cond, cond_seg, 3.0, rescale=0.8, mode=mode, uncond=uncond)
        for i in range(4):
            one = seg_guidance(
                cfg[i : i + 1],
                cond[i : i + 1],
                cond_seg[i : i + 1],
                3.0,
                rescale=0.8,
                mode=mode,
                uncond=uncond[i : i + 1],
            )
            torch.testing.assert_close(whole[i : i + 1], one, rtol=1e-12, atol=1e-12)


def test_only_snf_with_rescale_needs_the_uncond_at_cfg_one():
    assert needs_uncond(SegParams(True, rescale=0.5, rescale_mode="snf"))
    assert not needs_uncond(SegParams(True, rescale=0.0, rescale_mode="snf"))
    assert not needs_uncond(SegParams(True, rescale=1.0, rescale_mode="full"))
