"""sparsek's varlen and KV-cache kernels on an H100, through `sparsek.attention_varlen` and
`sparsek.attention_with_kvcache`.

Compared against: a float64 attention (`tests/attention_oracle.py`), one sequence at a time,
on dense per-sequence tensors: cut out of the packed inputs (varlen), or generated before they
are written into the cache (KV cache: the expected values never read the cache layout, the
block table or unused slots). Bottom-right causal per sequence; a row that sees no key is 0
with lse -inf. sparsek's own reference is not used for expected values.

Tolerance, as in test_attention_gpu.py, relative to PyTorch's own error in the same dtype,
applied to each sequence's rows (max over that sequence; `tests/attention_oracle.py`):
    max|out - ref| <= 2 * max|sdpa_out - ref| + atol   (atol 1e-3 fp16, 2e-3 bf16)
where sdpa_out is torch SDPA in the input dtype, per sequence, with an explicit bottom-right
mask (K/V heads repeated, so SDPA picks its flash / memory-efficient kernels). The factor 2
allows a kernel a different but equally good rounding order than SDPA's; atol covers cases
where SDPA is (near) exact, e.g. one visible key, where out = v. Rows with no visible key
must be exactly 0. LSE: float32, -inf exactly where the reference's is, elsewhere atol 2e-3,
rtol 1e-3 (log-domain: scores are exact products of the same fp16/bf16 inputs, so only
fp32 accumulation error remains).

Outputs are poisoned with NaN before each launch through the allocation seam of every
launch path (`sparsek.launch.launcher.empty`) so unwritten elements fail; every output is
also checked for NaN and against the reference. Fallbacks are disabled (`SPARSEK_STRICT=1`)
so every check here runs a kernel.

Cache slots past `cache_seqlens`, spare blocks and block-table columns past a sequence's last
block hold random garbage (large keys: reading them changes the result), and in the last
tests NaN and out-of-range block ids (the API's contract: they are never read).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import pytest
import torch
from attention_oracle import ATOL, LSE_ATOL, LSE_RTOL, max_abs, reference_f64, sdpa_in_dtype
from torch import Tensor

import sparsek
from cutedsl_kernels.config import DENSE
from sparsek import registry
from sparsek.launch import launcher
from sparsek.tuning import Workload

pytestmark = [pytest.mark.gpu, pytest.mark.sm90, pytest.mark.usefixtures("strict_and_poisoned")]

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
HEAD_DIMS = registry.registered_head_dims("sm_90a")
# Feature tests run two corners of (dtype, head_dim), not the full matrix: each
# (dtype, head_dim, causal, layout, ...) combination may be a kernel compile (~5 s cold).
CORNERS = [
    pytest.param(torch.bfloat16, 128, id="bf16-d128"),
    pytest.param(torch.float16, 64, id="fp16-d64"),
]
PAGED = ["paged16", "paged64", "paged256"]
# Cache garbage keys are scaled up so that one garbage key read by mistake dominates its row.
GARBAGE_SCALE = 8.0


@pytest.fixture
def workloads(monkeypatch: pytest.MonkeyPatch) -> list[Workload]:
    """The workload of every forward kernel the launch paths ask for during the test (no
    plan is memoized when it starts: tests/conftest.py empties the memos)."""
    asked: list[Workload] = []
    forward_kernel = launcher.forward_kernel

    def recording(
        device, head_dim, dtype, mask, layout=DENSE, workload=Workload.DEFAULT, head_dim_v=None
    ):
        asked.append(workload)
        return forward_kernel(device, head_dim, dtype, mask, layout, workload, head_dim_v)

    monkeypatch.setattr(launcher, "forward_kernel", recording)
    return asked


# ---------------------------------------------------------------------------- inputs


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=gen)


def cu_seqlens(lens: list[int]) -> Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)


def int32(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def split_rows(x: Tensor, lens: list[int]) -> list[Tensor]:
    """Packed (total, ...) -> one (len, ...) view per sequence (rows past sum(lens) dropped)."""
    return list(x[: sum(lens)].split(lens))


# ---------------------------------------------------------------------------- expected values


class Expected(NamedTuple):
    """What a call must return, in the output's layout, and where each sequence's rows are."""

    out: Tensor  # float64 reference
    lse: Tensor  # float64 reference
    sdpa: Tensor  # torch SDPA in the inputs' dtype (PyTorch's own error)
    parts: list[int | slice]  # out[part]: one sequence's rows (or rows of no sequence)


def expected(q_seqs, k_seqs, v_seqs, causal: bool, scale: float):
    """Per sequence: (float64 out (sq, H, Dv), float64 lse (H, sq), SDPA out in q's dtype)."""
    return [
        (*reference_f64(qb, kb, vb, causal, scale), sdpa_in_dtype(qb, kb, vb, causal, scale))
        for qb, kb, vb in zip(q_seqs, k_seqs, v_seqs, strict=True)
    ]


def as_batched(per_seq) -> Expected:
    """4-D q layout: out (B, Sq, H, Dv), lse (B, H, Sq), SDPA out (B, Sq, H, Dv)."""
    out, lse, sdpa = (torch.stack([seq[i] for seq in per_seq]) for i in range(3))
    return Expected(out, lse, sdpa, list(range(len(per_seq))))


def as_packed(per_seq, total_q: int | None = None) -> Expected:
    """Packed layout: out (total_q, H, Dv), lse (H, total_q), SDPA out (total_q, H, Dv).

    Rows past the last sequence (up to `total_q`) belong to none: out 0, lse -inf.
    """
    out = torch.cat([seq[0] for seq in per_seq])
    lse = torch.cat([seq[1] for seq in per_seq], dim=1)
    sdpa = torch.cat([seq[2] for seq in per_seq])
    starts = list(itertools.accumulate((seq[0].shape[0] for seq in per_seq), initial=0))
    parts: list[int | slice] = [slice(a, b) for a, b in itertools.pairwise(starts)]
    extra = 0 if total_q is None else total_q - out.shape[0]
    if extra:
        parts.append(slice(out.shape[0], total_q))
        out = torch.cat([out, out.new_zeros(extra, *out.shape[1:])])
        sdpa = torch.cat([sdpa, sdpa.new_zeros(extra, *sdpa.shape[1:])])
        lse = torch.cat([lse, lse.new_full((lse.shape[0], extra), -math.inf)], dim=1)
    return Expected(out, lse, sdpa, parts)


def check_close(out: Tensor, expect: Expected, lse: Tensor | None = None) -> list[float]:
    """Check `out` (and `lse`) against `expect`; returns the output bound of each part.

    The bound is applied per sequence, not to the whole batch: sequences differ in output
    magnitude (one key: |out| ~ 1; 2000 keys: |out| ~ 0.05), and a batch-wide bound set by
    the short ones would hide errors in the long ones.
    """
    assert out.shape == expect.out.shape and out.dtype == expect.sdpa.dtype
    assert not torch.isnan(out).any(), "NaN in out: unwritten (poisoned) or unused cache slots read"
    bounds = []
    for i, part in enumerate(expect.parts):
        ref = expect.out[part]
        err, err_sdpa = max_abs(out[part], ref), max_abs(expect.sdpa[part], ref)
        bound = 2 * err_sdpa + ATOL[out.dtype]
        assert err <= bound, (
            f"sequence {i}: max error {err:.3e} > {bound:.3e} (sdpa error {err_sdpa:.3e})"
        )
        bounds.append(bound)
    # ref lse (H, total_q) or (B, H, Sq) -> rows of out (total_q, H) or (B, Sq, H).
    no_key = torch.isneginf(expect.lse)
    assert (out[no_key.transpose(-1, -2)] == 0).all(), "rows that see no key must be 0"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == expect.lse.shape
        assert torch.equal(torch.isneginf(lse), no_key), "lse must be -inf exactly where no key"
        torch.testing.assert_close(
            lse[~no_key].double(), expect.lse[~no_key], atol=LSE_ATOL, rtol=LSE_RTOL
        )
    return bounds


# ---------------------------------------------------------------------------- caches


def sequences(gen: torch.Generator, lens: list[int], hkv: int, d: int, dtype: torch.dtype):
    """Each sequence's keys and values, dense (len, Hkv, D): what the cache holds."""
    ks = [randn(gen, n, hkv, d, dtype=dtype) for n in lens]
    vs = [randn(gen, n, hkv, d, dtype=dtype) for n in lens]
    return ks, vs


def build_cache(layout: str, ks, vs, capacity: int, seed: int, *, stale: bool = False):
    """Write the sequences into a cache: (k_cache, v_cache, block_table or None).

    "contiguous": (B, capacity, Hkv, D). "paged<N>": (num_blocks, N, Hkv, D) with every
    sequence's blocks at shuffled ids (a random permutation), partially filled last blocks,
    3 spare blocks, and one block-table column past the longest sequence. Unused slots and
    blocks hold garbage (NaN when `stale`); block-table entries past a sequence's last block
    point at spare blocks (out of range when `stale`).
    """
    gen = generator(seed)
    hkv, d = ks[0].shape[1:]
    dtype = ks[0].dtype
    lens = [kb.shape[0] for kb in ks]

    def garbage(*shape: int, scale: float) -> Tensor:
        if stale:
            return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        return randn(gen, *shape, dtype=dtype) * scale

    if layout == "contiguous":
        k_cache = garbage(len(ks), capacity, hkv, d, scale=GARBAGE_SCALE)
        v_cache = garbage(len(ks), capacity, hkv, d, scale=1.0)
        for b, (kb, vb) in enumerate(zip(ks, vs, strict=True)):
            k_cache[b, : lens[b]], v_cache[b, : lens[b]] = kb, vb
        return k_cache, v_cache, None

    block_size = int(layout.removeprefix("paged"))
    used = [-(-n // block_size) for n in lens]
    spare = 3
    num_blocks = sum(used) + spare
    max_blocks = max(used) + 1
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    spare_ids = order[sum(used) :]
    k_cache = garbage(num_blocks, block_size, hkv, d, scale=GARBAGE_SCALE)
    v_cache = garbage(num_blocks, block_size, hkv, d, scale=1.0)
    rows = []
    start = 0
    for b, (kb, vb) in enumerate(zip(ks, vs, strict=True)):
        ids = order[start : start + used[b]]
        start += used[b]
        # Token t of sequence b: block ids[t // block_size], offset t % block_size.
        t = torch.arange(lens[b], device=DEVICE)
        blocks = torch.tensor(ids, dtype=torch.long, device=DEVICE)[t // block_size]
        k_cache[blocks, t % block_size], v_cache[blocks, t % block_size] = kb, vb
        # Never read. Stale: 2**30 blocks lies far outside any allocation, so a read faults.
        pad = [2**30 if stale else spare_ids[i % spare] for i in range(max_blocks - used[b])]
        rows.append(ids + pad)
    return k_cache, v_cache, int32(rows).view(len(ks), max_blocks)


# ---------------------------------------------------------------------------- varlen

# name -> (q lengths, k lengths, num_heads, num_kv_heads)
VARLEN_CASES = {
    # GQA 4:1, Sq == Sk: empty, 1-token and odd sequences beside one of 2000 tokens.
    "gqa-mixed": ([0, 1, 3, 17, 2000, 129, 0, 64, 1, 255], None, 8, 2),
    # MQA, Sk != Sq: keys longer, shorter (causal: the first Sq - Sk rows see nothing),
    # queries without keys, keys without queries.
    "mqa-sq!=sk": (
        [1, 3, 100, 257, 0, 50, 31, 1, 700],
        [7, 0, 300, 128, 5, 50, 1, 1000, 1999],
        8,
        1,
    ),
}


def varlen_inputs(lens_q, lens_k, h, hkv, d, dtype, seed):
    gen = generator(seed)
    q = randn(gen, sum(lens_q), h, d, dtype=dtype)
    k = randn(gen, sum(lens_k), hkv, d, dtype=dtype)
    v = randn(gen, sum(lens_k), hkv, d, dtype=dtype)
    return q, k, v


def varlen_expected(q, k, v, lens_q, lens_k, causal, scale, total_q=None):
    per_seq = expected(
        split_rows(q, lens_q), split_rows(k, lens_k), split_rows(v, lens_k), causal, scale
    )
    return as_packed(per_seq, total_q)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("case", VARLEN_CASES.values(), ids=VARLEN_CASES.keys())
def test_varlen_matches_reference(case, d, dtype, causal) -> None:
    lens_q, lens_k, h, hkv = case
    lens_k = lens_k or lens_q
    q, k, v = varlen_inputs(lens_q, lens_k, h, hkv, d, dtype, seed=d + int(causal))
    out, lse = sparsek.attention_varlen(
        q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k),
        causal=causal, return_lse=True,
    )  # fmt: skip
    assert lse.shape == (h, q.shape[0])
    check_close(out, varlen_expected(q, k, v, lens_q, lens_k, causal, d**-0.5), lse)


@pytest.mark.parametrize("packing", ["qkv", "heads"])
@pytest.mark.parametrize(("dtype", "d"), CORNERS)
def test_varlen_strided_views_of_packed_qkv(dtype, d, packing) -> None:
    """q/k/v as views of one packed tensor (FlashAttention's qkvpacked layouts), custom scale."""
    lens = [1, 77, 300, 0, 5, 129]
    gen = generator(11)
    if packing == "qkv":  # (total, 3, H, D).unbind(1): MHA
        h = hkv = 4
        q, k, v = randn(gen, sum(lens), 3, h, d, dtype=dtype).unbind(1)
    else:  # (total, H + 2 Hkv, D) split along heads: GQA 4:1
        h, hkv = 8, 2
        q, k, v = randn(gen, sum(lens), h + 2 * hkv, d, dtype=dtype).split([h, hkv, hkv], dim=1)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cu = cu_seqlens(lens)
    out, lse = sparsek.attention_varlen(
        q, k, v, cu, cu, max(lens), max(lens), causal=True, softmax_scale=0.08, return_lse=True
    )
    check_close(out, varlen_expected(q, k, v, lens, lens, True, 0.08), lse)


def test_varlen_rows_past_the_last_sequence() -> None:
    """Rows of q past cu_seqlens_q[-1] (CUDA-graph padding) belong to no sequence: 0 / -inf."""
    lens_q, lens_k = [3, 0, 130], [5, 9, 130]
    q, k, v = varlen_inputs(lens_q, lens_k, 8, 2, 128, torch.bfloat16, seed=12)
    gen = generator(13)
    q = torch.cat([q, randn(gen, 5, 8, 128, dtype=q.dtype)])
    k, v = (torch.cat([t, randn(gen, 7, 2, 128, dtype=t.dtype)]) for t in (k, v))
    out, lse = sparsek.attention_varlen(
        q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 130, 130, causal=True, return_lse=True
    )
    expect = varlen_expected(q, k, v, lens_q, lens_k, True, 128**-0.5, total_q=q.shape[0])
    check_close(out, expect, lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("dtype", "d"), CORNERS)
@pytest.mark.parametrize(
    ("lens_q", "lens_k"), [([3, 0, 130], [5, 9, 130]), ([200, 7], [64, 1])], ids=["tail", "short"]
)
def test_varlen_nan_padding_stays_out(lens_q, lens_k, dtype, d, causal) -> None:
    """Rows past cu_seqlens_q/k[-1] hold NaN (torch.empty padding, as serving engines
    allocate): the last sequence's partial key tile reads them, and they must not reach
    any output (0 * NaN in P V); the padding q rows get 0 / -inf."""
    q, k, v = varlen_inputs(lens_q, lens_k, 8, 2, d, dtype, seed=15 + d)
    nan = float("nan")
    q = torch.cat([q, torch.full((5, 8, d), nan, dtype=dtype, device=DEVICE)])
    k, v = (torch.cat([t, torch.full((70, 2, d), nan, dtype=dtype, device=DEVICE)]) for t in (k, v))
    out, lse = sparsek.attention_varlen(
        q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k),
        causal=causal, return_lse=True,
    )  # fmt: skip
    expect = varlen_expected(q, k, v, lens_q, lens_k, causal, d**-0.5, total_q=q.shape[0])
    check_close(out, expect, lse)


def test_varlen_deterministic() -> None:
    lens_q, _, h, hkv = VARLEN_CASES["gqa-mixed"]
    q, k, v = varlen_inputs(lens_q, lens_q, h, hkv, 128, torch.bfloat16, seed=14)
    cu, longest = cu_seqlens(lens_q), max(lens_q)
    first = sparsek.attention_varlen(q, k, v, cu, cu, longest, longest, causal=True)
    again = sparsek.attention_varlen(q, k, v, cu, cu, longest, longest, causal=True)
    assert isinstance(first, Tensor) and torch.equal(first, again)
    out, lse = sparsek.attention_varlen(
        q, k, v, cu, cu, longest, longest, causal=True, return_lse=True
    )
    out_again, lse_again = sparsek.attention_varlen(
        q, k, v, cu, cu, longest, longest, causal=True, return_lse=True
    )
    assert torch.equal(out, out_again) and torch.equal(lse, lse_again)
    check_close(first, varlen_expected(q, k, v, lens_q, lens_q, True, 128**-0.5))


# ---------------------------------------------------------------------------- KV cache

# 0: no key (out 0, lse -inf); 4096: the contiguous cache's full capacity.
DECODE_LENS = [1, 17, 0, 1000, 4096]
DECODE_CAPACITY = 4096
HEADS = [pytest.param(32, 8, id="gqa32:8"), pytest.param(8, 1, id="mqa")]


def kvcache_case(lens, capacity, layout, h, hkv, d, dtype, seed, *, stale=False):
    gen = generator(seed)
    ks, vs = sequences(gen, lens, hkv, d, dtype)
    k_cache, v_cache, table = build_cache(layout, ks, vs, capacity, seed + 1, stale=stale)
    return gen, ks, vs, k_cache, v_cache, table


@pytest.mark.parametrize("layout", ["contiguous", "paged64"])
@pytest.mark.parametrize(("h", "hkv"), HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_kvcache_decode(d, dtype, h, hkv, layout) -> None:
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        DECODE_LENS, DECODE_CAPACITY, layout, h, hkv, d, dtype, seed=20 + d + h
    )
    q = randn(gen, len(DECODE_LENS), 1, h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(DECODE_LENS), table, return_lse=True
    )
    assert lse.shape == (len(DECODE_LENS), h, 1)
    check_close(out, as_batched(expected(list(q), ks, vs, True, d**-0.5)), lse)


# 320: a short cache (never split anyway); 1300: more key tiles than the short-cache rule
# leaves unsplit, where the wave heuristic would split (the 4c75f04 fix: never for these).
@pytest.mark.parametrize("capacity", [320, 1300])
@pytest.mark.parametrize("layout", ["contiguous", "paged16", "paged64"])
@pytest.mark.parametrize(("dtype", "d"), CORNERS)
def test_kvcache_decode_batch_filling_the_gpu(dtype, d, layout, capacity, workloads) -> None:
    """160 (sequence, KV head) tiles, more than the SMs: the `DECODE_FILLS_GPU` decode
    kernel (two CTAs per SM), never split, with odd and empty sequences among them."""
    lens = [(37 * i) % 300 for i in range(20)]  # 0, 37, ..., 1 to 296
    if capacity > 320:
        lens[7] = capacity  # one sequence fills its cache
    h, hkv = 32, 8
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        lens, capacity, layout, h, hkv, d, dtype, 90
    )
    q = randn(gen, len(lens), 1, h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(lens), table, return_lse=True
    )
    check_close(out, as_batched(expected(list(q), ks, vs, True, d**-0.5)), lse)
    assert Workload.DECODE_FILLS_GPU in workloads


@pytest.mark.parametrize(("dtype", "d", "layout"), [
    pytest.param(torch.bfloat16, 128, "paged16", id="bf16-d128-paged16"),
    pytest.param(torch.float16, 64, "contiguous", id="fp16-d64-contiguous"),
])  # fmt: skip
def test_kvcache_decode_packed_queries(dtype, d, layout) -> None:
    """Decode through cu_seqlens_q: q (total_q, H, D) with one token per sequence."""
    h, hkv, batch = 32, 8, len(DECODE_LENS)
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        DECODE_LENS, DECODE_CAPACITY, layout, h, hkv, d, dtype, seed=30 + d
    )
    q = randn(gen, batch, h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(DECODE_LENS), table,
        cu_seqlens_q=cu_seqlens([1] * batch), max_seqlen_q=1, return_lse=True,
    )  # fmt: skip
    assert lse.shape == (h, batch)
    check_close(out, as_packed(expected(split_rows(q, [1] * batch), ks, vs, True, d**-0.5)), lse)


