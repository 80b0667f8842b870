"""What SEG uses of a Forge-family host (new Forge and its Forge 2 forks, the ``ldm_patched`` family), and what
that host does where SEG meets it, decided once from the running host's own code (``reading.py``).

The forks differ exactly where SEG plugs in. reForge calls pre-CFG functions with one dict *after* the UNet
call and no longer runs block inner modifiers (its SpatialTransformer writes ``activations_shape`` instead);
its cond batching multiplies the memory estimate by 1.5 and passes the conds' shapes; its UNet forward is
ComfyUI's. Forge, Forge Classic and ersatzForge call pre-CFG functions positionally before the call. Each of
these is read from the host's functions, not assumed from which package imported; what cannot be read is
left out (the same-call path is not armed, the fork not used, SEG skipped with one line), never guessed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from seg_lib.host import forge_fork, reading
from seg_lib.host.reading import BatchTest
from seg_lib.settings import fast_path_enabled

# Where an attn1 patch finds the token grid of its layer in this call (the patch's extra options):
INNER_MODIFIER = "inner_modifier"  # SEG's block inner modifier writes it just before each SpatialTransformer
ACTIVATIONS_SHAPE = "activations_shape"  # the host's SpatialTransformer writes its input's shape


@dataclass(frozen=True)
class Conventions:
    """How the running host calls what SEG installs (the defaults are new Forge's)."""

    pre_cfg: str | None = "positional"  # reading.pre_cfg_convention: "positional", "args" or None (unknown)
    calc_hook: bool = False  # the sampling function hands the conds to ``sampler_calc_cond_batch_function``
    grid: str | None = INNER_MODIFIER  # INNER_MODIFIER, ACTIVATIONS_SHAPE or None (no grid to be had)
    batch: BatchTest | None = field(default_factory=BatchTest)  # the host's batching test (None: unknown)

    @property
    def arming(self) -> str | None:
        """Where the same-call path is armed before the host's UNet call: ``"pre_cfg"``, ``"calc"`` or None."""
        if self.pre_cfg == "positional":
            return "pre_cfg"
        if self.calc_hook:
            return "calc"
        return None


def read_conventions(sampling: Any, batching: Any, embed: list[Any], transformer: Any) -> Conventions:
    """The conventions of a host from its functions: ``sampling`` (the loop over pre-CFG functions),
    ``batching`` (the cond batching with its memory test), ``embed`` (what runs the layers of a block:
    inner modifiers?) and ``transformer`` (``SpatialTransformer.forward``)."""
    inner = any(reading.uses_key(function, "block_inner_modifiers") for function in embed)
    grid = (
        INNER_MODIFIER if inner else ACTIVATIONS_SHAPE if reading.uses_key(transformer, "activations_shape") else None
    )
    return Conventions(
        pre_cfg=reading.pre_cfg_convention(sampling),
        calc_hook=bool(reading.uses_key(sampling, "sampler_calc_cond_batch_function")),
        grid=grid,
        batch=reading.batch_test(batching),
    )


@dataclass
class ForgeHost:
    """The host pieces the adapter uses (tests pass stand-ins)."""

    calc_cond_uncond_batch: Any
    attention: Any  # attention(q, k, v, heads) -> [B, N, heads * dim_head]
    free_memory: Any = None  # free_memory(device) -> bytes: the host's memory management; None: never enlarge
    opts: Any = None  # the WebUI's shared.opts
    unet_forwards: Mapping[type, forge_fork.Variant] | None = None  # the stock UNet class(es) the fork knows
    conventions: Conventions = field(default_factory=Conventions)
    calc_cond_batch: Any = None  # calc_cond_batch(model, conds, x, timestep, model_options) (the "calc" arming)
    not_forked: str = ""  # why the host's UNet forward is not forked (a version SEG does not know)

    @staticmethod
    def load(host: str) -> ForgeHost:
        return _load(host)

    def fast_path(self) -> bool:
        return fast_path_enabled(self.opts)

    def fits(
        self, model: Any, shape: tuple[int, ...], device: torch.device, cond_shapes: dict[str, list] | None = None
    ) -> bool:
        """Whether a UNet call on a batch of ``shape`` fits, by the host's own batching test."""
        test = self.conventions.batch
        if self.free_memory is None or test is None or not hasattr(model, "memory_required"):
            return False
        if test.cond_shapes:
            estimate = model.memory_required(list(shape), cond_shapes=cond_shapes or {})
        else:
            estimate = model.memory_required(list(shape))
        return estimate * test.factor < self.free_memory(device)


@functools.cache
def _load(host: str) -> ForgeHost:
    """Read once per process: the host's code does not change while it runs."""
    from modules.shared import opts

    forwards, not_forked = forge_fork.stock_forwards(host)
    if host == "forge":
        from backend import memory_management
        from backend.attention import attention_function
        from backend.nn import unet
        from backend.sampling import sampling_function as sampling

        conventions = read_conventions(
            sampling.sampling_function_inner,
            sampling.calc_cond_uncond_batch,
            [unet.TimestepEmbedSequential.forward],
            unet.SpatialTransformer.forward,
        )
        return ForgeHost(
            sampling.calc_cond_uncond_batch,
            attention_function,
            memory_management.get_free_memory,
            opts,
            forwards,
            conventions,
            getattr(sampling, "calc_cond_batch", None),
            not_forked,
        )
    from ldm_patched.ldm.modules import attention
    from ldm_patched.ldm.modules.diffusionmodules import openaimodel
    from ldm_patched.modules import model_management, samplers

    embed = [getattr(openaimodel, "forward_timestep_embed", None), openaimodel.TimestepEmbedSequential.forward]
    conventions = read_conventions(
        samplers.sampling_function,
        getattr(samplers, "_calc_cond_batch", samplers.calc_cond_uncond_batch),  # reForge batches there
        [function for function in embed if function is not None],
        attention.SpatialTransformer.forward,
    )
    return ForgeHost(
        samplers.calc_cond_uncond_batch,
        attention.optimized_attention,
        model_management.get_free_memory,
        opts,
        forwards,
        conventions,
        getattr(samplers, "calc_cond_batch", None),
        not_forked,
    )
