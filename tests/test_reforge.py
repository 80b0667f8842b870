"""SEG on reForge, against stand-ins written from its source (``tests/standins_reforge.py``): the host's
conventions read from its functions (pre-CFG with one dict after the UNet call, the cond-batch hook where
SEG arms the same call, the grid from ``activations_shape``, the 1.5 batching factor with the conds'
shapes, ComfyUI's ``_forward`` forked), checked in float64 against a separate smoothed pass."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from seg_lib.core.params import BY_INFOTEXT, SegParams, to_infotext
from seg_lib.host import reading
from seg_lib.host.forge import SMOOTH_ROWS, ForgeHost, ForgeRun
from seg_lib.host.forge_fork import COMFY, KNOWN_FORWARDS, forked_forward, plan_fork, read_forward
from seg_lib.host.forge_host import ACTIVATIONS_SHAPE, INNER_MODIFIER, Conventions, read_conventions
from seg_lib.host.reading import BatchTest
from seg_lib.host.run import RUN_ATTRIBUTE, on_cfg_denoiser
from tests import standins_reforge as reforge
from tests import standins_reforge_unet
from tests.standins import CONTEXT, WIDTH, make_p
from tests.standins_forge import forge_attention
from tests.test_a1111_adapter import BLOCKS, reference_smoothing

pytestmark = pytest.mark.usefixtures("float64")

ADM = 5
CONVENTIONS = read_conventions(
    reforge.sampling_function,
    reforge._calc_cond_batch,
    [reforge.forward_timestep_embed, reforge.TimestepEmbedSequential.forward],
    reforge.SpatialTransformer.forward,
)
STOCK = {reforge.UNetModel: read_forward(reforge.UNetModel, reforge)}
SEPARATE = "separate extra UNet call"


def row_wise_patches() -> dict:
    """An input block patch (Deep-Shrink-like scaling) and an output block patch (FreeU-like), per row."""

    def input_block_patch(h, options):
        return h * 0.9 + 0.05 * torch.tanh(h) if options["block"] == ("input", 2) else h

    def output_block_patch(h, hsp, options):
        return h * (1 + 0.2 * h.mean(1, keepdim=True).tanh()), hsp * 0.8

    return {"input_block_patch": [input_block_patch], "output_block_patch": [output_block_patch]}


class ReForgeRig:
    """One generation on the reForge stand-ins (``extras``: an inpainting c_concat and an SDXL y per image)."""

    def __init__(self, params, *, fast=True, batch=1, extras=False, height=11, width=7, seed=0, patches=None):
        torch.manual_seed(seed)
        self.unet = reforge.UNetModel(in_channels=8 if extras else 4, adm_in=ADM if extras else None).eval()
        self.model = reforge.BaseModel(self.unet)
        self.base = reforge.UnetPatcher(self.model)
        self.options = {"transformer_options": {"patches": patches}} if patches else {}
        self.base.model_options["transformer_options"].update(self.options.get("transformer_options", {}))
        self.p = make_p()
        self.p.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=self.base))
        self.seen: list[int] = []  # the rows the encoder's first layer runs on
        self.unet.input_blocks[0][0].register_forward_pre_hook(lambda _m, a: self.seen.append(a[0].shape[0]))
        self.run = None
        if params is not None:
            self.p.extra_generation_params.update(to_infotext(params))
            memory = self.model.memory.get_free_memory
            opts = SimpleNamespace(seg_fast_path=fast)
            host = ForgeHost(
                reforge.calc_cond_uncond_batch, forge_attention, memory, opts,
                unet_forwards=STOCK, conventions=CONVENTIONS, calc_cond_batch=reforge.calc_cond_batch,
            )  # fmt: skip
            self.run = ForgeRun(self.p, params, host=host)
            setattr(self.p, RUN_ATTRIBUTE, self.run)
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 4, height, width, generator=gen)
        self.sigma = torch.linspace(1.5, 2.0, batch)
        extra = {"c_concat": torch.randn(batch, 4, height, width, generator=gen)} if extras else {}
        self.cond, self.uncond = ([self.entry(gen, extra, extras, uuid)] for uuid in ("c", "u"))

    def entry(self, gen, extra, adm, uuid):
        conds = {"c_crossattn": torch.randn(self.x.shape[0], 3, CONTEXT, generator=gen), **extra}
        if adm:
            conds["y"] = torch.randn(self.x.shape[0], ADM, generator=gen)
        return {"model_conds": conds, "uuid": uuid}

    def step(self, step=0, steps=1, cond_scale=5.0):
        params = SimpleNamespace(denoiser=SimpleNamespace(p=self.p), sampling_step=step, total_sampling_steps=steps)
        on_cfg_denoiser(SimpleNamespace(**vars(params), x=self.x))
        with torch.no_grad():
            unet = self.p.sd_model.forge_objects.unet
            return reforge.forge_sample(unet, self.x, self.sigma, self.uncond, self.cond, cond_scale)

    def predict(self, names=(), sigma=math.inf, options=None):
        """The cond prediction on a fresh model, the named layers blurred on their real grid."""
        model, options = reforge.BaseModel(self.unet), options or self.options
        with torch.no_grad(), reference_smoothing(self.unet, list(names), sigma):
            return reforge.calc_cond_uncond_batch(model, self.cond, None, self.x, self.sigma, options)[0]

    def plain(self, cond_scale=5.0, unet=None):
        unet = unet or SimpleNamespace(model=reforge.BaseModel(self.unet), model_options=self.options)
        with torch.no_grad():
            return reforge.forge_sample(unet, self.x, self.sigma, self.uncond, self.cond, cond_scale)


def test_reading_the_standins_gives_reforges_conventions_and_comfyuis_forward():
    expected = Conventions(pre_cfg="args", calc_hook=True, grid=ACTIVATIONS_SHAPE, batch=BatchTest(1.5, True))
    assert expected == CONVENTIONS
    assert CONVENTIONS.arming == "calc"
    assert reading.fingerprint(reforge.UNetModel._forward, standins_reforge_unet) == "abad385ee7ea"
    assert KNOWN_FORWARDS["abad385ee7ea"][0] is COMFY
    assert STOCK[reforge.UNetModel] is COMFY


@pytest.mark.parametrize(("layers", "names"), [("m0", ["m0"]), ("d0", ["d0"]), ("u0", ["u0"]), ("d1,u2", ["d1", "u2"])])
@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_forked_same_call_equals_the_separate_call(layers, names, sigma, capsys):
    params = SegParams(enabled=True, scale=3.0, blur_sigma=sigma, layers=layers)
    fast, slow = (ReForgeRig(params, fast=f, batch=2, extras=True) for f in (True, False))
    for rig in (fast, slow):
        rig.run.patch(rig.p)
    result = fast.step()
    assert fast.model.calls == [6]  # 2 images x (uncond, cond, the smoothed copy) in the host's one call
    assert fast.seen == [4]  # the encoder ran once, on the host's rows; the copies were made at the fork
    torch.testing.assert_close(result, slow.step(), rtol=1e-9, atol=1e-9)
    assert slow.model.calls == [4, 2]
    delta = fast.predict() - fast.predict(names, sigma)
    assert delta.abs().max() > 1e-4  # the blur acts (little on the 3x2 middle grid)
    torch.testing.assert_close(result, fast.plain() + 3.0 * delta, rtol=1e-9, atol=1e-9)
    assert "same UNet call (forked from the conditional branch at" in capsys.readouterr().out


@pytest.mark.parametrize("fast", [True, False])
def test_cfg_one(fast):
    rig = ReForgeRig(SegParams(enabled=True, scale=2.0, layers="d0,m0"), fast=fast)
    rig.run.patch(rig.p)
    result = rig.step(cond_scale=1.0)
    assert rig.seen == ([1] if fast else [1, 1])  # fast: one call, forked at d0
    cond = rig.predict()
    torch.testing.assert_close(result, cond + 2.0 * (cond - rig.predict(["d0", "m0"])), rtol=1e-9, atol=1e-9)
    assert rig.model.calls == ([2] if fast else [1, 1])  # no uncond at CFG 1: cond and its copy, or cond twice


def test_the_bigger_call_is_sized_by_reforges_own_test(capsys):
    """``memory_required(shape, cond_shapes=...) * 1.5 < free``, asked with the conds' shapes of one more chunk."""
    rig = ReForgeRig(SegParams(enabled=True))
    three = rig.model.memory_required([3, 4, 11, 7])
    rig.model.memory.free = 1.5 * three  # the host's 2 rows fit; SEG's 3 rows do not, by the host's factor
    rig.run.patch(rig.p)
    rig.step()
    assert rig.model.calls == [2, 1]
    assert "(not enough free memory for the bigger batch)" in capsys.readouterr().out
    rig.model.memory.free, rig.model.calls, rig.model.asked = 1.5 * three + 1, [], []
    rig.step()
    assert rig.model.calls == [3]
    context = torch.Size([1, 3, CONTEXT])
    assert rig.model.asked[-2] == ([2, 4, 11, 7], {"c_crossattn": [context] * 2})  # the host's own test
    assert rig.model.asked[-1] == ([3, 4, 11, 7], {"c_crossattn": [context] * 3})  # SEG's, for one chunk more


