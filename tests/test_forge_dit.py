"""The Forge adapter on DiT models: Forge's sampling flow, UNet patcher and KModel stand-ins (``standins_forge``)
around the Flux, Chroma and SD3.5 stand-ins. The guidance is the UNet path's; the smoothed prediction is a
cond pass with the selected blocks' image queries blurred, on the same-call path as on the separate call."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from seg_lib.core.params import BY_INFOTEXT, SegParams, to_infotext
from seg_lib.families.hooks import dit_hooks
from seg_lib.host.forge import ForgeHost, ForgeRun
from seg_lib.host.run import RUN_ATTRIBUTE, on_cfg_denoiser
from tests import standins_flux, standins_sd35, standins_sd35_ersatz
from tests.dit_rig import dit_call
from tests.standins import make_p
from tests.standins_forge import ForgeModel, UnetPatcher, calc_cond_uncond_batch, sampling_function_inner

pytestmark = pytest.mark.usefixtures("float64")

SAME_LINE = "smoothed branch computed in the same UNet call"
SEPARATE_LINE = "separate extra UNet call"


def _model(name: str, depth: int = 4):
    torch.manual_seed(3)
    if name == "sd35":
        return standins_sd35.MMDiTX(depth=depth)
    if name == "sd35-ersatz":
        return standins_sd35_ersatz.MMDiTX(depth=depth)
    return standins_flux.Chroma() if name == "chroma" else standins_flux.Flux(guidance_embed=name == "flux")


class DitRig:
    """One generation of a DiT on the Forge stand-ins: conds with the keys Forge's engines put in ``c``
    (``c_crossattn``, the pooled ``y``, Flux dev's ``guidance``)."""

    def __init__(self, name: str, params: SegParams, *, fast: bool = True, size=(6, 10), depth: int = 4):
        self.name = name
        self.dit = _model(name, depth).double().eval()
        self.model = ForgeModel(self.dit)
        self.p = make_p()
        self.p.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(self.model)))
        self.base = self.p.sd_model.forge_objects.unet
        self.opts = SimpleNamespace(seg_fast_path=fast)
        self.p.extra_generation_params.update(to_infotext(params))
        host = ForgeHost(calc_cond_uncond_batch, None, self.model.memory.get_free_memory, self.opts)
        self.run = ForgeRun(self.p, params, host=host)
        setattr(self.p, RUN_ATTRIBUTE, self.run)
        gen = torch.Generator().manual_seed(4)
        self.x = torch.randn(1, 4, *size, generator=gen, dtype=torch.float64)
        self.sigma = torch.tensor([0.7], dtype=torch.float64)
        self.cond, self.uncond = [self.entry(gen)], [self.entry(gen)]

    def entry(self, gen: torch.Generator) -> dict:
        width = 12 if self.name.startswith("sd35") else 6
        conds = {"c_crossattn": torch.randn(1, 5, 12, generator=gen, dtype=torch.float64)}
        conds["y"] = torch.randn(1, width, generator=gen, dtype=torch.float64)
        if self.name == "flux":
            conds["guidance"] = torch.tensor([3.5], dtype=torch.float64)
        return {"model_conds": conds}

    def step(self, cond_scale: float = 5.0) -> torch.Tensor:
        self.run.patch(self.p)
        on_cfg_denoiser(
            SimpleNamespace(denoiser=SimpleNamespace(p=self.p), sampling_step=0, total_sampling_steps=1, x=self.x)
        )
        unet = self.p.sd_model.forge_objects.unet
        with torch.no_grad():
            return sampling_function_inner(
                unet.model, self.x, self.sigma, self.uncond, self.cond, cond_scale, unet.model_options
            )

    def plain(self, cond_scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            model = ForgeModel(self.dit)
            cond, uncond = calc_cond_uncond_batch(model, self.cond, self.uncond, self.x, self.sigma, {})
        return uncond + (cond - uncond) * cond_scale, cond

    def smoothed_cond(self, layers: str, sigma: float) -> torch.Tensor:
        """The reference: a cond pass with the blocks smoothed by the hooks alone (``test_dit`` checks them)."""
        with torch.no_grad(), dit_hooks(dit_call(self.dit, layers, sigma, one_query=False)):
            return calc_cond_uncond_batch(ForgeModel(self.dit), self.cond, None, self.x, self.sigma, {})[0]


CASES = [
    ("flux", "double1"),
    ("flux", "single0,single2"),
    ("schnell", "double0"),
    ("chroma", "double2,single1"),
    ("sd35", "joint1"),
    ("sd35", "joint0-1"),
]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("sigma", [3.0, math.inf])
@pytest.mark.parametrize(("name", "layers"), CASES)
def test_result_is_cfg_plus_the_seg_term(name, layers, sigma, fast, capsys):
    params = SegParams(enabled=True, scale=2.0, blur_sigma=sigma, layers=layers)
    rig = DitRig(name, params, fast=fast)
    result = rig.step()
    cfg, cond = rig.plain()
    expected = cfg + 2.0 * (cond - rig.smoothed_cond(layers, sigma))
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-9)
    out = capsys.readouterr().out
    assert (SAME_LINE in out) == fast
    assert (SEPARATE_LINE in out) == (not fast)
    if fast:
        first = layers.split(",")[0].rstrip("0123456789-")
        assert f"forked from the conditional branch at {first} block" in out
    assert rig.p.extra_generation_params["SEG Layers"] == layers
    assert rig.model.calls == ([3] if fast else [2, 1])  # the same call carries the copies


