"""The SEG combination and the step window."""

from __future__ import annotations

import pytest
import torch

from seg_lib.core.guidance import cond_weights, in_step_window, seg_guidance, step_progress


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_formula_per_image():
    uncond, cond, cond_seg = (_rand(3, 4, 8, 8, seed=s) for s in range(3))
    cfg_scale, seg_scale = 7.0, 3.0
    cfg_result = uncond + cfg_scale * (cond - uncond)
    out = seg_guidance(cfg_result, cond, cond_seg, seg_scale)
    expected = uncond + cfg_scale * (cond - uncond) + seg_scale * (cond - cond_seg)
    torch.testing.assert_close(out, expected)
    for i in range(3):  # each image only sees its own rows
        torch.testing.assert_close(out[i], cfg_result[i] + seg_scale * (cond[i] - cond_seg[i]))


def test_condition_free_at_cfg_one():
    cond, cond_seg = _rand(2, 4, 6, 6, seed=1), _rand(2, 4, 6, 6, seed=2)
    out = seg_guidance(cond, cond, cond_seg, 2.5)
    torch.testing.assert_close(out, cond + 2.5 * (cond - cond_seg))


def test_scale_zero_is_the_cfg_result():
    cfg_result, cond, cond_seg = (_rand(2, 4, 5, 5, seed=s) for s in range(3))
    assert torch.equal(seg_guidance(cfg_result, cond, cond_seg, 0.0), cfg_result)


def test_identical_seg_prediction_changes_nothing():
    cfg_result, cond = _rand(2, 4, 5, 5, seed=0), _rand(2, 4, 5, 5, seed=1)
    assert torch.equal(seg_guidance(cfg_result, cond, cond.clone(), 3.0), cfg_result)


def test_eps_and_x0_space_give_the_same_step():
    # k-diffusion hosts hand x0 (x - sigma * eps), DDIM-style hosts hand eps; SEG is linear in either.
    x, sigma = _rand(2, 4, 6, 6, seed=0), 1.7
    eps_uncond, eps_cond, eps_seg = (_rand(2, 4, 6, 6, seed=s) for s in (1, 2, 3))
    cfg_scale, seg_scale = 5.0, 3.0

    def to_x0(eps):
        return x - sigma * eps

    eps_out = seg_guidance(eps_uncond + cfg_scale * (eps_cond - eps_uncond), eps_cond, eps_seg, seg_scale)
    x0_cfg = to_x0(eps_uncond) + cfg_scale * (to_x0(eps_cond) - to_x0(eps_uncond))
    x0_out = seg_guidance(x0_cfg, to_x0(eps_cond), to_x0(eps_seg), seg_scale)
    torch.testing.assert_close(x0_out, to_x0(eps_out))


def test_and_prompts_weight_the_seg_term_like_the_host_weights_cfg():
    # A1111 conds_list: image 0 has two AND sub-prompts (rows 0, 1), image 1 one (row 2).
    conds_list = [[(0, 0.7), (1, 0.3)], [(2, 1.0)]]
    cond, cond_seg = _rand(3, 4, 5, 5, seed=1), _rand(3, 4, 5, 5, seed=2)
    uncond = _rand(2, 4, 5, 5, seed=3)
    cfg_scale, seg_scale = 6.0, 3.0
    # The host's combine_denoised: denoised[i] = uncond[i] + sum_j w_j * cfg * (cond_j - uncond_i)
    cfg_result = uncond.clone()
    for image, pairs in enumerate(conds_list):
        for row, weight in pairs:
            cfg_result[image] += (cond[row] - uncond[image]) * weight * cfg_scale
    weights = cond_weights(conds_list, 3, dtype=torch.float64)
    out = seg_guidance(cfg_result, cond, cond_seg, seg_scale, weights)
    expected = cfg_result.clone()
    for image, pairs in enumerate(conds_list):
        for row, weight in pairs:
            expected[image] += (cond[row] - cond_seg[row]) * weight * seg_scale
    torch.testing.assert_close(out, expected)


def test_cond_weights_rejects_rows_outside_the_batch():
    with pytest.raises(ValueError, match="cond row 3"):
        cond_weights([[(3, 1.0)]], 2)


def test_shape_mismatches_are_errors():
    a, b = torch.zeros(2, 4, 4, 4), torch.zeros(3, 4, 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        seg_guidance(a, a, b, 1.0)
    with pytest.raises(ValueError, match="one cond row per image"):
        seg_guidance(a, b, b, 1.0)
    with pytest.raises(ValueError, match="weights"):
        seg_guidance(a, b, b, 1.0, torch.ones(2, 2))


@pytest.mark.parametrize(
    ("start", "end", "steps", "active"),
    [
        (0.0, 1.0, 20, list(range(20))),
        (0.0, 0.0, 20, [0]),
        (1.0, 1.0, 20, [19]),
        (0.0, 0.5, 11, [0, 1, 2, 3, 4, 5]),
        (0.3, 0.7, 11, [3, 4, 5, 6, 7]),  # inclusive at both ends
        (0.5, 1.0, 4, [2, 3]),
        (0.0, 1.0, 1, [0]),
        (0.5, 1.0, 1, []),  # one-step pass: its only step is at 0.0
    ],
)
def test_step_window(start, end, steps, active):
    assert [s for s in range(steps) if in_step_window(s, steps, start, end)] == active


def test_step_progress_bounds():
    assert step_progress(0, 10) == 0.0
    assert step_progress(9, 10) == 1.0
    assert step_progress(12, 10) == 1.0  # a sampler's extra call after the last step
    with pytest.raises(ValueError, match="total_steps"):
        step_progress(0, 0)