@pytest.mark.parametrize("name", ["m0", "d0", "u0"])
def test_emb_and_block_patches_reach_the_copies(name):
    """Forward level: the forked ``_forward`` gives the host's rows what the stock one does, and the copies
    what a separate smoothed cond pass with the same emb, input and output block patches gives."""
    unet, gen = reforge.UNetModel().eval(), torch.Generator().manual_seed(4)
    x, t = torch.randn(4, 4, 11, 7, generator=gen), torch.rand(4, generator=gen) * 5
    context, cond = torch.randn(4, 3, CONTEXT, generator=gen), slice(2, 4)

    def emb_patch(emb, channels, options):
        assert channels == WIDTH
        return emb * 1.3 + 0.1 * torch.sin(emb)

    patches = {**row_wise_patches(), "emb_patch": [emb_patch]}
    with torch.no_grad():
        host = unet(x, t, context, transformer_options={"patches": patches, "cond_or_uncond": [1, 0]})
        with reference_smoothing(unet, [name], 2.0):
            seg = unet(x[cond], t[cond], context[cond], transformer_options={"patches": patches})
        bare = unet(x[cond], t[cond], context[cond], transformer_options={})
        args = {"input": x, "c": {"transformer_options": {"patches": patches, "cond_or_uncond": [1, 0]}}}
        plan = plan_fork(unet, STOCK, BLOCKS[name], args, cond, (SMOOTH_ROWS,))
        grown = [torch.cat([v, v[cond]]) for v in (x, t, context)]
        enlarged = {"patches": patches, "cond_or_uncond": [1, 0, 0], SMOOTH_ROWS: slice(4, 6)}
        with reference_smoothing(unet, [name], 2.0, rows=2):
            out = forked_forward(plan, *grown, transformer_options=enlarged)
    torch.testing.assert_close(out[:4], host, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[4:], seg, rtol=1e-9, atol=1e-9)
    assert (host[cond] - bare).abs().max() > 1e-3  # the patches act
    assert (out[4:] - host[cond]).abs().max() > 1e-4  # and so does the blur


