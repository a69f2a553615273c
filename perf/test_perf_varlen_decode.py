"""CPU checks of the varlen and decode suites (run with `pytest perf/`).

FLOP counts are compared with the number of True entries of the explicit block-diagonal
(bottom-right causal) mask; bandwidth with hand-computed byte counts; the inputs' paged cache
with a gather through the block table; provider adapters (SDPA's nested-tensor path on the
math backend, sparsek's CPU reference) with the float32 reference of perf/reference.py.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from perf import bench_fmha, report, shapes
from perf.inputs import PagedInputs, VarlenInputs, make_inputs, reference
from perf.providers import SdpaProvider, SparsekProvider, measuring
from perf.reference import check_output
from perf.shapes import Case

# The plan's lengths, pinned: results of different runs and machines are only comparable if
# they measured the same sequences.
PLANNED_SEQLENS: tuple[int, ...] = (
    *(990, 110, 902, 1162, 100, 4096, 1517, 1032),
    *(778, 1365, 63, 1024, 1120, 1330, 751, 44),
)


def _varlen_case(seqlens: tuple[int, ...], heads: int, kv_heads: int, causal: bool) -> Case:
    top = max(seqlens)
    return Case("varlen", len(seqlens), top, top, heads, kv_heads, 16, causal, seqlens=seqlens)


def _decode_case(batch: int, context: int, block_size: int) -> Case:
    return Case("decode", batch, 1, context, 4, 2, 16, True, block_size=block_size)


def test_varlen_seqlens_are_pinned_mixed_and_sum_to_16k() -> None:
    seqlens = shapes.varlen_seqlens()
    assert seqlens == PLANNED_SEQLENS
    assert len(seqlens) == 16 and sum(seqlens) == 16 * 1024
    longest = max(seqlens)
    assert seqlens.count(longest) == 1 and longest == 4096
    assert sum(n < 128 for n in seqlens) == 4  # short ones, below one 128-row tile
    assert sum(n % 128 != 0 for n in seqlens) >= 12  # most end in a partial tile
    cases = shapes.select(shapes.full_cases(), ("varlen",))
    assert [(c.num_heads, c.num_kv_heads, c.causal) for c in cases] == [
        (16, 16, False),
        (16, 16, True),
        (32, 8, False),
        (32, 8, True),
    ]
    assert all(c.seqlens == seqlens and c.head_dim == 128 for c in cases)
    assert all(c.batch == 16 and c.seqlen_q == c.seqlen_k == 4096 for c in cases)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_flops_count_every_visible_pair(causal: bool) -> None:
    seqlens = (7, 1, 0, 12, 5)
    case = _varlen_case(seqlens, 4, 2, causal)
    # The packed problem's mask: block diagonal, lower triangular inside each block if causal.
    total = sum(seqlens)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in seqlens:
        block = torch.ones(n, n, dtype=torch.bool)
        mask[start : start + n, start : start + n] = block.tril() if causal else block
        start += n
    pairs = int(mask.sum())
    assert shapes.flops(case) == 4 * case.num_heads * case.head_dim * pairs
    if causal:
        # Exact: n (n + 1) / 2 per sequence, not the half square of the dense grid rows.
        assert pairs == sum(n * (n + 1) // 2 for n in seqlens)
        assert shapes.flops(case) > 4 * case.num_heads * case.head_dim * sum(
            n * n / 2 for n in seqlens
        )


def test_planned_varlen_flops() -> None:
    causal = next(c for c in shapes.full_cases() if c.suite == "varlen" and c.causal)
    pairs = sum(n * (n + 1) // 2 for n in PLANNED_SEQLENS)
    assert shapes.flops(causal) == 4 * 16 * 128 * pairs
    full = Case("varlen", 16, 4096, 4096, 16, 16, 128, False, seqlens=shapes.varlen_seqlens())
    assert shapes.flops(full) == 4 * 16 * 128 * sum(n * n for n in PLANNED_SEQLENS)


def test_decode_bandwidth_accounting() -> None:
    case = Case("decode", 8, 1, 4096, 32, 8, 128, True, block_size=16)
    # K and V, every context token of every sequence, 8 KV heads x 128 dims x 2 bytes.
    assert shapes.kv_bytes(case, 2) == 8 * 4096 * 8 * 128 * 2 * 2 == 134_217_728
    assert shapes.bandwidth_gbps(shapes.kv_bytes(case, 2), ms=0.05) == pytest.approx(2684.35456)
    # 4 FLOPs x head_dim per (query head, key) pair: one query sees the whole context.
    assert shapes.flops(case) == 4 * 8 * 32 * 128 * 4096
    varlen = _varlen_case((3, 5), 4, 2, True)
    assert shapes.kv_bytes(varlen, 2) == 2 * 8 * 2 * 16 * 2


def test_decode_plan_and_memory_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = shapes.select(shapes.full_cases(), ("decode",))
    combos = {(c.batch, c.seqlen_k, c.block_size) for c in cases}
    # The largest (B128, 32k context) cache is 17.2 GB: every combination fits the cap.
    assert len(cases) == len(combos) == 4 * 4 * 2
    assert all(shapes.kv_bytes(c) <= shapes.DECODE_MAX_KV_BYTES for c in cases)
    assert all(
        (c.num_heads, c.num_kv_heads, c.head_dim, c.seqlen_q) == (32, 8, 128, 1) for c in cases
    )
    monkeypatch.setattr(shapes, "DECODE_MAX_KV_BYTES", 5e9)
    capped = shapes.select(shapes.full_cases(), ("decode",))
    assert {(c.batch, c.seqlen_k) for c in capped} == {
        (b, s) for b, s, _ in combos if b * s * 8 * 128 * 4 <= 5e9
    }
    assert (128, 32768) not in {(c.batch, c.seqlen_k) for c in capped}


def test_case_validation() -> None:
    with pytest.raises(ValueError, match="seqlens is given exactly"):
        Case("varlen", 2, 8, 8, 2, 2, 16, False)
    with pytest.raises(ValueError, match="max"):
        Case("varlen", 2, 9, 9, 2, 2, 16, False, seqlens=(8, 3))
    with pytest.raises(ValueError, match="block_size > 0"):
        Case("decode", 2, 1, 64, 2, 2, 16, True)
    with pytest.raises(ValueError, match="one causal query"):
        Case("decode", 2, 2, 64, 2, 2, 16, True, block_size=16)
    with pytest.raises(ValueError, match="multiple of block_size"):
        Case("decode", 2, 1, 72, 2, 2, 16, True, block_size=16)


def test_paged_inputs_gather_through_the_block_table() -> None:
    case = _decode_case(3, 64, 16)
    inputs = make_inputs(case, torch.float32, torch.device("cpu"), seed=1)
    assert isinstance(inputs, PagedInputs)
    table = inputs.block_table
    assert table.dtype == torch.int32 and tuple(table.shape) == (3, 4)
    assert sorted(table.flatten().tolist()) == list(range(12))  # a permutation of the pool
    assert table.flatten().tolist() != list(range(12))  # ... not the identity
    assert inputs.cache_seqlens.tolist() == [64, 64, 64]
    assert inputs.k.is_contiguous() and tuple(inputs.k.shape) == (3, 2, 64, 16)
    for b in range(3):
        for t in (0, 15, 16, 63):
            block, offset = int(table[b, t // 16]), t % 16
            assert torch.equal(inputs.k[b, :, t], inputs.k_cache[block, offset])
            assert torch.equal(inputs.v[b, :, t], inputs.v_cache[block, offset])


def test_sparsek_cpu_reference_agrees_with_the_harness_inputs() -> None:
    """sparsek's CPU path (its float32 reference) reads the paged cache and the packed
    sequences as the harness's reference does: the layouts mean the same thing to both."""
    pytest.importorskip("sparsek")
    cpu = torch.device("cpu")
    provider = SparsekProvider()
    for case in (_decode_case(2, 48, 16), _varlen_case((9, 1, 20), 4, 2, True)):
        inputs = make_inputs(case, torch.float32, cpu, seed=2)
        with measuring(provider):
            if isinstance(inputs, PagedInputs):
                out = provider.prepare_paged(case, inputs)()
            else:
                assert isinstance(inputs, VarlenInputs)
                out = provider.prepare_varlen(case, inputs)()
        assert check_output(out, reference(case, inputs), torch.float32).ok


