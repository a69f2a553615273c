"""CPU checks of the benchmark harness (run with `pytest perf/`; not part of `tests/`).

Compares the float32 reference against PyTorch's SDPA math backend (float64) and runs the
whole loop with fake providers on CPU tensors (`--dry-run`) down to the CSV, table and plot.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from perf import bench_fmha, report, shapes
from perf.reference import check_output, reference_attention


def test_visible_pairs_match_bottom_right_mask() -> None:
    for seqlen_q, seqlen_k in ((1024, 8192), (8, 3), (3, 8)):
        mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(seqlen_k - seqlen_q)
        assert shapes.visible_pairs(seqlen_q, seqlen_k, True) == int(mask.sum())
    assert shapes.visible_pairs(512, 512, True) == 512 * 512 / 2
    assert shapes.visible_pairs(512, 1024, False) == 512 * 1024


def test_full_plan_covers_the_issue() -> None:
    cases = shapes.full_cases()
    grid = [c for c in cases if c.suite == "grid"]
    assert len(grid) == 2 * 2 * 6
    assert all(c.batch * c.seqlen_q == 16384 and c.num_heads * c.head_dim == 2048 for c in grid)
    assert {c.suite for c in cases} == set(shapes.SUITES)


@pytest.mark.parametrize(
    "dims",
    [(2, 40, 100, 4, 2, 64, True), (2, 100, 40, 4, 4, 32, True), (1, 64, 64, 4, 1, 16, False)],
)
def test_reference_matches_sdpa_math(dims: tuple[int, ...]) -> None:
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal = dims
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=torch.float64)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=torch.float64)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=torch.float64)
    mask = None
    if causal:
        mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(seqlen_k - seqlen_q)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    expected = expected.transpose(1, 2).nan_to_num(0.0)  # rows seeing no key are 0
    got = reference_attention(q, k, v, causal)
    assert (got.double() - expected).abs().max() < 1e-5
    assert check_output(expected.to(torch.bfloat16), got, torch.bfloat16).ok
    assert not check_output((expected + 0.1).to(torch.bfloat16), got, torch.bfloat16).ok


def test_dry_run_writes_csv_and_table(tmp_path: Path) -> None:
    out = tmp_path / "dry"
    argv = ["--dry-run", "--out", str(out), "--suites", "grid,seqlen_qk,latency"]
    assert bench_fmha.main([*argv, "--warmup-ms", "1", "--rep-ms", "2"]) == 0
    with (out / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == set(report.COLUMNS)
    by_provider = {r["provider"]: r for r in rows if r["kind"] == "kernel"}
    assert by_provider["sparsek"]["check"] == "ok"
    assert by_provider["sdpa_efficient"]["check"] == "FAIL"  # the fake that perturbs
    assert by_provider["fa4"]["status"] == "skipped"  # the fake that refuses
    assert {r["kind"] for r in rows} == {"kernel", "eager", "graph"}
    table = (out / "table.md").read_text()
    assert "sparsek/best" in table and "cpu-dry-run" in table
    if importlib.util.find_spec("matplotlib") is not None:
        from perf import plot

        plot.plot(report.read_csv(out / "results.csv"), out / "plot.png")
        assert (out / "plot.png").stat().st_size > 0
