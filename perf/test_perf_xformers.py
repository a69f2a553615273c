"""CPU checks of the xformers suite's block-diagonal and local rows (run with `pytest perf/`).

The plan must have a row for every bias type `SparseKAttention` declares; FLOP counts and the
float32 reference are compared with xFormers' own definition of each mask
(`bias.materialize(...)` on the tensors xFormers is given: packed keys, the padded cache's
slots, the paged cache's physical pages; the local biases built from the case's window); the
cache inputs with a gather through the block table; the providers' cache entry points
(sparsek's and the operator's CPU reference, SDPA's math backend, the dry-run fake) with the
reference; the local rows' window reaching sparsek, and SDPA skipping them.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from perf import bench_fmha, report, shapes
from perf.inputs import CacheInputs, DenseInputs, VarlenInputs, make_inputs, reference
from perf.providers import (
    FakeProvider,
    SdpaProvider,
    SparsekProvider,
    SparsekXformersProvider,
    Unsupported,
    measuring,
    prepare_inputs,
)
from perf.reference import check_output
from perf.shapes import Case

needs_xformers = pytest.mark.skipif(
    importlib.util.find_spec("xformers") is None, reason="xformers is not installed"
)
CPU = torch.device("cpu")
BLOCK_DIAGONAL = shapes.PACKED_BIASES + shapes.PADDED_BIASES + shapes.PAGED_BIASES
LOCAL = tuple(b for b in shapes.XFORMERS_BIASES if b in shapes.LOCAL_BIASES)
LOCAL_DENSE = tuple(b for b in shapes.DENSE_BIASES if b in shapes.LOCAL_BIASES)
# Each local bias's problem without its window: the bias of its group with the same alignment.
WITHOUT_WINDOW = {
    "LocalAttentionFromBottomRightMask": "None",
    "LowerTriangularFromBottomRightLocalAttentionMask": "LowerTriangularFromBottomRightMask",
    "BlockDiagonalCausalLocalAttentionMask": "BlockDiagonalCausalMask",
    "BlockDiagonalCausalLocalAttentionFromBottomRightMask": (
        "BlockDiagonalCausalFromBottomRightMask"
    ),
    "BlockDiagonalLocalAttentionPaddedKeysMask": "BlockDiagonalPaddedKeysMask",
    "BlockDiagonalCausalLocalAttentionPaddedKeysMask": (
        "BlockDiagonalCausalWithOffsetPaddedKeysMask"
    ),
}


def _planned(cases: list[Case]) -> dict[str, Case]:
    """The xformers suite's block-diagonal cases by bias (one each)."""
    chosen = [c for c in shapes.select(cases, (shapes.XFORMERS_SUITE,)) if c.seqlens]
    by_bias = {c.bias: c for c in chosen}
    assert len(by_bias) == len(chosen)
    return by_bias


def _dry(bias: str) -> Case:
    return _planned(shapes.dry_run_cases())[bias]


def _dry_any(bias: str) -> Case:
    """The dry run's row of a bias with one row (every one but the bottom-right causal)."""
    (case,) = [c for c in shapes.dry_run_cases() if c.bias == bias]
    return case


def _without_window(case: Case) -> Case:
    return dataclasses.replace(case, bias=WITHOUT_WINDOW[case.bias], window=shapes.NO_WINDOW)


def _xformers_tensors(case: Case, inputs: VarlenInputs | CacheInputs) -> tuple[torch.Tensor, ...]:
    """q, k, v as xFormers gets them: batch 1, sequences (or cache slots / pages) along M."""
    if isinstance(inputs, VarlenInputs):
        return tuple(t.unsqueeze(0) for t in (inputs.q, inputs.k, inputs.v))
    kv_shape = (1, -1, *inputs.k_cache.shape[2:])
    return inputs.q.unsqueeze(0), inputs.k_cache.view(kv_shape), inputs.v_cache.view(kv_shape)


def _bias(case: Case, inputs: VarlenInputs | CacheInputs) -> object:
    table = inputs.block_table if isinstance(inputs, CacheInputs) else None
    return SparsekXformersProvider.attn_bias(case, CPU, table)