def test_row_wise_block_patches_ride_in_the_forked_call():
    """The block patches see the host's bookkeeping before the fork (at input 3) and the bigger batch's after."""
    patches, seen = row_wise_patches(), []
    for kind in ("input_block_patch", "output_block_patch"):
        (patch,) = patches[kind]

        def recording(*args, patch=patch):
            seen.append((args[-1]["block"], args[-1]["uuids"], args[-1]["cond_or_uncond"]))
            return patch(*args)

        patches[kind] = [recording]
    params = SegParams(enabled=True, scale=3.0, blur_sigma=2.0, layers="d1,u2")
    fast, slow = (ReForgeRig(params, fast=f, batch=2, patches=patches) for f in (True, False))
    for rig in (fast, slow):
        rig.run.patch(rig.p)
    result = fast.step()
    assert (fast.model.calls, fast.seen) == ([6], [4])
    assert seen[2] == (("input", 2), ["u", "c"], [1, 0])
    assert seen[5] == (("output", 0), ["u", "c", "c"], [1, 0, 0])
    torch.testing.assert_close(result, slow.step(), rtol=1e-9, atol=1e-9)
    delta = fast.predict() - fast.predict(["d1", "u2"], 2.0)
    torch.testing.assert_close(result, fast.plain() + 3.0 * delta, rtol=1e-9, atol=1e-9)
    assert (fast.plain() - ReForgeRig(None, batch=2).plain()).abs().max() > 1e-3


