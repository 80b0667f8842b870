"""A generation in which SEG ran on the CPU gives the C heap's free pages back; nothing else does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from seg_lib.core.params import SegParams
from seg_lib.host import adapter as adapter_module
from seg_lib.host import memory as memory_module
from seg_lib.host.adapter import A1111Adapter, ForgeAdapter
from seg_lib.host.memory import _malloc_trim, give_back_free_heap, user_keeps_heap
from seg_lib.host.run import RUN_ATTRIBUTE
from tests.test_a1111_adapter import Rig
from tests.test_forge_adapter import ForgeRig


@pytest.fixture
def trims(monkeypatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(adapter_module, "give_back_free_heap", lambda: calls.append(1) or True)
    return calls


def test_a1111_generation_with_seg_on_the_cpu_ends_with_one_trim(trims):
    rig = Rig(SegParams(enabled=True))
    rig.step()
    A1111Adapter().finish(rig.p)
    assert trims == [1]
    assert getattr(rig.p, RUN_ATTRIBUTE) is None


def test_forge_generation_with_seg_on_the_cpu_ends_with_one_trim(trims):
    rig = ForgeRig(SegParams(enabled=True))
    rig.run.patch(rig.p)
    rig.step()
    ForgeAdapter("forge").finish(rig.p)
    assert trims == [1]


def test_no_trim_when_seg_never_smoothed_a_row(trims):
    off = Rig(None)  # SEG off: no run at all
    off.step()
    A1111Adapter().finish(off.p)
    outside = Rig(SegParams(enabled=True, start=0.5, end=1.0))  # the one step is outside SEG's window
    outside.step()
    A1111Adapter().finish(outside.p)
    assert trims == []


@pytest.mark.skipif(_malloc_trim() is None, reason="glibc's malloc_trim only")
def test_the_trim_returns_freed_heap_pages():
    # In a fresh interpreter: 200 MiB of 1 MiB tensors land on the heap (freeing an 8 MiB mmapped block first
    # raises glibc's mmap threshold above 1 MiB), a live last block keeps glibc from trimming by itself.
    script = textwrap.dedent(
        """
        import os, torch
        from seg_lib.host.memory import give_back_free_heap
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        big = torch.empty(8 * 2**20, dtype=torch.uint8)
        del big
        blocks = [torch.ones(2**18) for _ in range(200)]
        last = blocks[-1]
        del blocks
        held = rss()
        assert give_back_free_heap()
        print(held - rss())
        """
    )
    root = Path(__file__).resolve().parent.parent
    environ = {k: v for k, v in os.environ.items() if k not in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}
    environ.pop("GLIBC_TUNABLES", None)  # glibc's defaults: the trim runs
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root, env=environ
    )
    assert float(out.stdout.strip().splitlines()[-1]) > 150


@pytest.mark.parametrize(
    ("environ", "keeps"),
    [
        ({}, False),
        ({"MALLOC_ARENA_MAX": "1"}, False),  # how many arenas, not whether freed memory is kept
        ({"MALLOC_TRIM_THRESHOLD_": "17179869184"}, True),
        ({"MALLOC_MMAP_THRESHOLD_": "8589934592"}, True),
        ({"MALLOC_TRIM_THRESHOLD_": ""}, False),  # set empty: glibc ignores it
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=17179869184"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=8589934592"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, False),
    ],
)
def test_a_user_who_told_glibc_to_keep_freed_memory_is_respected(environ, keeps):
    assert user_keeps_heap(environ) is keeps


def test_no_trim_when_the_user_keeps_the_heap(monkeypatch):
    called: list[int] = []
    monkeypatch.setattr(memory_module, "_malloc_trim", lambda: lambda pad: called.append(pad) or 1)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    assert give_back_free_heap() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert give_back_free_heap() is True
    assert called == [0]
