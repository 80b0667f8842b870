"""The Forge fork: SEG's branch forked inside Forge's own UNet call, checked in double precision against a
toy UNet with new Forge's module layout and forward (``tests/standins_forge_unet.py``).

Forward level: ``forked_forward`` returns the host's rows as the stock forward does and the copies as a
separate cond-only pass with smoothed queries (reference hooks that read each transformer's real grid),
with block patches (FreeU-like, Deep-Shrink-like), block modifiers, inner block modifiers, a group-norm
wrapper and ControlNet-style residuals. Run level: the whole same-call path equals the separate call.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seg_lib.core.params import SegParams
from seg_lib.host import forge_fork
from seg_lib.host.forge import SMOOTH_ROWS
from seg_lib.host.forge_fork import BACKEND, LDM_PATCHED, ForkPlan, forked_forward, plan_fork
from tests import standins_forge_unet
from tests.standins import CONTEXT, WIDTH
from tests.standins_forge_unet import IntegratedUNet2DConditionModel
from tests.test_a1111_adapter import BLOCKS, reference_smoothing
from tests.test_forge_adapter import ForgeRig

pytestmark = pytest.mark.usefixtures("float64")

STOCK = {IntegratedUNet2DConditionModel: BACKEND}
COND = slice(2, 4)  # Forge batches the uncond chunk first: rows 0-1 uncond, 2-3 cond


# -- host patches, each a function of each row alone -----------------------------------------------------
def _consistent(h, options):
    """Every patch checks that the per-row bookkeeping describes the batch it is given."""
    assert len(options["cond_mark"]) == h.shape[0]
    assert len(options["cond_or_uncond"]) * 2 == h.shape[0]


def freeu_like(h, hsp, options):
    _consistent(h, options)
    if h.shape[1] == WIDTH:
        mean = h.mean(1, keepdim=True)
        peak = mean.flatten(1).amax(-1)[:, None, None, None]
        h = torch.cat([h[:, :4] * (1 + 0.3 * mean / peak), h[:, 4:]], dim=1)
        spectrum = torch.fft.fftn(hsp, dim=(-2, -1))
        spectrum[..., :2, :2] *= 0.7
        hsp = torch.fft.ifftn(spectrum, dim=(-2, -1)).real
    return h, hsp


def deep_shrink_in(h, options):
    _consistent(h, options)
    if options["block"] == ("input", 1) and options["sigmas"][0] > 1.0:
        h = F.interpolate(h, size=(round(h.shape[-2] / 2), round(h.shape[-1] / 2)), mode="bicubic")
    return h


def deep_shrink_out(h, hsp, options):
    if h.shape[-2:] != hsp.shape[-2:]:
        h = F.interpolate(h, size=hsp.shape[-2:], mode="bicubic")
    return h, hsp


def after_skip(h, options):
    return h * 0.9 if options["block"][0] == "input" else h


def block_modifier(h, when, options):
    _consistent(h, options)
    return h * 1.05 + 0.01 if (when, options["block"]) == ("after", ("middle", 0)) else h


def inner_modifier(x, when, layer, index, block, options):
    _consistent(x, options)
    if when == "before" and type(layer).__name__ == "SpatialTransformer":
        options.setdefault("grids", []).append(tuple(x.shape[-2:]))  # what #9's grid recorder reads
    return x * 0.98 if when == "after" and index == 0 else x


def group_norm_wrapper(norm, h, options):
    return norm(h) * 1.1 - 0.02


PATCH_KINDS = {
    "none": {},
    "freeu": {"patches": {"output_block_patch": [freeu_like]}},
    "deep-shrink": {
        "patches": {"input_block_patch": [deep_shrink_in], "output_block_patch": [deep_shrink_out]},
    },
    "modifiers": {
        "patches": {"input_block_patch_after_skip": [after_skip]},
        "block_modifiers": [block_modifier],
        "block_inner_modifiers": [inner_modifier],
        "group_norm_wrapper": group_norm_wrapper,
    },
}


def residuals(x: torch.Tensor) -> dict[str, list]:
    """ControlNet-style residuals for the toy UNet on an 11x7 latent, each a function of its own row of x;
    one entry is None and one a single constant row (broadcast), as Forge's merge can give."""

    def r(size, k):
        return F.adaptive_avg_pool2d(x[:, k : k + 1], size).expand(-1, WIDTH, -1, -1) * (0.2 + 0.1 * k)

    s0, s1, s2 = (11, 7), (6, 4), (3, 2)
    return {
        "input": [r(s2, 0), r(s1, 1), None, r(s0, 3), r(s0, 0)],  # popped from the end: input 0 first
        "middle": [r(s2, 1)],
        "output": [r(s0, 2), torch.full((1, WIDTH, *s0), 0.05), r(s1, 0), r(s1, 1), r(s2, 2)],  # output 0 gets the last
    }