@pytest.mark.parametrize("num_splits", [1, 3, 0], ids=["no-split", "3-splits", "auto"])
@pytest.mark.parametrize("layout", ["contiguous", "paged16"])
@pytest.mark.parametrize("q_lens", [[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0] * 5], ids=str)
def test_kvcache_decode_packed_with_empty_sequences(q_lens, layout, num_splits) -> None:
    """Packed decode (max_seqlen_q 1, total_q == batch) where some sequences have no query:
    every token is its own sequence's, and the tokens past cu_seqlens_q[-1] (no sequence)
    get out 0 and lse -inf."""
    h, hkv, d, dtype, batch = 32, 8, 128, torch.bfloat16, len(DECODE_LENS)
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        DECODE_LENS, DECODE_CAPACITY, layout, h, hkv, d, dtype, seed=31
    )
    q = randn(gen, batch, h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(DECODE_LENS), table, cu_seqlens_q=cu_seqlens(q_lens),
        max_seqlen_q=1, num_splits=num_splits, return_lse=True,
    )  # fmt: skip
    check_packed_decode(out, lse, q, ks, vs, q_lens)


def test_kvcache_decode_packed_with_empty_sequences_filling_the_gpu(workloads) -> None:
    """The same through the `DECODE_FILLS_GPU` tiles: 48 sequences x 8 KV heads, every
    third sequence without a query."""
    h, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    lens = [(53 * i) % 700 + 1 for i in range(48)]
    q_lens = [0 if i % 3 == 1 else 1 for i in range(48)]
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(lens, 704, "paged16", h, hkv, d, dtype, 33)
    q = randn(gen, len(lens), h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(lens), table, cu_seqlens_q=cu_seqlens(q_lens),
        max_seqlen_q=1, return_lse=True,
    )  # fmt: skip
    check_packed_decode(out, lse, q, ks, vs, q_lens)
    assert Workload.DECODE_FILLS_GPU in workloads