def test_plan_has_a_row_for_every_block_diagonal_bias() -> None:
    planned = _planned(shapes.full_cases())
    assert tuple(planned) == BLOCK_DIAGONAL
    lengths = shapes.varlen_seqlens()
    for bias, case in planned.items():
        dims = (case.batch, case.seqlen_q, case.num_heads, case.num_kv_heads, case.head_dim)
        assert dims == (16, 4096, 16, 16, 128) and case.seqlens == lengths
        assert case.causal == ("Causal" in bias)
        assert case.window == shapes.xformers_window(bias)
        if case.keys == "packed":  # the varlen suite's H16 problems
            assert case.seqlen_k == 4096 and case.kv_seqlens == () and case.kv_padding == 0
            assert case.block_size == 0 and case.total_tokens == case.key_tokens == 16384
            continue
        # Chunked prefill: each chunk after 4096 cached tokens, 8192 slots per sequence.
        assert case.kv_seqlens == tuple(n + 4096 for n in lengths)
        assert case.seqlen_k == case.kv_padding == 8192
        assert case.block_size == (16 if case.keys == "paged" else 0)
        assert case.key_tokens == 16384 + 16 * 4096
    # The varlen suite's MHA rows do the same work as the packed rows.
    varlen = {
        c.causal: c for c in shapes.select(shapes.full_cases(), ("varlen",)) if c.num_heads == 16
    }
    assert shapes.flops(planned["BlockDiagonalMask"]) == shapes.flops(varlen[False])
    for bias in ("BlockDiagonalCausalMask", "BlockDiagonalCausalFromBottomRightMask"):
        assert shapes.flops(planned[bias]) == shapes.flops(varlen[True])