def _options(kind: str, chunks: list[int], rows: int = 2) -> dict:
    options = dict(PATCH_KINDS[kind])
    options["cond_or_uncond"] = list(chunks)
    options["sigmas"] = torch.full((rows,), 1.5)
    options["cond_mark"] = torch.tensor([float(k) for k in chunks for _ in range(rows)])
    options["cond_indices"] = [i * rows + r for i, k in enumerate(chunks) if k == 0 for r in range(rows)]
    options["uncond_indices"] = [i * rows + r for i, k in enumerate(chunks) if k == 1 for r in range(rows)]
    return options


def _grow(t):
    return None if t is None else torch.cat([t, t[COND]])


@pytest.mark.parametrize("names", [["m0"], ["u0"], ["u2"], ["d0"], ["d1"], ["d0", "u2"], ["d1", "m0", "u0"]])
@pytest.mark.parametrize("kind", list(PATCH_KINDS))
@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_forked_rows_equal_a_separate_smoothed_pass(names, kind, sigma):
    control = kind in ("none", "modifiers")  # the residuals are sized for the latent's own grids
    torch.manual_seed(3)
    unet = IntegratedUNet2DConditionModel(adm_in=5).eval()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 4, 11, 7, generator=gen)
    t = torch.rand(4, generator=gen) * 10
    context = torch.randn(4, 3, CONTEXT, generator=gen)
    y = torch.randn(4, 5, generator=gen)
    at = min((BLOCKS[n] for n in names), key=lambda b: ({"input": 0, "middle": 1, "output": 2}[b[0]], b[1]))
    with torch.no_grad():
        host_options = _options(kind, [1, 0])
        stock_host = unet(x, t, context, y, control=residuals(x) if control else None, transformer_options=host_options)
        with reference_smoothing(unet, names, sigma):
            stock_seg = unet(
                x[COND], t[COND], context[COND], y[COND],
                control=residuals(x[COND]) if control else None, transformer_options=_options(kind, [0]),
            )  # fmt: skip
        options = _options(kind, [1, 0])
        args = {"input": x, "c": {"transformer_options": options, "control": residuals(x) if control else None}}
        plan = plan_fork(unet, STOCK, at, args, COND, (SMOOTH_ROWS,))
        assert isinstance(plan, ForkPlan), plan
        enlarged = {**_options(kind, [1, 0, 0]), SMOOTH_ROWS: slice(4, 6)}
        with reference_smoothing(unet, names, sigma, rows=2):
            out = forked_forward(
                plan, _grow(x), _grow(t), _grow(context), _grow(y),
                control=residuals(x) if control else None, transformer_options=enlarged,
            )  # fmt: skip
    assert out.shape[0] == 6
    torch.testing.assert_close(out[:4], stock_host, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[4:], stock_seg, rtol=1e-9, atol=1e-9)
    assert enlarged[SMOOTH_ROWS] == slice(4, 6)  # the bigger batch's bookkeeping is back after the call
    if kind == "modifiers":
        assert enlarged["grids"] == host_options["grids"]  # the inner modifiers saw the same grids
    with torch.no_grad():
        unsmoothed = unet(x[COND], t[COND], context[COND], y[COND], transformer_options=_options(kind, [0]))
    assert (out[4:] - unsmoothed).abs().max() > 1e-4  # smoothed (a 2x1 grid after Deep Shrink barely moves)


def test_the_blocks_before_the_fork_see_the_host_rows_only():
    unet = IntegratedUNet2DConditionModel().eval()
    seen: list[tuple[str, int]] = []
    for name, block in [("in", b) for b in unet.input_blocks] + [("mid", unet.middle_block)]:
        block.register_forward_pre_hook(lambda _m, a, name=name: seen.append((name, a[0].shape[0])))
    x, t, context = torch.randn(4, 4, 11, 7), torch.rand(4), torch.randn(4, 3, CONTEXT)
    args = {"input": x, "c": {"transformer_options": _options("none", [1, 0])}}
    plan = plan_fork(unet, STOCK, ("middle", 0), args, COND, (SMOOTH_ROWS,))
    with torch.no_grad():
        forked_forward(plan, _grow(x), _grow(t), _grow(context), transformer_options=_options("none", [1, 0, 0]))
    assert seen == [("in", 4)] * 5 + [("mid", 6)]