def check_packed_decode(out, lse, q, ks, vs, q_lens: list[int]) -> None:
    """Packed decode results: token i is the i-th sequence with a query, the rest 0/-inf."""
    owned = [b for b, n in enumerate(q_lens) if n]
    padding = slice(len(owned), None)
    assert (out[padding] == 0).all() and torch.isneginf(lse[:, padding]).all()
    if owned:
        per_seq = expected(
            split_rows(q, [1] * len(owned)), [ks[b] for b in owned], [vs[b] for b in owned],
            True, q.shape[-1] ** -0.5,
        )  # fmt: skip
        check_close(out, as_packed(per_seq, total_q=len(q_lens)), lse)


@pytest.mark.parametrize("num_splits", [1, 2], ids=["no-split", "2-splits"])
def test_kvcache_decode_batch_past_the_grid_z_limit(num_splits: int) -> None:
    """70,000 sequences (x 2 splits: 140,000 batch entries), more than a grid's z extent
    (65,535): the forward and the combine launches fold the batch into x. Checked against
    a vectorised float64 reference and torch SDPA's own error."""
    batch, capacity, h, hkv, d, dtype = 70_000, 32, 4, 1, 64, torch.bfloat16
    gen = generator(71)
    q = randn(gen, batch, 1, h, d, dtype=dtype)
    k, v = (randn(gen, batch, capacity, hkv, d, dtype=dtype) for _ in range(2))
    lens = torch.randint(0, capacity + 1, (batch,), device=DEVICE, generator=gen)
    out, lse = sparsek.attention_with_kvcache(
        q, k, v, lens.int(), num_splits=num_splits, return_lse=True
    )
    visible = torch.arange(capacity, device=DEVICE) < lens[:, None]  # (B, S)
    scale = d**-0.5
    kf, vf = (t.double().expand(batch, capacity, h, d) for t in (k, v))
    scores = torch.einsum("bqhd,bshd->bhqs", q.double(), kf) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)  # (B, H, 1)
    probs = torch.exp(scores - ref_lse.unsqueeze(-1)).nan_to_num(0.0)
    ref = torch.einsum("bhqs,bshd->bqhd", probs, vf)
    # SDPA's own error, in chunks of sequences (its cuDNN path refuses a batch this large).
    sdpa = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            q[s].transpose(1, 2), kf[s].to(dtype).transpose(1, 2), vf[s].to(dtype).transpose(1, 2),
            attn_mask=visible[s, None, None, :], scale=scale,
        ).transpose(1, 2)
        for s in (slice(i, i + 8192) for i in range(0, batch, 8192))
    ]).nan_to_num(0.0)  # fmt: skip
    assert not torch.isnan(out).any()
    err, err_sdpa = max_abs(out, ref), max_abs(sdpa, ref)
    assert err <= 2 * err_sdpa + ATOL[dtype], (err, err_sdpa)
    has_keys = lens > 0
    assert torch.isneginf(lse[~has_keys]).all()
    torch.testing.assert_close(
        lse[has_keys].double(), ref_lse[has_keys], atol=LSE_ATOL, rtol=LSE_RTOL
    )


