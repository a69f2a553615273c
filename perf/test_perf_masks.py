"""CPU checks of the masks suite (run with `pytest perf/`): its plan, FLOP and byte counts,
the float64 check (whole, or blocks of rows) and whether it can tell each mask from none, the
peers' calls, the dry run down to the table of targets.
"""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import pytest
import torch

from perf import bench_fmha, report, shapes
from perf.inputs import DenseInputs, PagedInputs, make_inputs, masks_reference, sink_logits
from perf.providers import (
    Fa3Provider,
    Fa4Provider,
    SparsekProvider,
    Unsupported,
    mask_kwargs,
    measuring,
    prepare_inputs,
)
from perf.reference import RowBlocks, check
from perf.shapes import Case

MASKS = shapes.MASKS_SUITE
CPU = torch.device("cpu")


def _list_rows(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[dict[str, str]]:
    assert bench_fmha.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:-1]]


def test_masks_suite_is_opt_in_and_plans_the_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert MASKS not in shapes.SUITES and MASKS in shapes.ALL_SUITES
    assert shapes.FA3_PROVIDER not in shapes.PROVIDERS
    assert MASKS not in bench_fmha.parse_args(["--list"]).suites
    chosen = bench_fmha.parse_args(["--list", "--suites", "masks"])
    assert chosen.providers == (*shapes.PROVIDERS, "fa3")
    cases = shapes.select(shapes.full_cases(), (MASKS,))
    dense = [c for c in cases if not c.is_decode]
    decode = [c for c in cases if c.is_decode]
    # Dense: the grid's d128 shape at S = 16k (B x S = 16k tokens, H x D = 2048).
    assert {(c.batch, c.seqlen_q, c.seqlen_k, c.num_heads, c.num_kv_heads, c.head_dim)
            for c in dense} == {(1, 16384, 16384, 16, 16, 128)}  # fmt: skip
    assert [(c.causal, c.mask_text) for c in dense] == [
        (True, ""),
        (True, "window=(4096, 0)"),
        (True, "softcap=30"),
        (True, "sinks"),
        (False, ""),
        (False, "softcap=30"),
    ]
    assert [(c.batch, c.seqlen_k, c.block_size, c.mask_text) for c in decode] == [
        (1, 32768, 16, ""),
        (1, 32768, 16, "window=(4096, 0)"),
        (8, 32768, 16, ""),
        (8, 32768, 16, "window=(4096, 0)"),
    ]
    assert all(
        (c.seqlen_q, c.num_heads, c.num_kv_heads, c.head_dim, c.causal) == (1, 32, 8, 128, True)
        for c in decode
    )
    # Peers: sparsek, fa4, fa3 only; fa3 elsewhere in the head_dims suite only.
    assert shapes.providers_for(cases[0], shapes.ALL_PROVIDERS) == ("sparsek", "fa4", "fa3")
    for case in shapes.full_cases():
        if case.suite != MASKS:
            fa3 = "fa3" in shapes.providers_for(case, shapes.ALL_PROVIDERS)
            assert fa3 == (case.suite == shapes.HEAD_DIMS_SUITE)
            assert case.softcap == 0 and not case.sinks
            # A window elsewhere: the xformers suite's local biases only.
            assert (case.window == shapes.NO_WINDOW) == (case.bias not in shapes.LOCAL_BIASES)
    rows = _list_rows(capsys, ["--list", "--suites", "masks"])
    assert len(rows) == 10 * 3
    assert {r["provider"] for r in rows} == {"sparsek", "fa4", "fa3"}
    window = [r for r in rows if r["mask"] == "window=(4096, 0)" and r["block_size"] == "16"]
    assert {(r["B"], r["KV_MB"]) for r in window} == {("1", "16.8"), ("8", "134.7")}
    quick = shapes.select(shapes.quick_cases(), (MASKS,))
    assert {c.mask_text for c in quick} == {
        "", "window=(1024, 0)", "softcap=30", "sinks", "window=(4096, 0)"
    }  # fmt: skip


