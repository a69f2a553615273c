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
    assert {c.suite for c in cases} == set(shapes.ALL_SUITES)


@pytest.mark.parametrize(
    ("dims", "window"),
    [
        ((2, 40, 100, 4, 2, 64, True), (-1, -1)),
        ((2, 100, 40, 4, 4, 32, True), (-1, -1)),
        ((1, 64, 64, 4, 1, 16, False), (-1, -1)),
        # Sliding windows (the xformers suite's local biases), bottom-right like causal:
        # causal with 8 keys a row; a band 5 left, 3 right; one-sided; Sq > Sk (empty rows).
        ((2, 40, 100, 4, 2, 64, True), (7, 0)),
        ((1, 64, 64, 4, 1, 16, False), (5, 3)),
        ((1, 30, 50, 2, 2, 16, False), (-1, 2)),
        ((1, 50, 30, 2, 2, 16, True), (4, 0)),
    ],
)
def test_reference_matches_sdpa_math(dims: tuple[int, ...], window: tuple[int, int]) -> None:
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal = dims
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=torch.float64)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=torch.float64)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=torch.float64)
    # Query i sees key j iff (j - i - offset) lies in [-left, right] (causal: right 0).
    left, right = window
    right = 0 if causal else right
    distance = torch.arange(seqlen_k)[None, :] - torch.arange(seqlen_q)[:, None]
    distance -= seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if right >= 0:
        mask &= distance <= right
    if left >= 0:
        mask &= distance >= -left
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    expected = expected.transpose(1, 2).nan_to_num(0.0)  # rows seeing no key are 0
    got = reference_attention(q, k, v, bool(causal), window)
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


def _xformers_rows(out: Path, argv: list[str]) -> list[dict[str, str]]:
    assert bench_fmha.main([*argv, "--out", str(out), "--warmup-ms", "1", "--rep-ms", "2"]) == 0
    return report.read_csv(out / "results.csv")


def test_xformers_suite_is_opt_in_and_refused_with_fa4(capsys: pytest.CaptureFixture[str]) -> None:
    assert shapes.XFORMERS_SUITE not in shapes.SUITES
    assert shapes.XFORMERS_PROVIDER not in shapes.PROVIDERS
    default = bench_fmha.parse_args(["--list"])
    assert shapes.XFORMERS_SUITE not in default.suites and "fa4" in default.providers
    chosen = bench_fmha.parse_args(["--list", "--suites", "xformers"])
    assert chosen.providers == shapes.XFORMERS_SUITE_PROVIDERS and "fa4" not in chosen.providers
    for argv in (
        ["--list", "--suites", "xformers", "--providers", "sparsek,fa4"],
        ["--dry-run", "--suites", "grid,xformers", "--providers", "fa4,sparsek_xformers"],
    ):
        with pytest.raises(SystemExit) as exc:
            bench_fmha.parse_args(argv)
        assert exc.value.code == 2
        assert "xformers suite cannot run in the same invocation as provider fa4" in (
            capsys.readouterr().err
        )