def test_plan_names_what_it_cannot_carry():
    unet = IntegratedUNet2DConditionModel()
    x = torch.randn(4, 4, 11, 7)

    def plan(**c):
        return plan_fork(unet, STOCK, ("middle", 0), {"input": x, "c": c}, COND)

    assert isinstance(plan(control=residuals(x), control_model=object()), ForkPlan)
    assert "shape (3, 8, 3, 2) for 4 rows" in plan(control={"middle": [torch.zeros(3, WIDTH, 3, 2)]})
    assert "'gligen'" in plan(gligen=torch.zeros(4))
    assert "is not the host's stock one" in plan_fork(
        torch.nn.Linear(1, 1), STOCK, ("middle", 0), {"input": x, "c": {}}, COND
    )
    hooked = IntegratedUNet2DConditionModel()
    hooked.register_forward_hook(lambda *a: None)
    assert "hooks" in plan_fork(hooked, STOCK, ("middle", 0), {"input": x, "c": {}}, COND)
    assert plan_fork(unet, STOCK, ("middle", 0), {"input": x, "c": {}}, COND).namespace is standins_forge_unet


def test_forked_context_manager_leaves_no_forward_behind():
    unet = IntegratedUNet2DConditionModel()
    plan = plan_fork(unet, STOCK, ("middle", 0), {"input": torch.zeros(4, 4, 11, 7), "c": {}}, COND)
    seen = []

    def fail() -> None:
        with forge_fork.forked(plan):
            seen.append("forward" in vars(unet))
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail()
    assert seen == [True]
    assert "forward" not in vars(unet)


# -- the whole same-call path on Forge's sampling flow ---------------------------------------------------
class ForkRig(ForgeRig):
    """ForgeRig with the Forge-layout UNet, its forward known to the host as Forge's stock forward."""

    def __init__(self, params: SegParams | None, **kw) -> None:
        super().__init__(params, **kw)
        torch.manual_seed(5)
        extras = kw.get("extras", False)
        self.unet = IntegratedUNet2DConditionModel(in_channels=8 if extras else 4, adm_in=5 if extras else None).eval()
        self.model.diffusion_model = self.unet
        if self.run is not None:
            self.run.host.unet_forwards = STOCK
        self.seen: list[int] = []
        self.unet.input_blocks[0].register_forward_pre_hook(lambda _m, a: self.seen.append(a[0].shape[0]))


class Residuals:
    """A ControlNet in Forge's linked list whose residuals are a function of each row of the UNet input."""

    previous_controlnet = None
    transformer_options = None

    def get_control(self, x_noisy, t, cond, batched_number):
        return residuals(x_noisy)


def _patched(rig: ForkRig, kind: str, control: bool) -> None:
    rig.p.sd_model.forge_objects.unet.model_options["transformer_options"].update(PATCH_KINDS[kind])
    if control:
        stub = Residuals()
        for entry in rig.cond + rig.uncond:
            entry["control"] = stub


@pytest.mark.parametrize("layers", ["m0", "d0", "u0", "d1,u2"])
@pytest.mark.parametrize(
    ("kind", "control"), [("none", True), ("freeu", False), ("freeu", True), ("deep-shrink", False)]
)
@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_forked_same_call_equals_the_separate_call(layers, kind, control, sigma, capsys):
    """Row-wise block patches and ControlNet residuals (other extensions' block modifiers keep the step on
    the separate call, by forge_others.py; the forward-level test shows the fork would carry them)."""
    params = SegParams(enabled=True, scale=3.0, blur_sigma=sigma, layers=layers)
    fast, slow = (ForkRig(params, fast=f, batch=2, extras=True) for f in (True, False))
    for rig in (fast, slow):
        _patched(rig, kind, control)
        rig.run.patch(rig.p)
    result = fast.step()
    torch.testing.assert_close(result, slow.step(), rtol=1e-9, atol=1e-9)
    assert fast.model.calls == [6]
    assert fast.seen == [4]  # the encoder ran once on the host's rows; the copies were made at the fork
    assert slow.model.calls == [4, 2]
    assert "same UNet call (forked from the conditional branch at" in capsys.readouterr().out
    plain = ForkRig(None, batch=2, extras=True)
    _patched(plain, kind, control)
    assert (result - plain.step()).abs().max() > 1e-4  # SEG moved it (little on a 2x1 grid after Deep Shrink)