def test_case_validation() -> None:
    with pytest.raises(ValueError, match="masks suite only"):
        Case("grid", 1, 64, 64, 2, 2, 64, True, window=(16, 0))
    with pytest.raises(ValueError, match="masks suite only"):
        Case("decode", 1, 1, 64, 2, 2, 64, True, block_size=16, sinks=True)
    with pytest.raises(ValueError, match="causal sets the right size to 0"):
        Case(MASKS, 1, 64, 64, 2, 2, 64, True, window=(16, 4))
    with pytest.raises(ValueError, match="one causal query"):
        Case(MASKS, 1, 2, 64, 2, 2, 64, True, block_size=16)
    Case(MASKS, 1, 64, 64, 2, 2, 64, False, window=(16, 4))  # two-sided, non-causal: fine


@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "causal", "window"),
    [
        (40, 40, True, (7, 0)),
        (40, 40, False, (5, 3)),
        (12, 40, True, (9, -1)),
        (40, 12, False, (-1, 2)),
    ],
)
def test_window_flops_count_the_band(
    seqlen_q: int, seqlen_k: int, causal: bool, window: tuple[int, int]
) -> None:
    offset = seqlen_k - seqlen_q
    rows = torch.arange(seqlen_q)[:, None] + offset
    cols = torch.arange(seqlen_k)[None, :]
    right = 0 if causal else window[1]
    shown = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if right >= 0:
        shown &= cols <= rows + right
    if window[0] >= 0:
        shown &= cols >= rows - window[0]
    pairs = shapes.visible_pairs(seqlen_q, seqlen_k, causal, window=window)
    assert pairs == int(shown.sum())
    case = Case(MASKS, 2, seqlen_q, seqlen_k, 3, 1, 16, causal, window=window)
    assert shapes.flops(case) == 4 * 2 * 3 * 16 * pairs