def test_a_foreign_emb_patch_keeps_the_step_on_the_separate_call(capsys):
    def emb_patch(emb, channels, options):
        return emb * 1.3

    rig = ReForgeRig(SegParams(enabled=True), patches={"emb_patch": [emb_patch]})
    rig.run.patch(rig.p)
    result = rig.step()
    assert rig.model.calls == [2, 1]
    torch.testing.assert_close(result, rig.plain() + 3.0 * (rig.predict() - rig.predict(["m0"])), rtol=1e-9, atol=1e-9)
    assert "(another extension's emb_patch (test_reforge.emb_patch))" in capsys.readouterr().out


@pytest.mark.parametrize("fast", [True, False])
def test_the_grid_is_read_from_activations_shape(fast, capsys):
    """11x7 latent: the layers work on 11x7, 6x4 and 3x2 grids, which only activations_shape tells SEG (reForge
    runs no block inner modifiers, where SEG sees the grid on Forge)."""
    rig = ReForgeRig(SegParams(enabled=True, blur_sigma=1.5, layers="d0,d1,m0"), fast=fast)
    rig.run.patch(rig.p)
    expected = rig.plain() + 3.0 * (rig.predict() - rig.predict(["d0", "d1", "m0"], 1.5))
    torch.testing.assert_close(rig.step(), expected, rtol=1e-9, atol=1e-9)
    assert "skipping" not in capsys.readouterr().out
    blind = ReForgeRig(SegParams(enabled=True, layers="d0"), fast=fast)  # as if SEG read Forge's convention
    blind.run.host.conventions = dataclasses.replace(CONVENTIONS, grid=INNER_MODIFIER)
    blind.run.patch(blind.p)
    torch.testing.assert_close(blind.step(), blind.plain(), rtol=1e-12, atol=1e-12)
    assert "skipping input block 1: the shape of its input was not seen" in capsys.readouterr().out


@pytest.mark.parametrize("fast", [True, False])
def test_an_inpaint_pre_cfg_replacing_x_keeps_seg_guiding(fast, capsys):
    """reForge calls pre-CFG functions after the UNet call; the inpaint preprocessor's puts other latents in
    ``args["input"]``, which the post-CFG functions then get. The step is still the step's own (SEG's hook
    saw it begin), and its SEG term compares the cond rows with their smoothed copy on the same latents: the
    separate call runs on the latents of the host's call, not on the replaced ones."""
    rig = ReForgeRig(SegParams(enabled=True, layers="d0,m0"), fast=fast)
    gen = torch.Generator().manual_seed(11)
    latent, noise = torch.randn(rig.x.shape, generator=gen), torch.randn(rig.x.shape, generator=gen)
    mask = torch.zeros_like(rig.x[:, :1])
    mask[..., 3:8, 2:6] = 1.0
    rig.base.set_model_sampler_pre_cfg_function(reforge.inpaint_pre_cfg(latent, mask, noise))
    seen = []
    rig.base.set_model_sampler_post_cfg_function(lambda args: seen.append(args["input"]) or args["denoised"])
    rig.run.patch(rig.p)
    rig.run.begin_batch()
    result = rig.step()
    assert not torch.equal(seen[0], rig.x)  # the post-CFG functions got the replaced latents
    assert rig.model.calls == ([3] if fast else [2, 1])
    expected = rig.plain() + 3.0 * (rig.predict() - rig.predict(["d0", "m0"]))
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)
    assert rig.p.extra_generation_params == to_infotext(rig.run.params)  # the step was guided
    rig.run.end_batch()
    assert "no step was guided" not in capsys.readouterr().out