# New queries per sequence (the last q_len tokens of cache_seqlens[b]): fresh prefill
# (q_len == cache len), chunks after a prefix, a sequence with no new query, one decode
# token, and a sequence at the contiguous cache's full capacity.
PREFILL_Q_LENS = [3, 100, 17, 64, 0, 1, 50]
PREFILL_CACHE_LENS = [3, 1100, 40, 64, 300, 777, 2048]
PREFILL_CAPACITY = 2048


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", ["contiguous", *PAGED])
@pytest.mark.parametrize(("dtype", "d", "h", "hkv"), [
    pytest.param(torch.bfloat16, 128, 32, 8, id="bf16-d128-gqa32:8"),
    pytest.param(torch.float16, 64, 8, 1, id="fp16-d64-mqa"),
])  # fmt: skip
def test_kvcache_chunked_prefill(dtype, d, h, hkv, layout, causal) -> None:
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        PREFILL_CACHE_LENS, PREFILL_CAPACITY, layout, h, hkv, d, dtype, seed=40 + d
    )
    q = randn(gen, sum(PREFILL_Q_LENS), h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(PREFILL_CACHE_LENS), table,
        cu_seqlens_q=cu_seqlens(PREFILL_Q_LENS), max_seqlen_q=max(PREFILL_Q_LENS),
        causal=causal, return_lse=True,
    )  # fmt: skip
    assert lse.shape == (h, q.shape[0])
    per_seq = expected(split_rows(q, PREFILL_Q_LENS), ks, vs, causal, d**-0.5)
    check_close(out, as_packed(per_seq), lse)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "paged16"])