def test_condition_free_guidance_at_cfg_one():
    """Flux dev runs at CFG 1 (its distilled guidance is an input): SEG guides the cond alone."""
    rig = DitRig("flux", SegParams(enabled=True, scale=3.0, blur_sigma=math.inf, layers="single1"))
    result = rig.step(cond_scale=1.0)
    _, cond = rig.plain()
    torch.testing.assert_close(result, cond + 3.0 * (cond - rig.smoothed_cond("single1", math.inf)), rtol=0, atol=1e-9)
    assert rig.model.calls == [2]  # the cond rows and their smoothed copies; no uncond


def test_the_unet_default_means_the_family_default():
    """Left at the UNet default (m0), the layers on SD3.5 are Skip Layer Guidance's 7-9, and the infotext says
    so (a paste on SD3.5 gives the same blocks)."""
    rig = DitRig("sd35", SegParams(enabled=True, scale=2.0), depth=10, size=(4, 4))
    result = rig.step()
    cfg, cond = rig.plain()
    torch.testing.assert_close(result, cfg + 2.0 * (cond - rig.smoothed_cond("joint7-9", 1e9)), rtol=0, atol=1e-9)
    assert rig.p.extra_generation_params["SEG Layers"] == "joint7-9"


@pytest.mark.parametrize(
    ("name", "layers", "said"),
    [
        ("flux", "m0", "'double7-9' is not in this Flux model; valid: double0-2, single0-2"),
        ("flux", "d0", "'d0' is a UNet block, and this model is Flux (a DiT); valid: double0-2, single0-2"),
        ("sd35", "joint4", "'joint4' is not in this SD3.5 model; valid: joint0-3"),
    ],
)
def test_a_selection_the_model_lacks_makes_the_image_without_seg(name, layers, said, capsys):
    rig = DitRig(name, SegParams(enabled=True, scale=2.0, layers=layers))
    result = rig.step()
    torch.testing.assert_close(result, rig.plain()[0], rtol=0, atol=0)
    out = capsys.readouterr().out
    assert said in out
    assert out.count("[SEG]") == 1
    assert not any(key in rig.p.extra_generation_params for key in BY_INFOTEXT)


def test_nothing_is_left_patched():
    rig = DitRig("flux", SegParams(enabled=True, scale=2.0, layers="double1"))
    kernel = standins_flux.attention_function
    options = repr(rig.base.model_options)
    rig.step()
    assert standins_flux.attention_function is kernel
    assert repr(rig.base.model_options) == options
    modules = [rig.dit, *rig.dit.double_blocks, *rig.dit.single_blocks, rig.dit.final_layer]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def test_module_buffers_take_the_same_call_unforked(capsys):
    """ersatzForge's SD3.5 keeps its joint q/k/v in module-level buffers sized for the host's batch: the
    copies then run through the whole model in the same call (no fork), and the result is still exact."""
    params = SegParams(enabled=True, scale=2.0, blur_sigma=math.inf, layers="joint1")
    rig = DitRig("sd35-ersatz", params)
    result = rig.step()
    cfg, cond = rig.plain()
    torch.testing.assert_close(result, cfg + 2.0 * (cond - rig.smoothed_cond("joint1", math.inf)), rtol=0, atol=1e-9)
    out = capsys.readouterr().out
    assert "same UNet call (not forked: its blocks keep per-call buffers in module globals (SD3_K, SD3_Q" in out
    assert rig.model.calls == [3]
