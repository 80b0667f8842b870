"""A generation in which SEG ran on the CPU gives the C heap's free pages back; nothing else does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from seg_lib.core.params import SegParams
from seg_lib.host import adapter as adapter_module
from seg_lib.host.adapter import A1111Adapter, ForgeAdapter
from seg_lib.host.memory import _malloc_trim
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
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root)
    assert float(out.stdout.strip().splitlines()[-1]) > 150
