"""The Forge adapter against stand-ins of Forge's UNet patcher, replace-patch protocol and post-CFG flow."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from seg_lib.core.params import SegParams, to_infotext
from seg_lib.host.forge import ForgeHost, ForgeRun, with_attn1_patches
from seg_lib.host.run import RUN_ATTRIBUTE, on_cfg_denoiser
from tests.standins import CONTEXT, make_p
from tests.standins_forge import (
    ForgeModel,
    ForgeTinyUNet,
    UnetPatcher,
    calc_cond_uncond_batch,
    forge_attention,
    sampling_function_inner,
)
from tests.test_a1111_adapter import reference_smoothing


class ForgeRig:
    def __init__(self, params: SegParams | None, *, height: int = 11, width: int = 7, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.unet = ForgeTinyUNet().eval()
        self.model = ForgeModel(self.unet)
        self.p = make_p()
        self.p.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(self.model)))
        self.base = self.p.sd_model.forge_objects.unet
        self.run = None
        if params is not None:
            self.p.extra_generation_params.update(to_infotext(params))
            self.run = ForgeRun(self.p, params, host=ForgeHost(calc_cond_uncond_batch, forge_attention))
            setattr(self.p, RUN_ATTRIBUTE, self.run)
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(1, 4, height, width, generator=gen)
        self.sigma = torch.full((1,), 1.5)
        self.cond = [{"model_conds": {"c_crossattn": torch.randn(1, 3, CONTEXT, generator=gen)}}]
        self.uncond = [{"model_conds": {"c_crossattn": torch.randn(1, 3, CONTEXT, generator=gen)}}]

    def step(self, step: int = 0, steps: int = 1, cond_scale: float = 5.0, cond=None) -> torch.Tensor:
        on_cfg_denoiser(
            SimpleNamespace(denoiser=SimpleNamespace(p=self.p), sampling_step=step, total_sampling_steps=steps)
        )
        unet = self.p.sd_model.forge_objects.unet
        with torch.no_grad():
            return sampling_function_inner(
                unet.model, self.x, self.sigma, self.uncond, cond or self.cond, cond_scale, unet.model_options
            )

    def predict(self, cond, names=(), sigma=math.inf) -> torch.Tensor:
        with torch.no_grad(), reference_smoothing(self.unet, list(names), sigma):
            return calc_cond_uncond_batch(ForgeModel(self.unet), cond, None, self.x, self.sigma, {})[0]

    def plain(self, cond_scale: float = 5.0, cond=None) -> torch.Tensor:
        with torch.no_grad():
            return sampling_function_inner(
                ForgeModel(self.unet), self.x, self.sigma, self.uncond, cond or self.cond, cond_scale, {}
            )


def test_patch_clones_once_per_pass_and_leaves_the_pass_unet_alone():
    rig = ForgeRig(SegParams(enabled=True))
    rig.run.patch(rig.p)
    patched = rig.p.sd_model.forge_objects.unet
    assert patched is not rig.base
    assert "sampler_post_cfg_function" not in rig.base.model_options
    rig.run.patch(rig.p)  # the hires pass calls process_before_every_sampling twice
    assert rig.p.sd_model.forge_objects.unet is patched
    assert len(patched.model_options["sampler_post_cfg_function"]) == 1
    rig.p.sd_model.forge_objects.unet = rig.base  # Forge resets forge_objects before the next pass
    rig.run.patch(rig.p)
    assert rig.p.sd_model.forge_objects.unet is not patched
    assert len(rig.p.sd_model.forge_objects.unet.model_options["sampler_post_cfg_function"]) == 1


@pytest.mark.parametrize(
    ("layers", "names"), [("m0", ["m0"]), ("d0,u2", ["d0", "u2"]), ("input3,output2", ["d1", "u1"])]
)
@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_result_is_cfg_plus_seg_term(layers, names, sigma):
    rig = ForgeRig(SegParams(enabled=True, scale=3.0, blur_sigma=sigma, layers=layers))
    rig.run.patch(rig.p)
    result = rig.step()
    delta = rig.predict(rig.cond) - rig.predict(rig.cond, names=names, sigma=sigma)
    assert delta.abs().max() > 3e-4  # ten times the tolerance below: the blur really acts
    torch.testing.assert_close(result, rig.plain() + 3.0 * delta, rtol=1e-4, atol=3e-5)
    assert rig.model.calls == [2, 1]  # cond + uncond, then the cond-only extra call


def test_condition_free_at_cfg_one():
    rig = ForgeRig(SegParams(enabled=True, scale=2.0))
    rig.run.patch(rig.p)
    result = rig.step(cond_scale=1.0)
    cond = rig.predict(rig.cond)
    torch.testing.assert_close(result, cond + 2.0 * (cond - rig.predict(rig.cond, names=["m0"])), rtol=1e-5, atol=1e-5)


def test_and_prompt_strengths_scale_like_cfg():
    rig = ForgeRig(SegParams(enabled=True))
    gen = torch.Generator().manual_seed(9)
    cond = [
        {"model_conds": {"c_crossattn": torch.randn(1, 3, CONTEXT, generator=gen)}, "strength": 1.0} for _ in range(2)
    ]
    rig.run.patch(rig.p)
    result = rig.step(cond=cond)
    delta = rig.predict(cond) - rig.predict(cond, names=["m0"])
    torch.testing.assert_close(result, rig.plain(cond=cond) + 3.0 * 2.0 * delta, rtol=1e-5, atol=1e-5)


def test_window_skips_the_extra_call_outside():
    rig = ForgeRig(SegParams(enabled=True, start=0.5, end=1.0))
    rig.run.patch(rig.p)
    for step in range(4):
        rig.step(step=step, steps=4)
    assert rig.model.calls == [2, 2, 2, 1, 2, 1]  # steps 2 and 3 only


def test_model_without_unet_is_reported_once(capsys):
    rig = ForgeRig(SegParams(enabled=True))
    rig.base.model = SimpleNamespace(diffusion_model=torch.nn.Identity())  # a DiT (Flux, SD3)
    rig.run.patch(rig.p)
    rig.run.patch(rig.p)
    assert rig.p.sd_model.forge_objects.unet is rig.base
    assert capsys.readouterr().out.count("does not apply to this model yet") == 1
    assert rig.p.extra_generation_params == {}


def test_layers_the_model_lacks(capsys):
    rig = ForgeRig(SegParams(enabled=True, layers="u7"))
    rig.run.patch(rig.p)
    assert rig.p.sd_model.forge_objects.unet is rig.base
    assert "'u7' is not in this model" in capsys.readouterr().out


def test_an_error_makes_the_image_without_seg(capsys):
    rig = ForgeRig(SegParams(enabled=True))

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    rig.run.host = ForgeHost(broken, forge_attention)
    rig.run.patch(rig.p)
    assert torch.equal(rig.step(), rig.plain())
    assert torch.equal(rig.step(), rig.plain())
    assert capsys.readouterr().out.count("SEG failed") == 1
    assert rig.p.extra_generation_params == {}


def test_with_attn1_patches_copies():
    options = {"transformer_options": {"patches_replace": {"attn1": {("input", 1): "x"}}, "other": 1}}
    merged = with_attn1_patches(options, {("middle", 0, 0): "y"})
    assert merged["transformer_options"]["patches_replace"]["attn1"] == {("input", 1): "x", ("middle", 0, 0): "y"}
    assert options["transformer_options"]["patches_replace"]["attn1"] == {("input", 1): "x"}
