"""The rows benchmark times the hosts' one-chunk attention, and its cases compute the same rows."""

from __future__ import annotations

import torch

from seg_lib.bench_rows import CASES, layer, measure, one_chunk_attention, report


def test_one_chunk_attention_is_attention() -> None:
    q, k_t, v = (t.double() for t in layer(2, 3, 20, 8))
    expected = torch.softmax(q @ k_t / 8**0.5, dim=-1) @ v
    assert torch.allclose(one_chunk_attention(q, k_t, v), expected, atol=1e-12)


def test_two_plus_one_rows_are_the_three_rows() -> None:
    # what the separate pass runs (2 rows, then 1) is the same work as the fast path's one 3-row batch
    heads, tokens, dim = 4, 16, 8
    q, k_t, v = layer(3, heads, tokens, dim)
    together = one_chunk_attention(q, k_t, v)
    two = 2 * heads  # the first two rows' heads
    split = torch.cat(
        [one_chunk_attention(q[:two], k_t[:two], v[:two]), one_chunk_attention(q[two:], k_t[two:], v[two:])]
    )
    assert torch.allclose(together, split, atol=1e-6)


def test_measure_and_report_per_row() -> None:
    results = measure(heads=2, tokens=32, dim=8, reps=2)
    assert list(results) == list(CASES)
    assert all(len(values) == 2 and all(seconds > 0 for seconds, _ in values) for values in results.values())
    lines = report({"2 rows": [(1.0, 10), (3.0, 30)], "3 rows": [(3.0, 0)], "2 + 1 rows": [(6.0, 4)]})
    assert lines[0].startswith("2 rows: 1.000 s per row (median 2.000 s; each 1.000, 3.000); 20 minor faults")
    assert lines[1].startswith("3 rows: 1.000 s per row")
    assert lines[2].startswith("2 + 1 rows: 2.000 s per row")