def test_kvcache_chunked_prefill_rows_past_the_last_sequence(layout, num_splits) -> None:
    """Packed q with 150 rows past cu_seqlens_q[-1] (CUDA-graph padding, more than a query
    tile): the kernel (unsplit) or the combine (split) writes them 0 / -inf into the
    NaN-poisoned outputs; the host does not fill them."""
    h, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        PREFILL_CACHE_LENS, PREFILL_CAPACITY, layout, h, hkv, d, dtype, seed=47
    )
    q = randn(gen, sum(PREFILL_Q_LENS) + 150, h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(PREFILL_CACHE_LENS), table,
        cu_seqlens_q=cu_seqlens(PREFILL_Q_LENS), max_seqlen_q=max(PREFILL_Q_LENS),
        causal=True, num_splits=num_splits, return_lse=True,
    )  # fmt: skip
    per_seq = expected(split_rows(q, PREFILL_Q_LENS), ks, vs, True, d**-0.5)
    check_close(out, as_packed(per_seq, total_q=q.shape[0]), lse)


def test_kvcache_multi_token_decode_batched() -> None:
    """4-D q with seqlen_q = 4 (speculative decoding), causal against cache_seqlens."""
    lens, h, hkv, d, dtype = [4, 5, 1000, 260], 32, 8, 128, torch.bfloat16
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        lens, 1024, "paged256", h, hkv, d, dtype, seed=50
    )
    q = randn(gen, len(lens), 4, h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(lens), table, return_lse=True
    )
    assert lse.shape == (len(lens), h, 4)
    check_close(out, as_batched(expected(list(q), ks, vs, True, d**-0.5)), lse)


