"""`sparsek.attention_with_kvcache` and `torch.ops.sparsek.attention_with_kvcache` on CPU.

Compared against: `sparsek.reference.reference_attention` in float64, called once per
sequence on the first cache_seqlens[b] tokens of that sequence's cache, read token by token
through the block table for paged caches (no padding, masks or batched gathers). Also:
contiguous vs paged caches of the same tokens, the malformed-input contract, opcheck, the
fake implementation and torch.compile(fullgraph=True).
"""

from __future__ import annotations

from collections.abc import Callable

import malformed
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsek
from sparsek import routing
from sparsek.reference import reference_attention

op = torch.ops.sparsek.attention_with_kvcache
i32 = torch.int32


@pytest.fixture(autouse=True)
def _fresh_log_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_logged_reasons", set())
    monkeypatch.delenv("SPARSEK_STRICT", raising=False)


def make_caches(lens, capacity, hkv=2, d=32, block_size=16, seed=0):
    """Contiguous (B, capacity, Hkv, D) caches and the same tokens in shuffled paged blocks.

    Slots past each length hold NaN (what stale torch.empty memory may hold); spare blocks
    and block-table entries past each sequence's last block are garbage too.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    k = torch.randn(batch, capacity, hkv, d, generator=gen)
    v = torch.randn(batch, capacity, hkv, d, generator=gen)
    for b, n in enumerate(lens):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    max_blocks = -(-capacity // block_size)
    num_blocks = batch * max_blocks + 3
    order = torch.randperm(num_blocks, generator=gen)
    table = order[: batch * max_blocks].view(batch, max_blocks).to(i32)
    k_paged = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    v_paged = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    for b, n in enumerate(lens):
        for t in range(n):
            blk, off = int(table[b, t // block_size]), t % block_size
            k_paged[blk, off], v_paged[blk, off] = k[b, t], v[b, t]
        first_unused = -(-n // block_size)
        table[b, first_unused:] = 10_000  # never read
    seqlens = torch.tensor(lens, dtype=i32)
    return (k, v), (k_paged, v_paged, table), seqlens


def per_sequence_reference(q_seqs, k, v, lens, causal, scale=None):
    """float64 outputs, one per sequence: q_seqs[b] (q_len, H, D) against k[b, :lens[b]]."""
    outs, lses = [], []
    for b, qb in enumerate(q_seqs):
        n = lens[b]
        o, s = reference_attention(
            qb[None], k[b : b + 1, :n], v[b : b + 1, :n], causal=causal,
            softmax_scale=scale, compute_dtype=torch.float64,
        )  # fmt: skip
        outs.append(o[0])
        lses.append(s[0])
    return outs, lses


def close(got, want) -> None:
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


DECODE_LENS = [1, 2, 17, 64, 129, 300]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize(("h", "hkv"), [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_decode_one_query(paged: bool, h: int, hkv: int) -> None:
    (k, v), (kp, vp, table), seqlens = make_caches(DECODE_LENS, 300, hkv=hkv)
    q = torch.randn(len(DECODE_LENS), 1, h, 32)
    caches = (kp, vp, seqlens, table) if paged else (k, v, seqlens)
    out, lse = sparsek.attention_with_kvcache(q, *caches, return_lse=True)
    assert out.shape == q.shape and lse.shape == (len(DECODE_LENS), h, 1)
    want, want_lse = per_sequence_reference(list(q), k, v, DECODE_LENS, causal=True)
    close(out, torch.stack(want))
    close(lse, torch.stack(want_lse))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("block_size", [16, 48])
def test_batched_multi_query(causal: bool, block_size: int) -> None:
    lens = [4, 9, 50, 3]  # the last one has fewer cache tokens than queries' span allows
    (k, v), (kp, vp, table), seqlens = make_caches(lens, 64, block_size=block_size)
    q = torch.randn(4, 4, 6, 32)
    out, lse = sparsek.attention_with_kvcache(
        q, kp, vp, seqlens, table, causal=causal, softmax_scale=0.2, return_lse=True
    )
    want, want_lse = per_sequence_reference(list(q), k, v, lens, causal, 0.2)
    close(out, torch.stack(want))
    close(lse, torch.stack(want_lse))
    if causal:  # sequence 3: 3 cache tokens, 4 queries -> query 0 sees nothing
        assert (out[3, 0] == 0).all() and torch.isneginf(lse[3, :, 0]).all()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_chunked_prefill_packed(paged: bool, causal: bool) -> None:
    q_lens, lens = [0, 1, 5, 16, 3, 7], [7, 1, 40, 16, 100, 0]
    (k, v), (kp, vp, table), seqlens = make_caches(lens, 112, hkv=1)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=i32)
    q = torch.randn(sum(q_lens), 4, 32)
    caches = (kp, vp, seqlens, table) if paged else (k, v, seqlens)
    out, lse = sparsek.attention_with_kvcache(
        q, *caches, cu_seqlens_q=cu_q, max_seqlen_q=16, causal=causal, return_lse=True
    )
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    want, want_lse = per_sequence_reference(list(q.split(q_lens)), k, v, lens, causal)
    close(out, torch.cat(want))
    close(lse, torch.cat(want_lse, dim=1))


def test_contiguous_and_paged_caches_agree() -> None:
    lens = [33, 1, 64, 20]
    (k, v), (kp, vp, table), seqlens = make_caches(lens, 64, block_size=32, seed=3)
    q = torch.randn(4, 2, 4, 32)
    contiguous = sparsek.attention_with_kvcache(q, k, v, seqlens, return_lse=True)
    paged = sparsek.attention_with_kvcache(q, kp, vp, seqlens, table, return_lse=True)
    for a, b in zip(contiguous, paged, strict=True):
        torch.testing.assert_close(a, b)
        assert not a.isnan().any()


def test_num_splits_is_only_a_hint() -> None:
    (k, v), _, seqlens = make_caches([5, 70], 80)
    q = torch.randn(2, 1, 4, 32)
    base = sparsek.attention_with_kvcache(q, k, v, seqlens)
    for splits in (1, 3):
        out = sparsek.attention_with_kvcache(q, k, v, seqlens, num_splits=splits)
        assert torch.equal(out, base)


def test_bfloat16_output_dtype() -> None:
    (k, v), (kp, vp, table), seqlens = make_caches([9, 30], 32)
    q = torch.randn(2, 1, 4, 32)
    out = sparsek.attention_with_kvcache(q.bfloat16(), kp.bfloat16(), vp.bfloat16(), seqlens, table)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    want, _ = per_sequence_reference(list(q.bfloat16()), k.bfloat16(), v.bfloat16(), [9, 30], True)
    torch.testing.assert_close(out.double(), torch.stack(want), atol=2e-2, rtol=2e-2)


def test_cpu_metadata_values_are_checked_by_the_op() -> None:
    (k, v), (kp, vp, table), seqlens = make_caches([5, 20], 32)
    q = torch.randn(2, 1, 4, 32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 32\].*cache_seqlens\[1\]=33 \(1 of 2"):
        sparsek.attention_with_kvcache(q, k, v, torch.tensor([5, 33], dtype=i32))
    bad = table.clone()
    bad[1, 1] = 10_000
    with pytest.raises(ValueError, match="block_table entries of the blocks in use"):
        sparsek.attention_with_kvcache(q, kp, vp, seqlens, bad)


# ------------------------------------------------------------- the torch op


@pytest.mark.parametrize("layout", ["decode-contiguous", "decode-paged", "packed-paged"])
def test_opcheck(layout: str) -> None:
    (k, v), (kp, vp, table), seqlens = make_caches([3, 40, 17], 48, d=16)
    k, v, kp, vp = (t.nan_to_num() for t in (k, v, kp, vp))  # opcheck compares with NaN != NaN
    if layout == "decode-contiguous":
        args = (torch.randn(3, 1, 4, 16), k, v, seqlens, None, None, None)
    elif layout == "decode-paged":
        args = (torch.randn(3, 2, 4, 16), kp, vp, seqlens, table, None, None)
    else:
        cu_q = torch.tensor([0, 3, 5, 12], dtype=i32)
        args = (torch.randn(12, 4, 16), kp, vp, seqlens, table, cu_q, 7)
    torch.library.opcheck(op, (*args, True, 0.25, 0))


def test_fake_impl_reads_shapes_only() -> None:
    with FakeTensorMode():
        kp = torch.randn(10, 16, 2, 64)
        table = torch.empty(3, 4, dtype=i32)
        seqlens = torch.empty(3, dtype=i32)
        out, lse = op(torch.randn(3, 2, 8, 64), kp, kp, seqlens, table, None, None, True, 0.1, 0)
        assert out.shape == (3, 2, 8, 64) and lse.shape == (3, 8, 2)
        cu_q = torch.empty(4, dtype=i32)
        out, lse = op(torch.randn(9, 8, 64), kp, kp, seqlens, table, cu_q, 5, True, 0.1, 0)
        assert out.shape == (9, 8, 64) and lse.shape == (8, 9) and lse.dtype == torch.float32


def test_torch_compile_fullgraph_public_api() -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")

    def f(q, k_cache, v_cache, seqlens, table, cu_q):
        decode = sparsek.attention_with_kvcache(q[:3].view(3, 1, 4, 32), k_cache, v_cache,
                                                seqlens, table, num_splits=1)  # fmt: skip
        prefill = sparsek.attention_with_kvcache(
            q, k_cache, v_cache, seqlens, table, cu_seqlens_q=cu_q, max_seqlen_q=6
        )
        return decode.sum() + prefill

    compiled = torch.compile(f, backend=counter, fullgraph=True)
    for lens, q_lens in [([10, 40, 6], [2, 6, 4]), ([64, 7, 30], [6, 5, 1])]:
        _, (kp, vp, table), seqlens = make_caches(lens, 64, seed=len(lens) + lens[0])
        kp, vp = kp.nan_to_num(), vp.nan_to_num()
        cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=i32)
        q = torch.randn(12, 4, 32)
        torch.testing.assert_close(compiled(q, kp, vp, seqlens, table, cu_q),
                                   f(q, kp, vp, seqlens, table, cu_q))  # fmt: skip
    assert counter.frame_count == 1


# ------------------------------------------------------------- malformed inputs

(KC, VC), (KP, VP, BT), SL = make_caches([5, 20], 32)
Q4, Q3 = torch.randn(2, 1, 4, 32), torch.randn(6, 4, 32)
CU = torch.tensor([0, 2, 6], dtype=i32)
kvc = sparsek.attention_with_kvcache

MALFORMED: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("q-not-tensor", lambda: kvc(None, KC, VC, SL), TypeError, "q must be a torch.Tensor"),
    ("q-2d", lambda: kvc(Q4[0, 0], KC, VC, SL), ValueError, "q must be 4-D"),
    ("k-cache-sparse", lambda: kvc(Q4, KC.to_sparse(), VC, SL), TypeError, "k_cache has layout"),
    (
        "block-table-sparse",
        lambda: kvc(Q4, KP, VP, SL, BT.to_sparse()),
        TypeError,
        "block_table has layout torch.sparse_coo",
    ),
    ("k-cache-3d", lambda: kvc(Q4, KC[0], VC, SL), ValueError, "k_cache must be 4-D"),
    ("v-cache-dtype", lambda: kvc(Q4, KC, VC.half(), SL), ValueError, "v_cache.dtype="),
    ("k-cache-device", lambda: kvc(Q4, KC.to("meta"), VC, SL), ValueError, "k_cache.device=meta"),
    ("head-dim", lambda: kvc(Q4[..., :16], KC, VC, SL), ValueError, "k_cache head_dim=32"),
    ("heads", lambda: kvc(Q4[:, :, :3], KC, VC, SL), ValueError, "num_heads=3"),
    (
        "seqlens-int64",
        lambda: kvc(Q4, KC, VC, SL.long()),
        TypeError,
        "cache_seqlens has dtype torch.int64; supported: torch.int32",
    ),
    ("seqlens-2d", lambda: kvc(Q4, KC, VC, SL[None]), ValueError, "cache_seqlens must be 1-D"),
    ("seqlens-device", lambda: kvc(Q4, KC, VC, SL.to("meta")), ValueError, "cache_seqlens.device"),
    ("q-batch", lambda: kvc(Q4[:1], KC, VC, SL), ValueError, "q batch size 1 must equal batch=2"),
    ("cache-batch", lambda: kvc(Q4, KC[:1], VC[:1], SL), ValueError, "k_cache batch size 1"),
    (
        "table-int64",
        lambda: kvc(Q4, KP, VP, SL, BT.long()),
        TypeError,
        "block_table has dtype torch.int64; supported: torch.int32",
    ),
    ("table-1d", lambda: kvc(Q4, KP, VP, SL, BT[0]), ValueError, "block_table must be 2-D"),
    ("table-rows", lambda: kvc(Q4, KP, VP, SL, BT[:1]), ValueError, "block_table has 1 rows"),
    (
        "block-size-8",
        lambda: kvc(Q4, KP[:, :8], VP[:, :8], SL, BT),
        ValueError,
        "block_size=8 (k_cache.shape[1]) is not supported for paged caches",
    ),
    (
        "packed-without-cu",
        lambda: kvc(Q3, KC, VC, SL),
        ValueError,
        "but cu_seqlens_q is None",
    ),
    (
        "batched-with-cu",
        lambda: kvc(Q4, KC, VC, SL, cu_seqlens_q=CU, max_seqlen_q=4),
        ValueError,
        "packed queries must be 3-D",
    ),
    (
        "max-without-cu",
        lambda: kvc(Q4, KC, VC, SL, max_seqlen_q=1),
        ValueError,
        "max_seqlen_q is only used with cu_seqlens_q",
    ),
    (
        "cu-without-max",
        lambda: kvc(Q3, KC, VC, SL, cu_seqlens_q=CU),
        ValueError,
        "max_seqlen_q is required",
    ),
    (
        "cu-length",
        lambda: kvc(Q3, KC, VC, SL, cu_seqlens_q=CU[:2], max_seqlen_q=4),
        ValueError,
        "cu_seqlens_q has 2 entries; it must have batch + 1 = 3",
    ),
    (
        "cu-int64",
        lambda: kvc(Q3, KC, VC, SL, cu_seqlens_q=CU.long(), max_seqlen_q=4),
        TypeError,
        "cu_seqlens_q has dtype torch.int64",
    ),
    (
        "max-tensor",
        lambda: kvc(Q3, KC, VC, SL, cu_seqlens_q=CU, max_seqlen_q=torch.tensor(4)),
        TypeError,
        "max_seqlen_q must be a Python int",
    ),
    ("splits-neg", lambda: kvc(Q4, KC, VC, SL, num_splits=-1), ValueError, "num_splits must be"),
    ("splits-float", lambda: kvc(Q4, KC, VC, SL, num_splits=2.0), TypeError, "num_splits must be"),
    ("causal-none", lambda: kvc(Q4, KC, VC, SL, causal=None), TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize(("call", "error", "fragment"), malformed.params(MALFORMED))
def test_malformed_input_is_rejected(
    call: Callable[[], object], error: type[Exception], fragment: str
) -> None:
    malformed.assert_rejected(call, error, fragment)


@pytest.mark.parametrize(
    ("ctas", "key_tiles", "expected"),
    [
        (8, 256, 16),  # one KV head group of one sequence: 16 x 8 = 128 CTAs, one wave
        (64, 256, 2),  # 3 splits would be 192 CTAs: a second wave 45% full
        (24, 256, 11),  # 11 x 24 = 264: exactly two full waves
        (8, 8, 8),  # never more splits than key tiles
        (64, 8, 1),  # a short cache, half the SMs busy: splitting costs more than it saves
        (64, 9, 2),
        (32, 8, 4),  # a quarter of the SMs: still split
        (128, 256, 1),  # ~a full wave already: no split
    ],
)
def test_choose_splits_fills_whole_waves(
    monkeypatch: pytest.MonkeyPatch, ctas: int, key_tiles: int, expected: int
) -> None:
    from sparsek.launch import launcher, splits

    monkeypatch.setattr(launcher, "num_sms", lambda index: 132)
    device = torch.device("cuda", 0)
    assert splits.choose_splits(0, ctas, key_tiles, device) == expected
    assert splits.choose_splits(3, ctas, key_tiles, device) == min(3, key_tiles)
