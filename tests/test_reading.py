"""``seg_lib.host.reading``: what SEG reads from a host's code, on small functions written for the purpose and on
the Forge stand-ins (``tests/standins_forge*.py``, written from Forge main's source)."""

from __future__ import annotations

import importlib.util
import inspect
import sys

import pytest

from seg_lib.host import reading
from seg_lib.host.forge_fork import BACKEND, read_forward
from seg_lib.host.forge_host import INNER_MODIFIER, Conventions, read_conventions
from seg_lib.host.reading import BatchTest
from tests import standins_forge, standins_forge_unet


# -- the pre-CFG convention --------------------------------------------------------------------------------------
def forge_style(model, x, timestep, uncond, cond, cond_scale, model_options):
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond, x, timestep, model_options = fn(model, cond, uncond, x, timestep, model_options)
    return x


def comfy_style(model, x, timestep, uncond, cond, cond_scale, model_options):
    out = (cond, uncond)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        args = {"conds": [cond, uncond], "conds_out": out, "input": x, "model_options": model_options}
        out = fn(args)
        x = args["input"]
    return out


def keywords_style(model, x, timestep, uncond, cond, cond_scale, model_options):
    for fn in model_options.get("sampler_pre_cfg_function", []):
        x = fn(model=model, x=x)
    return x


def three_arguments(model, x, timestep, uncond, cond, cond_scale, model_options):
    for fn in model_options.get("sampler_pre_cfg_function", []):
        x = fn(model, x, timestep)
    return x


def no_loop(model, x, timestep, uncond, cond, cond_scale, model_options):
    return model_options.get("sampler_pre_cfg_function", [])


def other_list(model, x, timestep, uncond, cond, cond_scale, model_options):
    for fn in model_options.get("sampler_post_cfg_function", []):
        x = fn(x)
    return x


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        (forge_style, "positional"),
        (comfy_style, "args"),
        (keywords_style, None),
        (three_arguments, None),
        (no_loop, None),
        (other_list, None),
    ],
)
def test_pre_cfg_convention(function, expected):
    assert reading.pre_cfg_convention(function) == expected


# -- the batching test ---------------------------------------------------------------------------------------------
def plain_test(model, shape, free):
    return model.memory_required(shape) < free


def comfy_test(model, shape, free, cond_shapes):
    to_batch = [0]
    if model.memory_required(shape, cond_shapes=cond_shapes) * 1.5 < free:
        to_batch = [0, 1]
    return to_batch


def factor_first(model, shape, free):
    return 2 * model.memory_required(shape) < free


def two_tests(model, shape, free):
    return model.memory_required(shape) < free and model.memory_required([1, *shape[1:]]) < free


def unknown_keyword(model, shape, free):
    return model.memory_required(shape, dtype="fp16") < free


def no_test(model, shape, free):
    return free > 0


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        (plain_test, BatchTest(1.0, False)),
        (comfy_test, BatchTest(1.5, True)),
        (factor_first, BatchTest(2.0, False)),
        (two_tests, None),
        (unknown_keyword, None),
        (no_test, None),
    ],
)
def test_batch_test(function, expected):
    assert reading.batch_test(function) == expected


# -- fingerprints --------------------------------------------------------------------------------------------------
def helper(h):
    return h


def original(x, transformer_options):
    """A forward of some version."""
    patches = transformer_options.get("patches", {})
    for p in patches.get("input_block_patch", []):
        x = p(x, transformer_options)
    return helper(x)


def renamed(h, opts):
    """Another docstring, other local names, other layout: the same reads and calls."""
    found = opts.get("patches", {})
    for patch in found.get("input_block_patch", []):
        h = patch(h, opts)

    return helper(h)


def with_a_new_key(x, transformer_options):
    """A forward of some version."""
    patches = transformer_options.get("patches", {})
    for p in patches.get("input_block_patch", []):
        x = p(x, transformer_options)
    transformer_options["newer_key"] = True
    return helper(x)


def with_a_new_call(x, transformer_options):
    """A forward of some version."""
    patches = transformer_options.get("patches", {})
    for p in patches.get("input_block_patch", []):
        x = p(x, transformer_options)
    return helper(plain_test(None, x, 0) or x)


def test_fingerprint_is_what_a_function_reads_and_calls():
    module = sys.modules[__name__]
    first = reading.fingerprint(original, module)
    assert isinstance(first, str)
    assert len(first) == 12
    assert reading.fingerprint(renamed, module) == first
    assert reading.fingerprint(with_a_new_key, module) != first
    assert reading.fingerprint(with_a_new_call, module) != first
    assert reading.strings(original) == {"patches", "input_block_patch"}  # the docstring is prose
    assert reading.called_names(with_a_new_call, module) == {"helper", "plain_test"}


def test_an_unreadable_function_answers_none():
    for function in (len, print, dict.get):
        assert reading.tree(function) is None
        assert reading.fingerprint(function) is None
        assert reading.pre_cfg_convention(function) is None
        assert reading.batch_test(function) is None
        assert reading.uses_key(function, "patches") is None
    assert not reading.reads_attribute(len, "_forward")


# -- the Forge stand-ins --------------------------------------------------------------------------------------------
def test_the_forge_standins_read_as_forge_main():
    conventions = read_conventions(
        standins_forge.sampling_function_inner,
        standins_forge.calc_cond_uncond_batch,
        [standins_forge_unet.TimestepEmbedSequential.forward],
        standins_forge_unet.SpatialTransformer.forward,
    )
    assert conventions == Conventions()
    assert (conventions.pre_cfg, conventions.calc_hook, conventions.grid) == ("positional", False, INNER_MODIFIER)
    assert conventions.batch == BatchTest(1.0, False)
    assert conventions.arming == "pre_cfg"
    cls = standins_forge_unet.IntegratedUNet2DConditionModel
    assert read_forward(cls, standins_forge_unet) is BACKEND
    assert "is not loaded" in read_forward(cls, None)


def test_a_forward_reading_one_more_key_is_a_version_seg_does_not_know(tmp_path):
    """A copy of the stand-in module, the same but for one more key the UNet forward reads."""
    source = inspect.getsource(standins_forge_unet)
    anchor = '        transformer_options["transformer_index"] = 0\n'
    assert source.count(anchor) == 1
    newer = source.replace(anchor, anchor + '        _ = transformer_options.get("newer_key")\n')
    for name, text in (("same", source), ("newer", newer)):
        path = tmp_path / f"forge_unet_{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"forge_unet_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found = read_forward(module.IntegratedUNet2DConditionModel, module)
        if name == "same":
            assert found is BACKEND
        else:
            assert found == (
                "its UNet forward (forge_unet_newer.IntegratedUNet2DConditionModel) is a version SEG does not know"
            )