# PyTorch's math backend builds a strided nested tensor internally and warns about it.
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_sdpa_adapters_on_cpu_math_backend() -> None:
    """The SDPA adapters' layouts: jagged nested tensors for varlen (PyTorch's math backend
    takes them non-causal on CPU) and the dense gathered cache for decode."""
    cpu = torch.device("cpu")
    provider = SdpaProvider("sdpa_math", "MATH")
    varlen = _varlen_case((9, 3, 20), 2, 2, False)
    inputs = make_inputs(varlen, torch.float32, cpu, seed=3)
    assert isinstance(inputs, VarlenInputs)
    with measuring(provider):
        out = provider.prepare_varlen(varlen, inputs)()
    assert tuple(out.shape) == (32, 2, 16)
    assert check_output(out, reference(varlen, inputs), torch.float32).ok
    decode = _decode_case(2, 32, 16)
    paged = make_inputs(decode, torch.float32, cpu, seed=4)
    assert isinstance(paged, PagedInputs)
    with measuring(provider):
        out = provider.prepare_paged(decode, paged)()
    assert check_output(out, reference(decode, paged), torch.float32).ok


def test_varlen_reference_is_per_sequence() -> None:
    case = _varlen_case((5, 11), 2, 1, True)
    inputs = make_inputs(case, torch.float32, torch.device("cpu"), seed=5)
    assert isinstance(inputs, VarlenInputs)
    ref = reference(case, inputs)
    # Sequence 1 alone gives the same rows: nothing leaks across the boundary.
    from perf.reference import reference_attention

    alone = reference_attention(inputs.q[None, 5:], inputs.k[None, 5:], inputs.v[None, 5:], True)
    assert torch.allclose(ref[5:], alone[0])