def test_decode_window_reads_its_pages() -> None:
    plain, windowed = (
        c for c in shapes.select(shapes.full_cases(), (MASKS,)) if c.is_decode and c.batch == 8
    )
    # One query at position 32767 sees keys 28671..32767, in pages 1791..2047 of 16.
    assert shapes.key_span(windowed) == (2047 - 1791 + 1) * 16 == 4112
    assert shapes.kv_bytes(windowed) == 8 * 4112 * 8 * 128 * 2 * 2
    assert shapes.kv_bytes(plain) == 8 * 32768 * 8 * 128 * 2 * 2
    assert shapes.kv_bytes(plain) / shapes.kv_bytes(windowed) == pytest.approx(7.969, abs=1e-3)
    assert shapes.flops(windowed) == 4 * 8 * 32 * 128 * 4097
    # Brute force on a small cache: the pages holding a visible key.
    for context, block, left in ((64, 16, 20), (64, 16, 15), (96, 32, 0), (48, 16, 100)):
        case = Case(MASKS, 1, 1, context, 2, 1, 16, True, block_size=block, window=(left, 0))
        pages = {j // block for j in range(context) if context - 1 - left <= j}
        assert shapes.key_span(case) == len(pages) * block
    # A dense window leaves no key unseen: every key is read.
    dense = next(c for c in shapes.full_cases() if c.suite == MASKS and c.window != (-1, -1))
    assert shapes.kv_bytes(dense) == 2 * 16384 * 16 * 128 * 2


def test_check_rows_of_the_full_plan() -> None:
    dense = [c for c in shapes.select(shapes.full_cases(), (MASKS,)) if not c.is_decode]
    for case in dense:
        blocks = shapes.masks_check_rows(case)
        middle = (3969, 4225) if case.window != (-1, -1) else (8064, 8320)
        assert blocks == ((0, 256), middle, (16128, 16384)), case.label()
    assert all(
        shapes.masks_check_rows(c) is None
        for c in shapes.select(shapes.full_cases(), (MASKS,))
        if c.is_decode
    )
    with pytest.raises(ValueError, match="hides every key right of the diagonal"):
        shapes.masks_check_rows(Case(MASKS, 1, 8192, 8192, 16, 16, 128, False, window=(64, 64)))
    # Blocks that overlap merge; a block never runs past the last row.
    near = Case(MASKS, 1, 8192, 8192, 16, 16, 128, True, window=(100, 0))
    assert shapes.masks_check_rows(near) == ((0, 256), (7936, 8192))


def _reduced(window_left: int = 96, seqlen: int = 512) -> list[Case]:
    """The plan's dense masks at a CPU size (H4 d64, the window a fraction of S)."""
    dims = (MASKS, 1, seqlen, seqlen, 4, 4, 64)
    return [
        Case(*dims, True),
        Case(*dims, True, window=(window_left, 0)),
        Case(*dims, True, softcap=shapes.MASKS_SOFTCAP),
        Case(*dims, True, sinks=True),
        Case(*dims, False),
        Case(*dims, False, softcap=shapes.MASKS_SOFTCAP),
    ]


def test_row_blocks_equal_the_whole_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block of rows, computed with the keys up to its end, is exactly those rows of
    the whole float64 reference (bottom-right alignment keeps every row on its diagonal)."""
    for case in _reduced(window_left=100, seqlen=200):
        inputs = make_inputs(case, torch.bfloat16, CPU, seed=1)
        whole = masks_reference(case, inputs)
        assert isinstance(whole, torch.Tensor) and whole.dtype == torch.float64
        monkeypatch.setattr(shapes, "MASKS_FULL_CHECK_SCORES", 0)
        monkeypatch.setattr(shapes, "MASKS_CHECK_ROWS", 32)
        blocks = masks_reference(case, inputs)
        monkeypatch.undo()
        assert isinstance(blocks, RowBlocks) and blocks.shape == tuple(whole.shape)
        assert len(blocks.blocks) == 3
        for start, part in blocks.blocks:
            rows = whole[:, start : start + 32]
            torch.testing.assert_close(part, rows, rtol=0, atol=1e-12)
        assert check(whole.to(torch.bfloat16), blocks, torch.bfloat16).ok
        wrong = whole.clone()
        wrong[:, blocks.blocks[-1][0] + 5] += 1.0  # an error in a checked row is seen
        assert not check(wrong.to(torch.bfloat16), blocks, torch.bfloat16).ok


def test_the_check_tells_each_mask_from_none() -> None:
    """With the suite's inputs (q x 2, its sink logits), the output of the same problem
    without the mask fails the check against the masked reference: a provider that ignored
    the window, the softcap or the sinks would be flagged. The masked reference in bf16
    passes."""
    cases = _reduced()
    for case in cases[1:4] + cases[5:]:
        inputs = make_inputs(case, torch.bfloat16, CPU, seed=2)
        ref = masks_reference(case, inputs)
        assert isinstance(inputs, DenseInputs) and isinstance(ref, torch.Tensor)
        plain_case = Case(MASKS, 1, case.seqlen_q, case.seqlen_k, 4, 4, 64, case.causal)
        unmasked = masks_reference(plain_case, inputs)
        assert isinstance(unmasked, torch.Tensor)
        assert check(ref.to(torch.bfloat16), ref, torch.bfloat16).ok, case.label()
        assert not check(unmasked.to(torch.bfloat16), ref, torch.bfloat16).ok, case.label()
    assert float(inputs.q.float().std()) == pytest.approx(shapes.MASKS_Q_SCALE, rel=0.05)
    sinks = sink_logits(cases[3], CPU)
    assert sinks.dtype == torch.float32 and tuple(sinks.shape) == (4,)


def test_decode_reference_and_sparsek_cpu_path() -> None:
    """sparsek's CPU path (its reference) through the suite's paged adapter, window on."""
    pytest.importorskip("sparsek")
    case = Case(MASKS, 2, 1, 64, 4, 2, 32, True, block_size=16, window=(20, 0))
    inputs = make_inputs(case, torch.float32, CPU, seed=3)
    assert isinstance(inputs, PagedInputs)
    ref = masks_reference(case, inputs)
    provider = SparsekProvider()
    with measuring(provider):
        out = prepare_inputs(provider, case, inputs)()
    assert check(out, ref, torch.float32).ok
    unmasked = masks_reference(Case(MASKS, 2, 1, 64, 4, 2, 32, True, block_size=16), inputs)
    assert isinstance(unmasked, torch.Tensor)
    assert not check(unmasked.float(), ref, torch.float32).ok


def test_mask_kwargs_leave_a_plain_call_unchanged() -> None:
    dims = (MASKS, 1, 64, 64, 2, 2, 32)
    assert mask_kwargs(Case(*dims, True), None) == {}
    sinks = torch.zeros(2)
    kwargs = mask_kwargs(
        Case(*dims, True, window=(16, 0), softcap=30.0, sinks=True),
        sinks,
        sink_name="learnable_sink",
    )
    assert kwargs == {"window_size": (16, 0), "softcap": 30.0, "learnable_sink": sinks}
    assert type(kwargs["softcap"]) is float and type(kwargs["window_size"]) is tuple
    with pytest.raises(ValueError, match="carry no sinks"):
        mask_kwargs(Case(*dims, True, sinks=True), None)


def _stub(
    monkeypatch: pytest.MonkeyPatch, name: str, calls: list[tuple[str, dict[str, object]]]
) -> None:
    """A stand-in module whose functions record their keyword arguments."""

    def recorder(func: str, result: object) -> object:
        def call(*args: object, **kwargs: object) -> object:
            calls.append((func, kwargs))
            return result

        return call

    out = torch.zeros(1)
    module = types.ModuleType(name)
    # FA4 returns (out, lse); FA3's flash_attn_func and flash_attn_with_kvcache the output.
    results = {
        "flash_attn_func": out if name.startswith("fa3") else (out, None),
        "flash_attn_varlen_func": (out, None),
        "flash_attn_with_kvcache": out,
    }
    for func, result in results.items():
        setattr(module, func, recorder(func, result))
    monkeypatch.setitem(sys.modules, name, module)


def test_peer_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keyword arguments FA4 and FA3 get (their interfaces' names: window_size, softcap,
    learnable_sink for FA4; FA3 has no sinks)."""
    calls: list[tuple[str, dict[str, object]]] = []
    _stub(monkeypatch, "flash_attn.cute.interface", calls)
    _stub(monkeypatch, "fa3_fwd_interface", calls)
    dims = (MASKS, 1, 64, 64, 2, 2, 32)
    window = Case(*dims, True, window=(16, 0))
    sinks = Case(*dims, True, sinks=True)
    dense = make_inputs(sinks, torch.bfloat16, CPU, seed=4)
    assert isinstance(dense, DenseInputs) and dense.sinks is not None
    decode = Case(MASKS, 2, 1, 64, 4, 2, 32, True, block_size=16, window=(20, 0))
    paged = make_inputs(decode, torch.bfloat16, CPU, seed=5)
    for provider in (Fa4Provider(), Fa3Provider()):
        prepare_inputs(provider, window, dense)()
        prepare_inputs(provider, decode, paged)()
    prepare_inputs(Fa4Provider(), sinks, dense)()
    with pytest.raises(Unsupported, match="no sink logits"):
        prepare_inputs(Fa3Provider(), sinks, dense)
    assert [(f, sorted(k)) for f, k in calls] == [
        ("flash_attn_func", ["causal", "window_size"]),
        ("flash_attn_varlen_func", ["causal", "page_table", "seqused_k", "window_size"]),
        ("flash_attn_func", ["causal", "window_size"]),
        ("flash_attn_with_kvcache", ["cache_seqlens", "causal", "page_table", "window_size"]),
        ("flash_attn_func", ["causal", "learnable_sink"]),
    ]
    assert calls[0][1]["window_size"] == (16, 0) and calls[1][1]["window_size"] == (20, 0)
    assert calls[4][1]["learnable_sink"] is dense.sinks


def _dry_run(out: Path, *extra: str) -> list[dict[str, str]]:
    argv = ["--dry-run", "--suites", "masks", "--out", str(out), "--warmup-ms", "1"]
    assert bench_fmha.main([*argv, "--rep-ms", "2", *extra]) == 0
    with (out / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_masks_dry_run(tmp_path: Path) -> None:
    rows = _dry_run(tmp_path / "dry")
    assert set(rows[0]) == set(report.COLUMNS)
    assert {r["suite"] for r in rows} == {MASKS}
    assert {r["provider"] for r in rows} == {"sparsek", "fa4", "fa3"}
    measured = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in rows if r["status"] != "ok"} == {"fa4"}  # the refusing fake
    assert all(r["check"] == "ok" for r in measured), measured  # sparsek's float64 reference
    assert len(measured) == 2 * len(shapes.select(shapes.dry_run_cases(), (MASKS,)))
    assert {r["mask"] for r in rows} == {
        "",
        "window=(24, 0)",
        "softcap=30",
        "sinks",
        "window=(20, 0)",
    }
    assert all(r["note"] == "q x2; checked rows: all (float64 reference)" for r in measured)
    decode = [r for r in measured if r["block_size"]]
    assert {(r["mask"], r["kv_bytes"]) for r in decode} == {
        ("", str(3 * 64 * 2 * 32 * 2 * 2)),
        ("window=(20, 0)", str(3 * 32 * 2 * 32 * 2 * 2)),
    }
    for r in decode:
        gbps = int(r["kv_bytes"]) / (float(r["ms"]) * 1e-3) / 1e9
        assert float(r["gbps"]) == pytest.approx(gbps, rel=1e-3)
    assert not any(r["kv_bytes"] for r in measured if not r["block_size"])
    table = (tmp_path / "dry" / "table.md").read_text()
    assert "## Masks (masks suite)" in table and "## Throughput" not in table
    targets = table.split("### Targets")[1]
    for text in (
        "| window=(24, 0) | B2 S80 H4/Hkv2 d32 causal | sparsek time with / without window |",
        "| softcap=30 | B2 S80 H4/Hkv2 d32 causal | sparsek time without / with softcap |",
        "| softcap=30 | B2 S80 H4/Hkv2 d32 non-causal | sparsek time without / with softcap |",
        "| sinks | B2 S80 H4/Hkv2 d32 causal | sparsek time without / with sinks |",
        "| window=(20, 0) | B3 ctx64 H4/Hkv2 d32 page16 | sparsek time without / with window |",
        "| window=(24, 0) | B2 S80 H4/Hkv2 d32 causal | fa4 time / sparsek time | skip | >= 1 |",
        "(the speed-up at equal bandwidth) | 2.00 |",
        "(the time ratio at equal TFLOP/s) | 0.",
    ):
        assert text in targets, text
    for bound in ("<= 0.3", ">= 0.95", ">= 0.98", ">= 6"):
        assert f"| {bound} |" in targets, bound


def test_masks_dry_run_checks_blocks_of_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path of the full-size rows: the check on blocks of rows, end to end."""
    monkeypatch.setattr(shapes, "MASKS_FULL_CHECK_SCORES", 0)
    monkeypatch.setattr(shapes, "MASKS_CHECK_ROWS", 16)
    rows = _dry_run(tmp_path / "blocks")
    measured = [r for r in rows if r["status"] == "ok"]
    assert all(r["check"] == "ok" for r in measured), measured
    notes = {r["mask"]: r["note"] for r in measured if not r["block_size"]}
    assert notes["window=(24, 0)"] == "q x2; checked rows: 0-15, 17-32, 64-79 (float64 reference)"
    assert notes["sinks"] == "q x2; checked rows: 0-15, 32-47, 64-79 (float64 reference)"


def _row(provider: str, mask: str, ms: str, **fields: str) -> dict[str, str]:
    base = {c: "" for c in report.COLUMNS} | {
        "suite": MASKS, "kind": "kernel", "dtype": "bf16", "batch": "1", "seqlen_q": "16384",
        "seqlen_k": "16384", "num_heads": "16", "num_kv_heads": "16", "head_dim": "128",
        "causal": "True", "status": "ok", "check": "ok", "tflops": "500",
    }  # fmt: skip
    return base | {"provider": provider, "mask": mask, "ms": ms} | fields


def test_targets_table() -> None:
    decode = {"batch": "8", "seqlen_q": "1", "seqlen_k": "32768", "num_heads": "32"}
    decode |= {"num_kv_heads": "8", "block_size": "16"}
    rows = [
        _row("sparsek", "", "10.0"),
        _row("fa4", "", "9.0"),
        _row("sparsek", "window=(4096, 0)", "2.5"),  # 0.25 of causal: met
        _row("fa4", "window=(4096, 0)", "2.4"),  # FA4 faster: missed
        _row("sparsek", "softcap=30", "10.4"),  # 10 / 10.4 = 0.96: met
        _row("fa4", "softcap=30", "11.0", check="FAIL"),
        _row("sparsek", "sinks", "10.5"),  # 0.95: missed
        _row("fa4", "sinks", "", status="skipped"),
        _row("sparsek", "", "0.2", kv_bytes="1073741824", **decode),
        _row("sparsek", "window=(4096, 0)", "0.03", kv_bytes="134742016", **decode),
    ]
    table = report.markdown(rows)
    lines = [line for line in table.split("### Targets")[1].splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")][2:] for line in lines[1:]]
    assert cells == [
        ["sparsek time with / without window", "0.25", "<= 0.3", "met"],
        ["fa4 time / sparsek time", "0.96", ">= 1", "missed"],
        ["visible pairs with / without window (the time ratio at equal TFLOP/s)", "0.25", "-", "-"],
        ["sparsek time without / with softcap", "0.96", ">= 0.95", "met"],
        ["fa4 time / sparsek time", "1.06", ">= 1", "met (fa4 check FAIL)"],
        ["sparsek time without / with sinks", "0.95", ">= 0.98", "missed"],
        ["fa4 time / sparsek time", "skip", "-", "not measured"],
        ["sparsek time without / with window", "6.67", ">= 6", "met"],
        ["fa4 time / sparsek time", "skip", "-", "not measured"],
        [
            "K + V bytes to read without / with window (the speed-up at equal bandwidth)",
            "7.97", "-", "-",
        ],
    ]  # fmt: skip
    assert "fa3 time" not in table  # no fa3 rows in this run: no fa3 targets
    decode_table = table.split("| dtype | B | context |")[1]
    assert "| 8 | 32768 | 32 | 8 | 128 | 16 | window=(4096, 0) | 134.7 | 30.0 |" in decode_table
    prefill = "| 16384 | 16384 | 16 | 16 | 128 | True | window=(4096, 0) | 2.5 (500) | 2.4 (500) |"
    assert prefill in table


def test_fa3_on_the_head_dims_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """FA3 runs the head_dims suite's dense rows (the regression: it had no dense entry,
    so every grid row was skipped with NotImplementedError), V narrower too."""
    calls: list[tuple[str, dict[str, object]]] = []
    _stub(monkeypatch, "fa3_fwd_interface", calls)
    grid = Case(shapes.HEAD_DIMS_SUITE, 1, 64, 64, 2, 2, 192, True, head_dim_v=128)
    inputs = make_inputs(grid, torch.bfloat16, CPU, seed=6)
    assert isinstance(inputs, DenseInputs) and inputs.v.shape[-1] == 128
    prepare_inputs(Fa3Provider(), grid, inputs)()
    assert calls == [("flash_attn_func", {"causal": True})]