def test_local_rows_carry_a_window_that_matters() -> None:
    """Causal local biases: window_size 1024 keys, sparsek (1023, 0); band ones 512 keys a
    side. Each row is its group's problem with the window (same lengths, same cache), and
    the window hides pairs (fewer FLOPs) in every one; on padded keys also cached keys."""
    full = shapes.select(shapes.full_cases(), (shapes.XFORMERS_SUITE,))
    local = {c.bias: c for c in full if c.bias in shapes.LOCAL_BIASES}
    assert tuple(local) == LOCAL and set(WITHOUT_WINDOW) == shapes.LOCAL_BIASES
    band = {"LocalAttentionFromBottomRightMask", "BlockDiagonalLocalAttentionPaddedKeysMask"}
    assert band == shapes.BAND_BIASES
    for bias, case in local.items():
        assert case.window == ((512, 512) if bias in band else (1023, 0))
        plain = _without_window(case)
        assert plain in full  # the very row of that bias
        assert shapes.flops(case) < shapes.flops(plain)
        assert shapes.kv_bytes(case) <= shapes.kv_bytes(plain)
        if case.keys == "padded":
            assert shapes.kv_bytes(case) < shapes.kv_bytes(plain)
    dense = local["LowerTriangularFromBottomRightLocalAttentionMask"]
    assert (dense.batch, dense.seqlen_q, dense.seqlen_k) == (4, 2048, 2048)
    # 1024 keys a query once the window is full: 2048 * 1024 - 1023 * 1024 / 2 pairs a head.
    assert shapes.flops(dense) == 4 * 4 * 16 * 128 * (2048 * 1024 - 1023 * 1024 // 2)


def test_case_validation_of_local_biases() -> None:
    dense = ("xformers", 1, 8, 8, 1, 1, 16)
    causal_local = "LowerTriangularFromBottomRightLocalAttentionMask"
    with pytest.raises(ValueError, match="exactly for the local biases"):
        Case(*dense, True, causal_local)
    with pytest.raises(ValueError, match="masks suite only"):
        Case(*dense, True, "LowerTriangularFromBottomRightMask", window=(3, 0))
    with pytest.raises(ValueError, match=r"must be \(window_size - 1, 0\)"):
        Case(*dense, True, causal_local, window=(3, 2))
    with pytest.raises(ValueError, match="each side >= 0"):
        Case(*dense, False, "LocalAttentionFromBottomRightMask", window=(-1, 2))
    ok = Case(*dense, False, "LocalAttentionFromBottomRightMask", window=(2, 1))
    assert ok.mask_text == "window=(2, 1)" and "window=(2, 1)" in ok.label()


@needs_xformers
def test_plan_covers_every_bias_the_operator_supports() -> None:
    from sparsek.integrations.xformers import SparseKAttention

    supported = {
        "None" if t is type(None) else t.__name__
        for t in SparseKAttention.SUPPORTED_ATTN_BIAS_TYPES
    }
    assert set(shapes.XFORMERS_BIASES) == supported
    for plan in (shapes.full_cases(), shapes.quick_cases(), shapes.dry_run_cases()):
        xformers = shapes.select(plan, (shapes.XFORMERS_SUITE,))
        assert {c.bias for c in xformers} == supported


def test_case_validation_of_block_diagonal_biases() -> None:
    seqlens, kv = (3, 5), (7, 9)
    with pytest.raises(ValueError, match="seqlens is given exactly"):
        Case("xformers", 2, 5, 5, 1, 1, 16, False, "BlockDiagonalMask")
    with pytest.raises(ValueError, match="seqlens is given exactly"):
        Case("xformers", 2, 5, 5, 1, 1, 16, False, "None", seqlens)
    with pytest.raises(ValueError, match="seqlen_k must be seqlen_q"):
        Case("xformers", 2, 5, 9, 1, 1, 16, True, "BlockDiagonalCausalMask", seqlens)
    with pytest.raises(ValueError, match="no kv_seqlens"):
        Case("xformers", 2, 5, 5, 1, 1, 16, True, "BlockDiagonalCausalMask", seqlens, kv_seqlens=kv)
    with pytest.raises(ValueError, match="does not match causal"):
        Case("xformers", 2, 5, 5, 1, 1, 16, True, "BlockDiagonalMask", seqlens)
    padded = "BlockDiagonalPaddedKeysMask"
    with pytest.raises(ValueError, match="kv_seqlens"):
        Case("xformers", 2, 5, 9, 1, 1, 16, False, padded, seqlens, kv_padding=16)
    with pytest.raises(ValueError, match="kv_padding 8 < max"):
        Case("xformers", 2, 5, 9, 1, 1, 16, False, padded, seqlens, kv_seqlens=kv, kv_padding=8)
    with pytest.raises(ValueError, match="paged biases only"):
        Case(
            "xformers", 2, 5, 9, 1, 1, 16, False, padded, seqlens, 16, kv_seqlens=kv, kv_padding=16
        )
    paged = "PagedBlockDiagonalPaddedKeysMask"
    with pytest.raises(ValueError, match="page size"):
        Case("xformers", 2, 5, 9, 1, 1, 16, False, paged, seqlens, kv_seqlens=kv, kv_padding=16)
    with pytest.raises(ValueError, match="not a multiple of the page size"):
        Case("xformers", 2, 5, 9, 1, 1, 16, False, paged, seqlens, 16, kv_seqlens=kv, kv_padding=24)
    with pytest.raises(ValueError, match="padded / paged biases only"):
        Case("grid", 2, 5, 5, 1, 1, 16, False, kv_padding=8)
    causal_paged = "PagedBlockDiagonalCausalWithOffsetPaddedKeysMask"
    ok = Case("xformers", 2, 5, 9, 1, 1, 16, True, causal_paged, seqlens, 16, kv, kv_padding=16)
    assert ok.keys == "paged" and ok.key_tokens == 16 and ok.total_tokens == 8


@needs_xformers
@pytest.mark.parametrize("bias", BLOCK_DIAGONAL)
def test_flops_count_the_pairs_xformers_leaves_visible(bias: str) -> None:
    case = _dry(bias)
    inputs = make_inputs(case, torch.float32, CPU, seed=0)
    assert isinstance(inputs, VarlenInputs | CacheInputs)
    q, k, _ = _xformers_tensors(case, inputs)
    mask = _bias(case, inputs).materialize((q.shape[1], k.shape[1]))  # type: ignore[attr-defined]
    pairs = int(torch.isfinite(mask).sum())
    assert shapes.flops(case) == 4 * case.num_heads * case.head_dim * pairs
    # K + V bytes: the valid keys only, never the padding slots (nor, on padded keys, the
    # cached keys a local bias's window leaves behind every query).
    visible_keys = int(torch.isfinite(mask).any(dim=0).sum())
    if case.window == shapes.NO_WINDOW:
        assert visible_keys == case.key_tokens
    assert shapes.kv_bytes(case, 2) == 2 * visible_keys * case.num_kv_heads * case.head_dim * 2


@needs_xformers
@pytest.mark.parametrize("bias", LOCAL_DENSE)
def test_dense_local_biases_are_xformers_masks(bias: str) -> None:
    """Dense local biases: FLOPs and the reference against xFormers' materialized mask of
    the bias the operator gets, and the operator's output against the reference."""
    case = _dry_any(bias)
    inputs = make_inputs(case, torch.float16, CPU, seed=7)  # xFormers on CPU: float16 only
    assert isinstance(inputs, DenseInputs)
    built = SparsekXformersProvider.attn_bias(case)
    assert type(built).__name__ == bias
    shape = (case.seqlen_q, case.seqlen_k)
    mask = built.materialize(shape, dtype=torch.float64)
    pairs = int(torch.isfinite(mask).sum())
    assert shapes.flops(case) == 4 * case.batch * case.num_heads * case.head_dim * pairs
    q, k, v = (t.double().transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v))
    scores = torch.matmul(q, k.transpose(2, 3)) * case.head_dim**-0.5
    probs = torch.softmax(scores + mask, dim=-1).nan_to_num(0.0)
    expected = torch.matmul(probs, v).transpose(1, 2)
    ref = reference(case, inputs)
    assert (ref.double() - expected).abs().max() < 1e-5
    provider = SparsekXformersProvider()
    with measuring(provider):
        out = prepare_inputs(provider, case, inputs)()
    assert check_output(out, ref, torch.float16).ok