def test_cli_accepts_the_new_suites(capsys: pytest.CaptureFixture[str]) -> None:
    args = bench_fmha.parse_args(["--list", "--suites", "varlen,decode"])
    assert args.suites == ("varlen", "decode") and args.providers == shapes.PROVIDERS
    assert {"varlen", "decode"} <= set(bench_fmha.parse_args(["--list"]).suites)
    assert bench_fmha.main(["--list", "--suites", "varlen,decode"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:-1]]
    assert len(rows) == (4 + 32) * len(shapes.PROVIDERS)
    decode = [r for r in rows if r["suite"] == "decode"]
    assert {r["block_size"] for r in decode} == {"16", "64"}
    big = next(r for r in decode if r["B"] == "128" and r["Sk"] == "32768")
    assert big["KV_MB"] == "17179.9"
    assert {r["seqlens"] for r in rows if r["suite"] == "varlen"} == {
        "+".join(map(str, PLANNED_SEQLENS))
    }


def test_dry_run_varlen_and_decode(tmp_path: Path) -> None:
    out = tmp_path / "dry"
    argv = ["--dry-run", "--out", str(out), "--suites", "varlen,decode"]
    assert bench_fmha.main([*argv, "--warmup-ms", "1", "--rep-ms", "2"]) == 0
    with (out / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == set(report.COLUMNS)
    assert {r["suite"] for r in rows} == {"varlen", "decode"}
    measured = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in rows if r["status"] != "ok"} == {"fa4"}  # the refusing fake
    assert all(
        r["check"] == ("FAIL" if r["provider"] == "sdpa_efficient" else "ok") for r in measured
    )
    for r in measured:
        if r["suite"] == "varlen":
            assert r["seqlens"] == "37+5+64+18+12" and r["block_size"] == ""
            assert r["gbps"] == r["bw_frac"] == r["copy_gbps"] == ""
            continue
        assert r["block_size"] in ("16", "64") and r["seqlens"] == ""
        dims = [int(r[c]) for c in ("batch", "seqlen_k", "num_heads", "num_kv_heads", "head_dim")]
        batch, context, heads, kv_heads, head_dim = dims
        case = Case("decode", batch, 1, context, heads, kv_heads, head_dim, True, block_size=16)
        gbps = shapes.kv_bytes(case, 2) / (float(r["ms"]) * 1e-3) / 1e9
        assert float(r["gbps"]) == pytest.approx(gbps, rel=1e-3)
        assert float(r["bw_frac"]) == pytest.approx(gbps / float(r["copy_gbps"]), rel=1e-2)
    assert len({r["copy_gbps"] for r in measured if r["suite"] == "decode"}) == 1  # once per run
    table = (out / "table.md").read_text()
    assert "## Varlen prefill" in table and "## Decode, paged KV cache" in table
    assert "- sequence lengths: 37, 5, 64, 18, 12" in table
    assert "## Throughput" not in table  # the two suites are not repeated in the generic table


def test_report_handles_blank_bandwidth_columns() -> None:
    base = {c: "" for c in report.COLUMNS} | {
        "gpu": "g",
        "kind": "kernel",
        "suite": "decode",
        "dtype": "bf16",
        "batch": "1",
        "seqlen_q": "1",
        "seqlen_k": "1024",
        "num_heads": "32",
        "num_kv_heads": "8",
        "head_dim": "128",
        "causal": "True",
        "block_size": "16",
        "status": "ok",
        "check": "ok",
    }
    rows = [
        base | {"provider": "sparsek", "ms": "0.01", "gbps": "419.4", "bw_frac": "0.15"},
        base | {"provider": "fa4", "ms": "0.02", "gbps": "209.7"},  # no copy bandwidth
        base | {"provider": "sdpa_flash", "ms": "0.04"},  # written before gbps existed
        base | {"provider": "sdpa_cudnn", "status": "skipped", "reason": "r"},
    ]
    table = report.markdown(rows)
    line = next(x for x in table.splitlines() if x.startswith("| bf16 | 1 | 1024"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # sparsek, sdpa_flash, sdpa_cudnn, fa4, sparsek us, sparsek/best, best peer
    assert cells[7:] == ["419 (0.15)", "40.0", "skip", "210", "10.0", "2.00", "fa4"]
    assert "Copy bandwidth (device-to-device, read + write): not measured" in table
    # Rows of the other suites still render with all the new columns blank.
    grid = base | {"suite": "grid", "provider": "sparsek", "ms": "1", "tflops": "100"}
    grid |= {"block_size": "", "seqlen_q": "1024"}
    assert "| kernel | grid |" in report.markdown([grid])
    assert math.isclose(float(rows[0]["gbps"]) / float(rows[1]["gbps"]), 2.0, rel_tol=1e-3)