@pytest.mark.parametrize("layout", ["contiguous", "paged64"])
@pytest.mark.parametrize(("dtype", "d"), CORNERS)
def test_kvcache_num_splits_agree(dtype, d, layout) -> None:
    """num_splits 1 (no split), 0 (auto), 4 and 37 each match the reference, and one another.

    Each is held to the reference bound; pairwise they are held to the same bound (two
    orders of reducing the same fp32 partials differ by about an output ulp, far below it).
    37 splits of the 37 key tiles of capacity: the combine merges more than one warp's
    worth (32) of partials, and most splits of the short sequences are empty (LSE -inf,
    O unwritten). The split path is also deterministic.
    """
    lens, h, hkv = [4736, 777, 1], 32, 8
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        lens, 4736, layout, h, hkv, d, dtype, seed=60 + d
    )
    q = randn(gen, len(lens), 1, h, d, dtype=dtype)
    expect = as_batched(expected(list(q), ks, vs, True, d**-0.5))
    outs = {}
    for num_splits in (1, 0, 4, 37):
        out, lse = sparsek.attention_with_kvcache(
            q, k_cache, v_cache, int32(lens), table, num_splits=num_splits, return_lse=True
        )
        bounds = check_close(out, expect, lse)
        outs[num_splits] = out
    for a, b in itertools.combinations(outs, 2):
        for seq, bound in enumerate(bounds):
            diff = max_abs(outs[a][seq], outs[b][seq])
            assert diff <= bound, f"num_splits={a} vs {b}, sequence {seq}: {diff:.3e} > {bound:.3e}"
    again = sparsek.attention_with_kvcache(q, k_cache, v_cache, int32(lens), table, num_splits=4)
    assert torch.equal(again, outs[4])


