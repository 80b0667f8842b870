"""The A1111 adapter against stand-ins of the CFG denoiser flow and an ldm-structured UNet."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from seg_lib.core.params import SegParams, to_infotext
from seg_lib.host.a1111 import SegRun
from seg_lib.host.adapter import A1111Adapter, UnsupportedAdapter
from seg_lib.host.run import RUN_ATTRIBUTE, on_cfg_denoiser
from tests.reference_blur import map_to_tokens, per_dimension_blur, tokens_to_map
from tests.standins import (
    CONTEXT,
    BasicTransformerBlock,
    Denoiser,
    FakeHost,
    KDiffusionWrapper,
    SpatialTransformer,
    TinyUNet,
    make_p,
    make_sd_model,
)

# (part, index) of the stand-in's attention blocks, in selector order d0, d1, m0, u0, u1, u2.
BLOCKS = {
    "d0": ("input", 1),
    "d1": ("input", 3),
    "m0": ("middle", 0),
    "u0": ("output", 0),
    "u1": ("output", 2),
    "u2": ("output", 4),
}


def _transformer(unet: TinyUNet, part: str, index: int) -> SpatialTransformer:
    block = unet.middle_block if part == "middle" else getattr(unet, f"{part}_blocks")[index]
    # by class name: also the Forge stand-ins' own SpatialTransformer, and inside a wrapper module
    return next(m for m in block.modules() if type(m).__name__ == "SpatialTransformer")


def _reference_blur(q: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    if math.isinf(sigma):
        return q.mean(dim=1, keepdim=True).expand_as(q)
    return map_to_tokens(per_dimension_blur(tokens_to_map(q, height, width), sigma))


@contextmanager
def reference_smoothing(unet: TinyUNet, names: list[str], sigma: float, rows: int | None = None) -> Iterator[None]:
    """Blur the chosen layers' queries on the grid read from each transformer's actual input (only the last
    ``rows`` rows, when given)."""
    handles = []
    for name in names:
        transformer = _transformer(unet, *BLOCKS[name])
        shape: dict[str, tuple[int, int]] = {}

        def remember(_m, args, shape=shape):
            shape["hw"] = tuple(args[0].shape[-2:])

        def blur(_m, _a, q, shape=shape):
            if rows is None:
                return _reference_blur(q, *shape["hw"], sigma)
            return torch.cat([q[:-rows], _reference_blur(q[-rows:], *shape["hw"], sigma)])

        handles.append(transformer.register_forward_pre_hook(remember))
        handles += [block.attn1.to_q.register_forward_hook(blur) for block in transformer.transformer_blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


pytestmark = pytest.mark.usefixtures("float64")


class Rig:
    """One generation: UNet, inner model, p with a SegRun (or none), and the host's denoiser."""

    def __init__(
        self,
        params: SegParams | None,
        *,
        unet: nn.Module | None = None,
        height: int = 11,
        width: int = 7,
        batch: int = 2,
        in_channels: int = 4,
        seed: int = 0,
        fast: bool = True,
    ) -> None:
        torch.manual_seed(seed)
        self.unet = unet if unet is not None else TinyUNet(in_channels=in_channels).eval()
        self.sd_model = make_sd_model(self.unet)
        self.inner = KDiffusionWrapper(self.sd_model)
        self.host = FakeHost(self.sd_model, seg_fast_path=fast)
        self.p = make_p()
        self.run = None
        if params is not None:
            self.p.extra_generation_params.update(to_infotext(params))
            self.run = SegRun(self.p, params, host=self.host)
            setattr(self.p, RUN_ATTRIBUTE, self.run)
        self.denoiser = Denoiser(self.inner, self.p, on_cfg_denoiser)
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 4, height, width, generator=gen)
        self.sigma = torch.full((batch,), 1.5)
        self.cond = [torch.randn(3, CONTEXT, generator=gen) for _ in range(batch)]
        self.uncond = torch.randn(batch, 3, CONTEXT, generator=gen)
        self.image_cond = torch.zeros(batch, 5, 1, 1)

    def conds(self, weights: list[list[float]] | None = None) -> list[list[tuple[torch.Tensor, float]]]:
        if weights is None:
            return [[(c, 1.0)] for c in self.cond]
        return [[(self.cond[i] * (j + 1), w) for j, w in enumerate(ws)] for i, ws in enumerate(weights)]

    def step(self, cond_scale: float = 7.0, conds=None, **kw) -> torch.Tensor:
        with torch.no_grad():
            return self.denoiser.forward(
                self.x, self.sigma, self.uncond, conds or self.conds(), cond_scale, self.image_cond, **kw
            )

    def plain(self, cond_scale: float = 7.0, conds=None, **kw) -> torch.Tensor:
        """The same step with SEG absent."""
        bare = Denoiser(KDiffusionWrapper(self.sd_model), make_p(), on_cfg_denoiser)
        with torch.no_grad():
            return bare.forward(
                self.x, self.sigma, self.uncond, conds or self.conds(), cond_scale, self.image_cond, **kw
            )

    def predict(self, rows_x, rows_sigma, context, image_cond=None, names=(), sigma=math.inf) -> torch.Tensor:
        cond = {"c_crossattn": [context], "c_concat": [image_cond if image_cond is not None else torch.zeros(1)]}
        with torch.no_grad(), reference_smoothing(self.unet, list(names), sigma):
            return KDiffusionWrapper(self.sd_model)(rows_x, rows_sigma, cond)

    def cond_and_delta(self, names=("m0",), sigma=math.inf, image_cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One cond row per image: its prediction, and ``cond - cond_seg`` with ``names`` smoothed (the SEG term
        before the scale)."""
        cond_rows = torch.stack(self.cond)
        x0_cond = self.predict(self.x, self.sigma, cond_rows, image_cond)
        return x0_cond, x0_cond - self.predict(self.x, self.sigma, cond_rows, image_cond, names=names, sigma=sigma)


def _to_q_hooks(unet: nn.Module) -> int:
    return sum(len(m.to_q._forward_hooks) for m in unet.modules() if hasattr(m, "to_q"))


def test_off_changes_nothing():
    rig = Rig(None)
    result = rig.step()
    assert torch.equal(result, rig.plain())
    assert rig.inner.calls == [4]  # one host call, no extra pass
    assert "combine_denoised" not in vars(rig.denoiser)


@pytest.mark.parametrize(
    ("layers", "names"),
    [("m0", ["m0"]), ("u0", ["u0"]), ("d0,u2", ["d0", "u2"]), ("d1-d1,u0-u1", ["d1", "u0", "u1"])],
)
@pytest.mark.parametrize("sigma", [2.0, math.inf])
@pytest.mark.parametrize("fast", [True, False])
def test_on_is_cfg_plus_seg_term_with_the_exact_grid(layers, names, sigma, fast):
    params = SegParams(enabled=True, scale=3.0, blur_sigma=sigma, layers=layers)
    rig = Rig(params, height=11, width=7, fast=fast)  # non-square, odd: grids 11x7, 6x4, 3x2
    result = rig.step(cond_scale=7.0)
    _, delta = rig.cond_and_delta(names, sigma)
    expected = rig.plain(cond_scale=7.0) + 3.0 * delta
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)
    assert delta.abs().max() > 1e-2  # the blur really changed the prediction
    # fast: one host call with the cond rows' copies appended; else the host call, then a cond-only call
    assert rig.inner.calls == ([6] if fast else [4, 2])
    assert _to_q_hooks(rig.unet) == 0
    assert "forward" not in vars(rig.unet)


def test_scale_zero_changes_nothing_but_runs():
    rig = Rig(SegParams(enabled=True, scale=0.0))
    torch.testing.assert_close(rig.step(), rig.plain(), rtol=0, atol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_condition_free_at_cfg_one(fast):
    rig = Rig(fast=fast, params=SegParams(enabled=True, scale=2.0))
    result = rig.step(cond_scale=1.0)
    x0_cond, delta = rig.cond_and_delta()
    torch.testing.assert_close(result, x0_cond + 2.0 * delta, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fast", [True, False])
def test_skipped_uncond_step_still_gets_seg(fast):
    rig = Rig(fast=fast, params=SegParams(enabled=True))
    result = rig.step(skip_uncond=True)
    x0_cond, delta = rig.cond_and_delta()
    torch.testing.assert_close(result, x0_cond + 3.0 * delta, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fast", [True, False])
def test_and_prompts_weight_the_seg_term(fast):
    rig = Rig(fast=fast, params=SegParams(enabled=True))
    conds = rig.conds([[0.7, 0.3], [1.0]])  # image 0: two AND sub-prompts
    result = rig.step(conds=conds)
    rows = torch.stack([c for image in conds for c, _ in image])
    row_x = torch.stack([rig.x[0], rig.x[0], rig.x[1]])
    row_sigma = torch.stack([rig.sigma[0], rig.sigma[0], rig.sigma[1]])
    delta = rig.predict(row_x, row_sigma, rows) - rig.predict(row_x, row_sigma, rows, names=["m0"])
    expected = rig.plain(conds=conds)
    expected[0] += 3.0 * (0.7 * delta[0] + 0.3 * delta[1])
    expected[1] += 3.0 * delta[2]
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fast", [True, False])
def test_instruct_pix2pix_edit_model(fast):
    rig = Rig(fast=fast, params=SegParams(enabled=True))
    rig.denoiser.image_cfg_scale = 1.5
    result = rig.step(edit=True)
    _, delta = rig.cond_and_delta()
    bare = Rig(None)
    bare.denoiser.image_cfg_scale = 1.5
    torch.testing.assert_close(result, bare.step(edit=True) + 3.0 * delta, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fast", [True, False])
def test_inpainting_model_gets_its_image_conditioning_and_keeps_the_unmasked_area(fast):
    rig = Rig(SegParams(enabled=True), in_channels=9, fast=fast)
    gen = torch.Generator().manual_seed(5)
    rig.image_cond = torch.randn(2, 5, 11, 7, generator=gen)  # mask + masked-image latent
    mask = (torch.rand(2, 1, 11, 7, generator=gen) > 0.5).float()
    init_latent = torch.randn(2, 4, 11, 7, generator=gen)
    rig.denoiser.mask, rig.denoiser.nmask, rig.denoiser.init_latent = mask, 1 - mask, init_latent
    result = rig.step()
    assert torch.equal(result[mask.expand_as(result) == 1], init_latent[mask.expand_as(result) == 1])
    _, delta = rig.cond_and_delta(image_cond=rig.image_cond)
    bare = Rig(None, unet=rig.unet)
    bare.image_cond = rig.image_cond
    bare.denoiser.mask, bare.denoiser.nmask, bare.denoiser.init_latent = mask, 1 - mask, init_latent
    bare.x = rig.x
    expected = bare.step() + 3.0 * delta * (1 - mask)
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fast", [True, False])
def test_step_window_runs_the_extra_pass_only_inside(fast):
    rig = Rig(SegParams(enabled=True, start=0.3, end=0.6), fast=fast)
    for step in range(11):
        rig.step(step=step, steps=11)
    # steps 3, 4, 5, 6 (0.3..0.6 of 0..10) computed the smoothed branch: in the host call, or one more call
    seg_steps = [4] * 3 + ([6] * 4 if fast else [4, 2] * 4) + [4] * 4
    assert rig.inner.calls == seg_steps
    assert _to_q_hooks(rig.unet) == 0


def test_an_error_in_seg_makes_the_image_without_seg(capsys):
    rig = Rig(SegParams(enabled=True))
    original = rig.inner.__call__

    def failing(x, sigma, cond):
        if len(rig.inner.calls) >= 1 and x.shape[0] == 2:
            rig.inner.calls.append(x.shape[0])
            raise RuntimeError("boom")
        return original(x, sigma, cond)

    rig.denoiser.inner_model = failing
    first = rig.step()
    second = rig.step()
    assert torch.equal(first, rig.plain())
    assert torch.equal(second, rig.plain())
    assert rig.run.failed
    assert rig.p.extra_generation_params == {}  # the PNG must not claim SEG
    assert capsys.readouterr().out.count("[SEG] SEG failed") == 1
    assert _to_q_hooks(rig.unet) == 0


def test_model_without_unet_is_reported_once(capsys):
    rig = Rig(SegParams(enabled=True), unet=nn.Linear(2, 2))
    rig.sd_model.model.diffusion_model = nn.Identity()
    rig.host = FakeHost(rig.sd_model)
    rig.run.host = rig.host
    rig.unet = TinyUNet().eval()  # what the step really runs
    rig.inner.sd_model = make_sd_model(rig.unet)
    rig.step()
    rig.step()
    out = capsys.readouterr().out
    assert out.count("does not apply to this model") == 1
    assert rig.p.extra_generation_params == {}


def test_layers_the_model_lacks_switch_seg_off_with_the_valid_list(capsys):
    rig = Rig(SegParams(enabled=True, layers="d5"))
    result = rig.step()
    assert torch.equal(result, rig.plain())
    assert "'d5' is not in this model; valid: d0-d1" in capsys.readouterr().out


class ToMeBlock(BasicTransformerBlock):
    """tomesd's class swap: attn1 sees half the tokens (merged) at full resolution."""

    def forward(self, x, context):
        kept = x[:, ::2]
        out = x.clone()
        out[:, ::2] = self.attn1(self.norm1(kept)) + kept
        return self.attn2(self.norm2(out), context=context) + out


def _merge_depth0(unet: TinyUNet) -> None:
    for part, index in (("input", 1), ("output", 4)):
        for block in _transformer(unet, part, index).transformer_blocks:
            block.__class__ = ToMeBlock


def test_merged_tokens_are_skipped_with_one_line(capsys):
    unet = TinyUNet().eval()
    _merge_depth0(unet)
    rig = Rig(SegParams(enabled=True, layers="d0,m0,u2"), unet=unet)
    result = rig.step()
    rig.step()
    _, delta = rig.cond_and_delta()
    torch.testing.assert_close(result, rig.plain() + 3.0 * delta, rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    assert out.count("skipping input block 1") == 1
    assert out.count("skipping output block 4") == 1


def test_only_merged_layers_means_no_seg_term_on_those_steps(capsys):
    """A step on which no selected layer can be smoothed gets no SEG term (the plain image) and no second
    extra pass; SEG is not given up for the generation: later steps may see the plain grid again."""
    unet = TinyUNet().eval()
    _merge_depth0(unet)
    rig = Rig(SegParams(enabled=True, layers="d0"), unet=unet)
    assert torch.equal(rig.step(), rig.plain())
    assert torch.equal(rig.step(), rig.plain())
    assert capsys.readouterr().out.count("skipping input block 1 on the steps where its 39 tokens") == 1
    assert not rig.run.failed
    assert rig.p.extra_generation_params  # SEG stays on for the generation


def test_refiner_switch_mid_generation_uses_the_new_unet():
    rig = Rig(SegParams(enabled=True))
    rig.step()
    torch.manual_seed(42)
    refiner = TinyUNet(depth=1).eval()
    rig.sd_model.model.diffusion_model = refiner  # apply_refiner swaps shared.sd_model
    rig.unet = refiner
    result = rig.step()
    _, delta = rig.cond_and_delta()
    torch.testing.assert_close(result, rig.plain() + 3.0 * delta, rtol=1e-9, atol=1e-9)


def test_a_finished_generation_leaves_no_trace():
    rig = Rig(SegParams(enabled=True))
    adapter = A1111Adapter()
    adapter.finish(rig.p)
    assert getattr(rig.p, RUN_ATTRIBUTE) is None
    assert torch.equal(rig.step(), rig.plain())


def test_adapter_start_sets_a_run_only_when_enabled():
    p = make_p()
    A1111Adapter().start(p, SegParams())
    assert getattr(p, RUN_ATTRIBUTE) is None
    A1111Adapter().start(p, SegParams(enabled=True))
    assert isinstance(getattr(p, RUN_ATTRIBUTE), SegRun)


def test_unsupported_host_says_so_and_drops_infotext(capsys):
    p = make_p()
    params = SegParams(enabled=True)
    p.extra_generation_params.update(to_infotext(params))
    UnsupportedAdapter("none").start(p, params)
    assert p.extra_generation_params == {}
    assert "does not support this WebUI (none)" in capsys.readouterr().out