@pytest.mark.parametrize("bias", LOCAL)
def test_local_rows_give_sparsek_the_window_and_skip_sdpa(bias: str) -> None:
    """sparsek's entry point of each local row (attention, attention_varlen,
    attention_with_kvcache: its CPU reference) and the dry-run fake pass the check against
    the windowed reference, which the same problem without the window fails; every SDPA
    backend refuses the row."""
    pytest.importorskip("sparsek")
    case = _dry_any(bias)
    inputs = make_inputs(case, torch.float32, CPU, seed=8)
    ref = reference(case, inputs)
    assert not check_output(reference(_without_window(case), inputs), ref, torch.float32).ok
    for provider in (SparsekProvider(), FakeProvider("sdpa_flash")):
        with measuring(provider):
            out = prepare_inputs(provider, case, inputs)()
        assert check_output(out, ref, torch.float32).ok, provider.name
    for name, backend in (
        ("sdpa_flash", "FLASH_ATTENTION"),
        ("sdpa_cudnn", "CUDNN_ATTENTION"),
        ("sdpa_efficient", "EFFICIENT_ATTENTION"),
    ):
        with pytest.raises(Unsupported, match="takes no sliding window"):
            prepare_inputs(SdpaProvider(name, backend), case, inputs)


@needs_xformers
@pytest.mark.parametrize("bias", BLOCK_DIAGONAL)
def test_reference_is_xformers_definition_of_the_mask(bias: str) -> None:
    """The harness's reference (per sequence, bottom-right) equals float64 attention with
    xFormers' materialized mask over the very tensors the operator is given: top-left
    BlockDiagonalCausalMask (keys = queries per block), bottom-right w.r.t. kv_seqlen for the
    ...CausalWithOffsetPaddedKeysMask ones, padding slots and unused pages hidden."""
    case = _dry(bias)
    inputs = make_inputs(case, torch.float32, CPU, seed=1)
    assert isinstance(inputs, VarlenInputs | CacheInputs)
    q, k, v = (t[0].double().transpose(0, 1) for t in _xformers_tensors(case, inputs))
    scores = torch.matmul(q, k.transpose(1, 2)) * case.head_dim**-0.5
    mask = _bias(case, inputs).materialize(tuple(scores.shape[1:]), dtype=torch.float64)  # type: ignore[attr-defined]
    probs = torch.softmax(scores + mask, dim=-1).nan_to_num(0.0)
    expected = torch.matmul(probs, v).transpose(0, 1)
    ref = reference(case, inputs)
    assert tuple(ref.shape) == tuple(expected.shape)
    assert (ref.double() - expected).abs().max() < 1e-5
    if case.causal and case.keys != "packed":
        # Top-left alignment would be a different mask here (kv_seqlen > query length).
        top_left = torch.ones(scores.shape[1:], dtype=torch.bool).tril()
        assert not torch.equal(torch.isfinite(mask), top_left & torch.isfinite(mask))


