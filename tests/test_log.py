"""Console lines: one ``[SEG]`` prefix, each on a line of its own, also while a progress bar is drawn."""

from __future__ import annotations

import io
import sys
import types
from typing import ClassVar

from seg_lib.log import log


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fake_tqdm(monkeypatch, bars: int) -> list[str]:
    written: list[str] = []

    class tqdm:  # the name the module exports
        _instances: ClassVar[set[object]] = {object() for _ in range(bars)}

        @staticmethod
        def write(line: str, file=None) -> None:
            written.append(line)
            (file or sys.stdout).write(line + "\n")

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=tqdm))
    return written


def test_a_line_is_prefixed_once(capsys, monkeypatch):
    _fake_tqdm(monkeypatch, bars=0)
    log("fast path, forked from the conditional branch at middle block 0")
    assert capsys.readouterr().out == "[SEG] fast path, forked from the conditional branch at middle block 0\n"


def test_into_a_log_file_a_running_bar_is_ended_first(capsys, monkeypatch):
    _fake_tqdm(monkeypatch, bars=1)
    log("skipping middle block 0")
    assert capsys.readouterr().out == "\n[SEG] skipping middle block 0\n"


def test_on_a_terminal_tqdm_writes_the_line_around_its_bars(monkeypatch):
    written = _fake_tqdm(monkeypatch, bars=1)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    log("separate extra UNet pass per step (the fast SEG setting is off)")
    assert written == ["[SEG] separate extra UNet pass per step (the fast SEG setting is off)"]
    assert terminal.getvalue() == "[SEG] separate extra UNet pass per step (the fast SEG setting is off)\n"