@pytest.mark.parametrize("layout", ["contiguous", "paged256"])
def test_kvcache_decode_64k_context(layout) -> None:
    lens, h, hkv, d, dtype = [65536], 32, 8, 128, torch.bfloat16
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        lens, 65536, layout, h, hkv, d, dtype, seed=70
    )
    q = randn(gen, 1, 1, h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(lens), table, return_lse=True
    )
    check_close(out, as_batched(expected(list(q), ks, vs, True, d**-0.5)), lse)


# Last in the file: a kernel that reads a block-table entry it must not read may fault, and a
# CUDA fault ends every later test of the session.
@pytest.mark.parametrize("layout", ["contiguous", "paged16"])
def test_kvcache_never_reads_unused_slots_or_table_entries(layout) -> None:
    """NaN in every unused cache slot (and spare block), out-of-range unused table entries.

    Masking scores is not enough here: a zero probability times a NaN value is NaN, so the
    kernel must not let V rows past cache_seqlens into P @ V (FlashAttention-3/4 had this bug
    with TMA loads of whole blocks: Dao-AILab/flash-attention#1745, #2374).
    """
    lens, q_lens, h, hkv, d, dtype = [5, 0, 33, 100], [2, 0, 1, 7], 8, 2, 128, torch.bfloat16
    gen, ks, vs, k_cache, v_cache, table = kvcache_case(
        lens, 112, layout, h, hkv, d, dtype, seed=80, stale=True
    )
    q = randn(gen, sum(q_lens), h, d, dtype=dtype)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, int32(lens), table,
        cu_seqlens_q=cu_seqlens(q_lens), max_seqlen_q=max(q_lens), return_lse=True,
    )  # fmt: skip
    check_close(out, as_packed(expected(split_rows(q, q_lens), ks, vs, True, d**-0.5)), lse)