def test_xformers_plan_has_a_row_per_bias(capsys: pytest.CaptureFixture[str]) -> None:
    cases = shapes.select(shapes.full_cases(), (shapes.XFORMERS_SUITE,))
    assert [(c.bias, c.seqlen_q, c.seqlen_k) for c in cases] == [
        ("None", 2048, 2048),
        ("LowerTriangularMask", 2048, 2048),
        ("LowerTriangularFromBottomRightMask", 2048, 2048),
        ("LocalAttentionFromBottomRightMask", 2048, 2048),
        ("LowerTriangularFromBottomRightLocalAttentionMask", 2048, 2048),
        ("LowerTriangularFromBottomRightMask", 1024, 4096),
        ("BlockDiagonalMask", 4096, 4096),
        ("BlockDiagonalCausalMask", 4096, 4096),
        ("BlockDiagonalCausalFromBottomRightMask", 4096, 4096),
        ("BlockDiagonalCausalLocalAttentionMask", 4096, 4096),
        ("BlockDiagonalCausalLocalAttentionFromBottomRightMask", 4096, 4096),
        ("BlockDiagonalPaddedKeysMask", 4096, 8192),
        ("BlockDiagonalCausalWithOffsetPaddedKeysMask", 4096, 8192),
        ("BlockDiagonalLocalAttentionPaddedKeysMask", 4096, 8192),
        ("BlockDiagonalCausalLocalAttentionPaddedKeysMask", 4096, 8192),
        ("PagedBlockDiagonalPaddedKeysMask", 4096, 8192),
        ("PagedBlockDiagonalCausalWithOffsetPaddedKeysMask", 4096, 8192),
    ]
    assert [c.bias for c in cases[:5] + cases[6:]] == list(shapes.XFORMERS_BIASES)
    # Local biases: causal ones window_size 1024 (sparsek (1023, 0)), band ones 512 a side.
    assert [c.mask_text for c in cases if c.bias in shapes.LOCAL_BIASES] == [
        "window=(512, 512)", "window=(1023, 0)", "window=(1023, 0)", "window=(1023, 0)",
        "window=(512, 512)", "window=(1023, 0)",
    ]  # fmt: skip
    dense, block_diagonal = cases[:6], cases[6:]
    assert all(
        (c.batch, c.num_heads, c.num_kv_heads, c.head_dim) == (4, 16, 16, 128) for c in dense
    )
    # Block-diagonal: the varlen suite's 16 sequences (B = their count; batch 1 for xFormers).
    assert all(
        (c.batch, c.num_heads, c.num_kv_heads, c.head_dim, c.seqlens)
        == (16, 16, 16, 128, shapes.varlen_seqlens())
        for c in block_diagonal
    )
    assert all(c.causal == (c.bias in shapes.CAUSAL_BIASES) for c in cases)
    assert all(c.causal == ("Causal" in c.bias or "Lower" in c.bias) for c in cases)
    assert all(c.bias == "" for c in shapes.full_cases() if c.suite != shapes.XFORMERS_SUITE)
    with pytest.raises(ValueError, match="seqlen_q == seqlen_k"):
        shapes.Case("xformers", 1, 8, 16, 1, 1, 64, True, "LowerTriangularMask")
    with pytest.raises(ValueError, match="does not match causal"):
        shapes.Case("xformers", 1, 8, 8, 1, 1, 64, False, "LowerTriangularMask")
    # Other suites never get sparsek_xformers; the xformers suite never gets fa4.
    grid = next(c for c in shapes.full_cases() if c.suite == "grid")
    assert shapes.providers_for(grid, shapes.ALL_PROVIDERS) == shapes.PROVIDERS
    assert "fa4" not in shapes.providers_for(cases[0], shapes.ALL_PROVIDERS)

    assert bench_fmha.main(["--list", "--suites", "xformers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:-1]]
    assert len(rows) == 17 * len(shapes.XFORMERS_SUITE_PROVIDERS)
    assert {r["bias"] for r in rows if r["provider"] == "sparsek_xformers"} == set(
        shapes.XFORMERS_BIASES
    )
    assert lines[-1].startswith("# 85 rows, 17 shapes")
    local = [r for r in rows if r["bias"] in shapes.LOCAL_BIASES]
    assert {r["mask"] for r in local} == {"window=(1023, 0)", "window=(512, 512)"}


@pytest.mark.skipif(
    importlib.util.find_spec("xformers") is None, reason="xformers is not installed"
)
def test_xformers_dry_run_runs_the_operator_on_cpu(tmp_path: Path) -> None:
    rows = _xformers_rows(tmp_path / "xf", ["--dry-run", "--suites", "xformers"])
    assert {r["suite"] for r in rows} == {"xformers"}
    assert {r["provider"] for r in rows} == set(shapes.XFORMERS_SUITE_PROVIDERS)
    ours = [r for r in rows if r["provider"] == "sparsek_xformers"]
    # The real SparseKAttention (sparsek's CPU reference) passes the check for every bias.
    assert [r["bias"] for r in ours] == [
        *shapes.DENSE_BIASES,
        "LowerTriangularFromBottomRightMask",
        *shapes.PACKED_BIASES,
        *shapes.PADDED_BIASES,
        *shapes.PAGED_BIASES,
    ]
    assert set(shapes.XFORMERS_BIASES) == {r["bias"] for r in ours}
    assert all(r["status"] == "ok" and r["check"] == "ok" for r in ours), ours
    assert all("xformers 0.0.35" in r["provider_version"] for r in ours)
    # Every peer ran every row too (the fakes: checked, one deliberately wrong, none refusing).
    for r in rows:
        assert r["status"] == "ok", r
        assert r["check"] == ("FAIL" if r["provider"] == "sdpa_efficient" else "ok"), r
    paged = [r for r in ours if r["bias"].startswith("Paged")]
    assert {(r["block_size"], r["kv_seqlens"]) for r in paged} == {("16", "57+25+84+38+32")}
    assert all(r["note"].startswith("keys: paged cache, 30 pages of 16") for r in paged)
    packed = {r["seqlens"] for r in ours if r["bias"].startswith(("BlockDiagonal", "Paged"))}
    assert packed == {"37+5+64+18+12"}
    assert all(r["seqlens"] == "" for r in ours if r["bias"] in shapes.DENSE_BIASES)
    # Local biases: window_size 16 (sparsek (15, 0)), a band of 8 keys a side.
    assert {r["mask"] for r in ours if r["bias"] in shapes.LOCAL_BIASES} == {
        "window=(15, 0)",
        "window=(8, 8)",
    }
    assert all(r["mask"] == "" for r in ours if r["bias"] not in shapes.LOCAL_BIASES)
    table = (tmp_path / "xf" / "table.md").read_text()
    assert "| bias |" in table and "| LowerTriangularFromBottomRightMask |" in table
    # One table row per (bias, shape): the two Sq = Sk causal biases are not merged into one,
    # nor are the block-diagonal biases of one shape.
    body = [line for line in table.splitlines() if line.startswith("| bf16 |")]
    assert len(body) == 17 and "## Throughput" not in table
    for bias in shapes.XFORMERS_BIASES:
        assert any(line.startswith(f"| bf16 | {bias} |") for line in body), bias
    # The local biases' windows under the table, in xFormers' terms and sparsek's.
    assert (
        "- LowerTriangularFromBottomRightLocalAttentionMask: window_size=16 "
        "(sparsek window_size=(15, 0))"
    ) in table
    assert (
        "- BlockDiagonalLocalAttentionPaddedKeysMask: window_left=8, window_right=8 "
        "(sparsek window_size=(8, 8))"
    ) in table
    # sparsek_xformers is sparsek itself: never the best peer.
    assert "sparsek_xformers |" not in [line.rsplit("| ", 1)[-1] for line in table.splitlines()]


@pytest.mark.skipif(
    importlib.util.find_spec("xformers") is None, reason="xformers is not installed"
)
def test_xformers_bias_reaches_the_operator() -> None:
    from perf.providers import SparsekXformersProvider, Unsupported

    torch.manual_seed(0)
    q = torch.randn(1, 8, 2, 32, dtype=torch.float16)
    k = torch.randn(1, 24, 2, 32, dtype=torch.float16)
    v = torch.randn(1, 24, 2, 32, dtype=torch.float16)
    provider = SparsekXformersProvider()
    bottom_right = shapes.Case(
        "xformers", 1, 8, 24, 2, 2, 32, True, "LowerTriangularFromBottomRightMask"
    )
    ref = reference_attention(q, k, v, causal=True)
    assert check_output(provider.prepare(bottom_right, q, k, v)(), ref, torch.float16).ok
    # Top-left on Sq != Sk is another mask: the check would catch a bias mix-up.
    top_left = shapes.Case("xformers", 1, 8, 8, 2, 2, 32, True, "LowerTriangularMask")
    out = provider.prepare(top_left, q, k, v)()
    assert not check_output(out, ref, torch.float16).ok
    with pytest.raises(Unsupported, match="SparseKAttention refuses"):
        provider.prepare(bottom_right, q.bfloat16(), k.bfloat16(), v.bfloat16())  # CPU: fp16 only


def test_append_upgrades_an_old_header(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    old = [c for c in report.COLUMNS if c != "bias"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old)
        writer.writeheader()
        writer.writerow({c: "x" for c in old} | {"provider": "sparsek", "ms": "1"})
    writer2 = report.CsvWriter(path, append=True)
    writer2.write({"provider": "sparsek_xformers", "bias": "None", "ms": "2"})
    writer2.close()
    rows = report.read_csv(path)
    assert [(r["provider"], r["bias"], r["ms"]) for r in rows] == [
        ("sparsek", "", "1"),
        ("sparsek_xformers", "None", "2"),
    ]


def test_repeat_rotates_the_providers_and_records_medians(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--repeat 3`: each provider of a case is timed three times, in rounds whose order
    starts one provider later each time, and its row holds the median. With strictly
    increasing fake timings the medians are each provider's time in the second round,
    where the order is sdpa_flash, sdpa_cudnn, sdpa_efficient, sparsek (fa4 refuses)."""
    calls = iter(range(1, 1_000_000))
    monkeypatch.setattr(bench_fmha.Runner, "_time", lambda self, kind, fn: float(next(calls)))
    out = tmp_path / "rep"
    argv = ["--dry-run", "--out", str(out), "--suites", "grid", "--quick", "--repeat", "3"]
    assert bench_fmha.main(argv) == 0
    rows = [r for r in report.read_csv(out / "results.csv") if r["status"] == "ok"]
    first = rows[0]
    keys = ("batch", "seqlen_q", "head_dim", "causal")
    case_rows = {r["provider"]: float(r["ms"]) for r in rows if all(r[k] == first[k] for k in keys)}
    assert set(case_rows) == {"sparsek", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"}
    ordered = sorted(case_rows, key=case_rows.__getitem__)
    assert ordered == ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sparsek"]
    assert case_rows["sdpa_flash"] == case_rows["sparsek"] - 3  # one round: 4 timings


def test_l2_flush_choices() -> None:
    """`time_kernel` takes the flushes the suite offers and names the argument otherwise."""
    from perf import timing

    assert timing.L2_FLUSH in timing.L2_FLUSHES
    cpu = torch.device("cpu")
    for flush in timing.L2_FLUSHES:
        assert timing.time_kernel(lambda: None, cpu, rep_ms=1.0, l2_flush=flush) >= 0.0
    with pytest.raises(ValueError, match="l2_flush='dirty'"):
        timing.time_kernel(lambda: None, cpu, l2_flush="dirty")
    assert bench_fmha.parse_args(["--l2-flush", "write", "--dry-run"]).l2_flush == "write"
    assert bench_fmha.parse_args(["--dry-run"]).l2_flush == timing.L2_FLUSH


def test_head_dims_suite_is_opt_in_beside_fa3() -> None:
    """The head_dims suite: the grid (B x S = 16k tokens, H = 2048 // D, so 21 heads of
    96) at S 1k..16k for every registered head dim the default grid lacks and for q/k 192
    with v 128, then paged decode at batch x context = 256k tokens for d256 and 192/128;
    FlashAttention-3 among the peers."""
    from perf import bench_fmha, shapes
    from sparsek import registry

    suite = shapes.HEAD_DIMS_SUITE
    assert suite not in shapes.SUITES and suite in shapes.ALL_SUITES
    chosen = bench_fmha.parse_args(["--list", "--suites", suite])
    assert chosen.providers == (*shapes.PROVIDERS, "fa3")
    cases = shapes.select(shapes.full_cases(), (suite,))
    grid = [c for c in cases if not c.is_decode]
    decode = [c for c in cases if c.is_decode]
    dims = set(registry.registered_head_dims("sm_90a")) - set(shapes.GRID_HEAD_DIMS)
    pairs = {(d, d) for d in dims} | {(192, 128)}
    assert {(c.head_dim, c.value_head_dim) for c in grid} == pairs
    assert registry.registered_value_head_dims("sm_90a", 192) == [192, 128]
    for case in grid:
        assert case.batch * case.seqlen_q == shapes.GRID_TOKENS
        assert case.num_heads == shapes.GRID_HIDDEN // case.head_dim
    assert len(grid) == len(pairs) * 2 * len(shapes.HEAD_DIMS_SEQLENS)
    assert {(c.dims_text, c.batch * c.seqlen_k) for c in decode} == {
        ("256", 262144), ("192/128", 262144)
    }  # fmt: skip
    mla = next(c for c in decode if c.head_dim_v)
    # K 192 wide and V 128 wide, 2 bytes each, over every token and KV head
    assert shapes.kv_bytes(mla) == mla.batch * mla.seqlen_k * 8 * (192 + 128) * 2
    mla_grid = next(c for c in grid if c.head_dim_v)
    assert shapes.flops(mla_grid) == 2 * mla_grid.batch * 10 * (
        192 + 128
    ) * mla_grid.seqlen_q**2 * (0.5 + 0.5 / mla_grid.seqlen_q if mla_grid.causal else 1)