@pytest.mark.parametrize("fast", [True, False])
def test_references_nested_call_is_neither_guided_nor_joined(fast, capsys):
    rig = ReForgeRig(SegParams(enabled=True), fast=fast)
    layers = [(part, index, t) for part, index in (("input", 1), ("input", 3), ("middle", 0)) for t in range(2)]
    layers += [("output", index, t) for index in (0, 2, 4) for t in range(2)]
    reference_latent = torch.randn(rig.x.shape, generator=torch.Generator().manual_seed(9))
    reference = reforge.ReferenceLike(rig.base, reference_latent, layers)
    rig.run.patch(rig.p)
    result = rig.step()
    assert rig.model.calls == [1, 2, 1]  # the recording (cond only, CFG 1), the host's call, SEG's separate one

    bare = reforge.UnetPatcher(reforge.BaseModel(rig.unet))
    bare_reference = reforge.ReferenceLike(bare, reference_latent, layers)
    plain = rig.plain(unet=bare)
    for key, (k, v) in reference.recorded.items():  # the recording is the one the bare host makes
        torch.testing.assert_close((k, v), bare_reference.recorded[key], rtol=0, atol=0)
    delta = rig.predict(options=bare.model_options) - rig.predict(["m0"], options=bare.model_options)
    assert delta.abs().max() > 1e-4
    torch.testing.assert_close(result, plain + 3.0 * delta, rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    if fast:
        assert f"{SEPARATE} (another extension replaces attn1 (standins_reforge.attn1_proc" in out
    assert "failed" not in out


def test_a_diffusion_model_wrapper_keeps_the_step_on_the_separate_call(capsys):
    seen = []

    def counting_wrapper(executor, x, *args, **kwargs):
        seen.append(x.shape[0])
        return executor(x, *args, **kwargs) * 0.9

    rig = ReForgeRig(SegParams(enabled=True))
    registry = {"wrappers": {reforge.DIFFUSION_MODEL: {"counting": [counting_wrapper]}}}
    rig.base.model_options["transformer_options"].update(registry)
    rig.run.patch(rig.p)
    result = rig.step()
    assert (seen, rig.model.calls) == ([2, 1], [2, 1])  # the wrapper saw the host's call, then SEG's
    options = {"transformer_options": registry}
    expected = rig.plain(unet=SimpleNamespace(model=reforge.BaseModel(rig.unet), model_options=options))
    expected = expected + 3.0 * (rig.predict(options=options) - rig.predict(["m0"], options=options))
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)
    assert f"{SEPARATE} (another extension's diffusion_model wrapper (test_reforge.counting_wrapper))" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("fast", [True, False])
def test_images_claim_seg_only_after_a_guided_step(fast, capsys):
    params = SegParams(enabled=True, start=0.5, end=1.0)
    rig = ReForgeRig(params, fast=fast)
    rig.run.patch(rig.p)
    rig.run.begin_batch()
    claims = []
    for step in range(4):
        rig.step(step=step, steps=4)
        claims.append(any(key in rig.p.extra_generation_params for key in BY_INFOTEXT))
    assert claims == [False, False, True, True]
    assert rig.p.extra_generation_params == to_infotext(params)
    rig.run.end_batch()
    assert "no step was guided" not in capsys.readouterr().out


def token_merging() -> dict:
    """ToMe-like attn1 patches: every other query token kept, the attention's output spread back."""

    def merge(n, context, value, extra):
        return n[:, ::2], context, value

    def unmerge(n, extra):
        return n.repeat_interleave(2, dim=1)[:, : extra["activations_shape"][2] * extra["activations_shape"][3]]

    return {"attn1_patch": [merge], "attn1_output_patch": [unmerge]}


@pytest.mark.parametrize("fast", [True, False])
def test_a_generation_with_every_layer_skipped_claims_nothing(fast, capsys):
    rig = ReForgeRig(SegParams(enabled=True, layers="d0,m0"), fast=fast, patches=token_merging())
    rig.run.patch(rig.p)
    for _batch in range(2):
        rig.run.begin_batch()
        for step in range(2):
            torch.testing.assert_close(rig.step(step=step, steps=2), rig.plain(), rtol=1e-12, atol=1e-12)
        assert not set(BY_INFOTEXT) & set(rig.p.extra_generation_params)
        rig.run.end_batch()
    out = capsys.readouterr().out
    assert out.count("no step was guided") == 2  # one line for each batch that claims nothing
    assert "no step was guided (the selected layers were skipped: skipping middle block 0 on the steps where " in out
    assert "its 3 tokens per row are not the 3x2 grid it works on" in out