@pytest.mark.parametrize("bias", shapes.PADDED_BIASES + shapes.PAGED_BIASES)
def test_cache_inputs_hold_the_valid_keys(bias: str) -> None:
    case = _dry(bias)
    inputs = make_inputs(case, torch.float32, CPU, seed=2)
    assert isinstance(inputs, CacheInputs)
    assert inputs.cache_seqlens.tolist() == list(case.kv_seqlens)
    assert inputs.cu_seqlens_q.tolist()[-1] == inputs.q.shape[0] == case.total_tokens
    assert inputs.cu_seqlens_k.tolist()[-1] == inputs.k.shape[0] == case.key_tokens
    assert (inputs.max_seqlen_q, inputs.max_seqlen_k) == (case.seqlen_q, case.seqlen_k)
    table = inputs.block_table
    if case.keys == "padded":
        assert table is None
        assert tuple(inputs.k_cache.shape) == (case.batch, case.kv_padding, 2, 64)
    else:
        assert table is not None and table.dtype == torch.int32
        pages = case.batch * case.kv_padding // case.block_size
        assert tuple(inputs.k_cache.shape) == (pages, case.block_size, 2, 64)
        assert sorted(table.flatten().tolist()) == list(range(pages))
        assert table.flatten().tolist() != list(range(pages))  # scattered, not in order
    starts = inputs.cu_seqlens_k.tolist()
    for b, n in enumerate(case.kv_seqlens):
        for t in (0, n - 1):
            if table is None:
                want_k, want_v = inputs.k_cache[b, t], inputs.v_cache[b, t]
            else:
                page = int(table[b, t // case.block_size])
                want_k = inputs.k_cache[page, t % case.block_size]
                want_v = inputs.v_cache[page, t % case.block_size]
            assert torch.equal(inputs.k[starts[b] + t], want_k)
            assert torch.equal(inputs.v[starts[b] + t], want_v)


@pytest.mark.parametrize("bias", shapes.PADDED_BIASES + shapes.PAGED_BIASES)
def test_sparsek_and_fake_read_the_cache_like_the_reference(bias: str) -> None:
    pytest.importorskip("sparsek")
    case = _dry(bias)
    inputs = make_inputs(case, torch.float32, CPU, seed=3)
    ref = reference(case, inputs)
    for provider in (SparsekProvider(), FakeProvider("sdpa_flash")):
        with measuring(provider):
            out = prepare_inputs(provider, case, inputs)()
        assert check_output(out, ref, torch.float32).ok, provider.name
    wrong = FakeProvider("sdpa_efficient", mode="wrong")
    assert not check_output(prepare_inputs(wrong, case, inputs)(), ref, torch.float32).ok


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_sdpa_on_cache_inputs() -> None:
    """Non-causal: jagged SDPA with the queries' and the keys' own offsets (math backend on
    CPU). Causal is bottom-right w.r.t. kv_seqlen: cuDNN has none and is skipped."""
    case = _dry("PagedBlockDiagonalPaddedKeysMask")
    inputs = make_inputs(case, torch.float32, CPU, seed=4)
    provider = SdpaProvider("sdpa_math", "MATH")
    with measuring(provider):
        out = prepare_inputs(provider, case, inputs)()
    assert tuple(out.shape) == (case.total_tokens, 2, 64)
    assert check_output(out, reference(case, inputs), torch.float32).ok
    causal = _dry("BlockDiagonalCausalWithOffsetPaddedKeysMask")
    causal_inputs = make_inputs(causal, torch.float32, CPU, seed=5)
    assert isinstance(causal_inputs, CacheInputs)
    with pytest.raises(Unsupported, match="no bottom-right causal mask for cuDNN"):
        SdpaProvider("sdpa_cudnn", "CUDNN_ATTENTION").prepare_cache(causal, causal_inputs)


@needs_xformers
@pytest.mark.parametrize("bias", BLOCK_DIAGONAL)
def test_operator_gets_each_bias_in_its_layout(bias: str) -> None:
    case = _dry(bias)
    inputs = make_inputs(case, torch.float16, CPU, seed=6)  # xFormers on CPU: float16 only
    provider = SparsekXformersProvider()
    built = provider.attn_bias(case, CPU, getattr(inputs, "block_table", None))
    assert type(built).__name__ == bias
    with measuring(provider):
        out = prepare_inputs(provider, case, inputs)()
    assert out.dtype == torch.float16 and tuple(out.shape) == (case.total_tokens, 2, 64)
    assert check_output(out, reference(case, inputs), torch.float16).ok
    other = _dry("BlockDiagonalMask" if case.keys != "packed" else "BlockDiagonalPaddedKeysMask")
    with pytest.raises(Unsupported):
        prepare_inputs(provider, case, make_inputs(other, torch.float16, CPU, seed=6))


def test_list_and_report_show_one_row_per_bias(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_fmha.main(["--list", "--suites", "xformers", "--providers", "sparsek"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:-1]]
    assert [r["bias"] for r in rows] == [*shapes.DENSE_BIASES, "LowerTriangularFromBottomRightMask",
                                         *BLOCK_DIAGONAL]  # fmt: skip
    paged = [r for r in rows if r["bias"].startswith("Paged")]
    assert {(r["block_size"], r["kv_padding"], r["Sk"]) for r in paged} == {("16", "8192", "8192")}
    assert rows[-1]["kv_seqlens"].split("+")[:2] == ["5086", "4206"]

    def row(bias: str, provider: str, ms: str, **extra: str) -> dict[str, str]:
        return {c: "" for c in report.COLUMNS} | {
            "gpu": "g", "kind": "kernel", "suite": "xformers", "dtype": "bf16", "batch": "2",
            "seqlen_q": "5", "seqlen_k": "5", "num_heads": "2", "num_kv_heads": "2",
            "head_dim": "64", "causal": "False", "bias": bias, "provider": provider, "ms": ms,
            "tflops": "1", "status": "ok", "check": "ok",
        } | extra  # fmt: skip

    packed = {"seqlens": "3+5"}
    padded = {"seqlens": "3+5", "kv_seqlens": "7+9", "seqlen_k": "9", "note": "keys: padded"}
    table = report.markdown(
        [
            row("None", "sparsek", "1"),
            row("None", "sdpa_flash", "2"),
            row("BlockDiagonalMask", "sparsek", "1", **packed),
            row("BlockDiagonalMask", "sparsek_xformers", "0.5", **packed),
            row("BlockDiagonalMask", "sdpa_cudnn", "", status="skipped", reason="r", **packed),
            row("PagedBlockDiagonalPaddedKeysMask", "sparsek", "1", block_size="16", **padded),
            row("PagedBlockDiagonalPaddedKeysMask", "sdpa_flash", "3", block_size="16", **padded),
        ]
    )
    assert "## Throughput" not in table  # the suite has its own table
    body = [line for line in table.splitlines() if line.startswith("| bf16 |")]
    assert len(body) == 3
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    # dtype bias keys B Sq Sk q-tok k-tok H Hkv D causal | providers | sparsek/best, best peer
    assert cells[0][:8] == ["bf16", "None", "dense", "2", "5", "5", "10", "10"]
    assert cells[1][2:8] == ["packed", "2", "5", "5", "8", "8"]
    assert cells[1][-2:] == ["", ""]  # sparsek_xformers is no peer; the SDPA one skipped
    assert cells[2][2:8] == ["paged 16", "2", "5", "9", "8", "16"] and cells[2][-2:] == [
        "3.00",
        "sdpa_flash",
    ]
    assert "- kv_seqlens (padded / paged keys): 7, 9" in table and "- keys: padded" in table