def test_an_unknown_call_argument_keeps_the_full_copies(capsys):
    """Something the fork does not know in the call: the copies run through the whole UNet, as before."""
    rig = ForkRig(SegParams(enabled=True))
    rig.cond[0]["model_conds"]["extra_tensor"] = torch.zeros(1)
    rig.uncond[0]["model_conds"]["extra_tensor"] = torch.zeros(1)
    rig.run.patch(rig.p)
    rig.step()
    assert rig.seen == [3]
    assert "not forked: the UNet call carries 'extra_tensor'" in capsys.readouterr().out


def test_a_wrapped_unet_forward_is_not_forked(capsys):
    rig = ForkRig(SegParams(enabled=True))
    plain_forward = rig.unet.forward
    rig.unet.forward = lambda *a, **k: plain_forward(*a, **k)
    rig.run.patch(rig.p)
    rig.step()
    assert rig.seen == [3]
    assert "not forked: another extension wraps the UNet's forward" in capsys.readouterr().out
    assert "forward" in vars(rig.unet)


def test_an_error_in_the_forked_call_leaves_nothing_and_falls_back(capsys):
    rig = ForkRig(SegParams(enabled=True))

    def fails_on_the_bigger_batch(h, hsp, options):
        if h.shape[0] == 3:
            raise RuntimeError("boom")
        return h, hsp

    transformer_options = rig.p.sd_model.forge_objects.unet.model_options["transformer_options"]
    transformer_options["patches"] = {"output_block_patch": [fails_on_the_bigger_batch]}
    rig.run.patch(rig.p)
    result = rig.step()
    assert "forward" not in vars(rig.unet)
    assert "same-call path failed" in capsys.readouterr().out
    assert torch.isfinite(result).all()
    assert rig.model.calls == [3, 2, 1]  # the forked call, the host's call redone, the separate cond-only call


def test_the_ldm_patched_family_runs_each_block_through_forward_timestep_embed(monkeypatch):
    """ldm_patched's forward calls ``forward_timestep_embed(module, ...)`` with the video arguments instead of
    the module itself; the fork does the same for that family, with the same result."""
    calls = []

    def forward_timestep_embed(ts, x, emb, context=None, transformer_options={}, output_shape=None, **video):  # noqa: B006
        calls.append(video)
        return ts.forward(x, emb, context, transformer_options, output_shape)

    monkeypatch.setattr(standins_forge_unet, "forward_timestep_embed", forward_timestep_embed, raising=False)
    unet = IntegratedUNet2DConditionModel().eval()
    gen = torch.Generator().manual_seed(2)
    x, t, context = torch.randn(4, 4, 11, 7, generator=gen), torch.rand(4, generator=gen), torch.randn(4, 3, CONTEXT)
    outs = []
    for variant in (BACKEND, LDM_PATCHED):
        args = {"input": x, "c": {"transformer_options": _options("freeu", [1, 0])}}
        plan = plan_fork(unet, {IntegratedUNet2DConditionModel: variant}, ("input", 1), args, COND)
        with torch.no_grad():
            outs.append(
                forked_forward(
                    plan, _grow(x), _grow(t), _grow(context), transformer_options=_options("freeu", [1, 0, 0])
                )
            )
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    assert len(calls) == 11  # every block, each with the video arguments (None for an image UNet)
    assert calls[0] == {"time_context": None, "num_video_frames": None, "image_only_indicator": None}


def test_a_call_of_another_size_gets_the_stock_forward():
    """A wrapper that regrouped the rows (calls of another size than the plan's) gets the UNet's own forward."""
    unet = IntegratedUNet2DConditionModel().eval()
    x, t, context = torch.randn(4, 4, 11, 7), torch.rand(4), torch.randn(4, 3, CONTEXT)
    plan = plan_fork(unet, STOCK, ("middle", 0), {"input": x, "c": {}}, COND)
    with torch.no_grad(), forge_fork.forked(plan):
        out = unet(x[:2], t[:2], context[:2], transformer_options={})
    with torch.no_grad():
        torch.testing.assert_close(out, unet(x[:2], t[:2], context[:2], transformer_options={}), rtol=0, atol=0)
