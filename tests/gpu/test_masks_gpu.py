"""Sliding window, softcap and sinks on the Hopper kernels, through `sparsek.attention`.

Compared against: the float64 reference (`sparsek.reference`, which implements
`sparsek.masks`). Tolerance, as the other GPU suites, relative to the error of a peer in
the same dtype; no PyTorch kernel has softcap or sinks, so the peer is the reference
with its probabilities rounded to the input dtype before the PV product (what the
kernels do):
    max|out - ref| <= 2 * max|peer_out - ref| + atol   (atol 1e-3 fp16, 2e-3 bf16)
LSE: -inf exactly where a row sees no key, elsewhere atol 2e-3, rtol 1e-3. Outputs are
poisoned with NaN before each launch; fallbacks are disabled (`SPARSEK_STRICT=1`), so each
case runs a kernel.
"""

from __future__ import annotations

import pytest
import torch

import sparsek
from sparsek import registry
from sparsek.masks import make_mask, reference_scores, reference_softmax, visible
from sparsek.reference import causal_offset, reference_attention

pytestmark = [pytest.mark.gpu, pytest.mark.sm90, pytest.mark.usefixtures("strict_and_poisoned")]

ATOL = {torch.float16: 1e-3, torch.bfloat16: 2e-3}
HEAD_DIMS = registry.registered_head_dims("sm_90a")

# (batch, seqlen_q, seqlen_k, heads, kv_heads, causal, window, softcap, sinks)
CASES = [
    (2, 300, 300, 4, 2, True, (64, -1), 0.0, False),  # causal window, GQA
    (1, 1031, 1031, 8, 2, False, (100, 37), 0.0, False),  # two-sided, odd length
    (2, 100, 333, 4, 4, False, (50, 0), 0.0, False),  # Sq < Sk, window aligned bottom-right
    (2, 333, 100, 4, 1, True, (20, -1), 0.0, False),  # Sq > Sk: early rows see nothing
    (1, 257, 257, 4, 4, False, (0, 0), 0.0, False),  # each row its diagonal key only
    (1, 200, 200, 4, 4, True, (5000, -1), 0.0, False),  # window wider than the sequence
    (1, 513, 513, 4, 4, False, (-1, 64), 0.0, False),  # right side only
    (2, 257, 257, 8, 2, True, (-1, -1), 30.0, False),  # softcap
    (2, 129, 500, 4, 4, False, (-1, -1), 5.0, False),  # strong softcap, Sq < Sk
    (2, 300, 300, 8, 2, True, (-1, -1), 0.0, True),  # sinks
    (1, 1031, 1031, 8, 1, False, (-1, -1), 0.0, True),  # sinks, MQA
    (2, 333, 300, 8, 2, True, (128, -1), 20.0, True),  # all of them, GQA, Sq > Sk
    (1, 4096, 4096, 4, 4, True, (1024, -1), 0.0, False),  # long: band << sequence
    (4, 1, 700, 8, 2, True, (100, -1), 10.0, True),  # one query: the decode kernels
    (3, 1, 300, 8, 2, False, (50, 5), 0.0, False),
]


def peer_attention(q, k, v, causal, window, softcap, sinks, scale):
    """The reference with P rounded to q's dtype before PV (a same-dtype peer)."""
    mask = make_mask(causal, window, softcap, sinks is not None)
    group = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = reference_scores(torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale, mask.softcap)
    rows = torch.arange(q.shape[1], device=q.device).unsqueeze(1)
    cols = torch.arange(k.shape[1], device=q.device).unsqueeze(0)
    shown = visible(rows, cols, causal_offset(q.shape[1], k.shape[1], False), mask)
    if shown is not None:
        scores = scores.masked_fill(~shown, float("-inf"))
    probs, _ = reference_softmax(scores, None if sinks is None else sinks.view(-1, 1))
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(q.dtype).float(), vf)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize(
    ("b", "sq", "sk", "h", "hkv", "causal", "window", "softcap", "with_sinks"), CASES
)
def test_masks_match_the_reference(
    b, sq, sk, h, hkv, causal, window, softcap, with_sinks, head_dim, dtype
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(sq * 7 + sk)
    q = torch.randn(b, sq, h, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(b, sk, hkv, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b, sk, hkv, head_dim, device="cuda", dtype=dtype, generator=gen)
    sinks = torch.randn(h, device="cuda", generator=gen) * 2 if with_sinks else None
    scale = head_dim**-0.5
    out, lse = sparsek.attention(
        q, k, v, causal=causal, window_size=window, softcap=softcap, sinks=sinks,
        return_lse=True,
    )  # fmt: skip
    ref, ref_lse = reference_attention(
        q, k, v, causal=causal, softmax_scale=scale, window_size=window, softcap=softcap,
        sinks=sinks, compute_dtype=torch.float64,
    )  # fmt: skip
    peer = peer_attention(q, k, v, causal, window, softcap, sinks, scale)
    bound = 2 * (peer.double() - ref).abs().max().item() + ATOL[dtype]
    err = (out.double() - ref).abs().max().item()
    assert not out.isnan().any()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=2e-3, rtol=1e-3)
    assert (out.transpose(1, 2)[empty] == 0).all()  # rows without keys: exactly 0


def test_a_window_visits_only_its_band() -> None:
    """S = 16k with a (1024, 0) window runs in under half the time of full causal
    attention: the tiles outside the band are skipped, not masked (a smoke check; speed
    against peers is measured under perf/, not in tests)."""
    q = torch.randn(1, 16384, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)

    def time_ms(fn) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 5

    causal = time_ms(lambda: sparsek.attention(q, k, v, causal=True))
    windowed = time_ms(lambda: sparsek.attention(q, k, v, causal=True, window_size=(1024, -1)))
    assert windowed < 0.5 * causal, (windowed, causal)


# ---------------------------------------------------------------- varlen and KV cache


def check_sequences(out, lse, pieces, mask_args, dtype) -> None:
    """`out` (rows, H, D) / `lse` (H, rows) of packed rows against each sequence's dense
    float64 reference (bottom-right per sequence) with the tolerance of the module
    docstring; pieces: (q_b, k_b, v_b, rows) with q_b (1, n, H, D), rows its row indexes."""
    causal, window, softcap, sinks = mask_args
    errors, bounds = [], []
    for q_b, k_b, v_b, rows in pieces:
        scale = q_b.shape[-1] ** -0.5
        ref, ref_lse = reference_attention(
            q_b, k_b, v_b, causal=causal, softmax_scale=scale, window_size=window,
            softcap=softcap, sinks=sinks, compute_dtype=torch.float64,
        )  # fmt: skip
        peer = peer_attention(q_b, k_b, v_b, causal, window, softcap, sinks, scale)
        got = out[rows].double()
        assert not got.isnan().any()
        errors.append((got - ref[0]).abs().max().item())
        bounds.append((peer[0].double() - ref[0]).abs().max().item())
        empty = torch.isneginf(ref_lse[0])  # (H, n)
        got_lse = lse[:, rows]
        assert torch.equal(torch.isneginf(got_lse), empty)
        torch.testing.assert_close(
            got_lse[~empty].double(), ref_lse[0][~empty], atol=2e-3, rtol=1e-3
        )
    assert max(errors) <= 2 * max(bounds) + ATOL[dtype], (max(errors), max(bounds))


# (causal, window, softcap, sinks): each feature, and all of them
SEQ_MASKS = [
    (True, (64, -1), 0.0, False),
    (False, (40, 17), 0.0, False),
    (True, (-1, -1), 20.0, False),
    (True, (-1, -1), 0.0, True),
    (True, (96, -1), 30.0, True),
]


def mask_inputs(case, h, gen):
    causal, window, softcap, with_sinks = case
    sinks = torch.randn(h, device="cuda", generator=gen) * 2 if with_sinks else None
    return causal, window, softcap, sinks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("case", SEQ_MASKS, ids=str)
def test_varlen_masks_match_the_reference(case, head_dim, dtype) -> None:
    """Packed sequences (an empty one, Sq != Sk, odd lengths) with NaN K/V padding past
    the last sequence: each sequence masked bottom-right on its own."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    q_lens, k_lens, h, hkv = [130, 0, 257, 1, 64], [300, 40, 257, 77, 0], 8, 2
    mask_args = mask_inputs(case, h, gen)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q = torch.randn(total_q + 3, h, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(total_k + 50, hkv, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(total_k + 50, hkv, head_dim, device="cuda", dtype=dtype, generator=gen)
    k[total_k:], v[total_k:] = float("nan"), float("nan")
    causal, window, softcap, sinks = mask_args
    out, lse = sparsek.attention_varlen(
        q, k, v, cu_q.cuda(), cu_k.cuda(), max(q_lens), max(k_lens), causal=causal,
        window_size=window, softcap=softcap, sinks=sinks, return_lse=True,
    )  # fmt: skip
    pieces = []
    for b, (nq, nk) in enumerate(zip(q_lens, k_lens, strict=True)):
        if nq == 0:
            continue
        rows = torch.arange(int(cu_q[b]), int(cu_q[b]) + nq, device="cuda")
        keys = slice(int(cu_k[b]), int(cu_k[b]) + nk)
        pieces.append((q[rows][None], k[keys][None], v[keys][None], rows))
    check_sequences(out, lse, pieces, mask_args, dtype)
    assert (out[total_q:] == 0).all() and torch.isneginf(lse[:, total_q:]).all()


def paged_cache(lens, capacity, hkv, d, dtype, gen, page=16, dv=None):
    """(contiguous k, v) and the same tokens in shuffled pages (NaN past each length);
    `dv`: V's head dim (default d)."""
    dv = d if dv is None else dv
    batch = len(lens)
    k = torch.randn(batch, capacity, hkv, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(batch, capacity, hkv, dv, device="cuda", dtype=dtype, generator=gen)
    for b, n in enumerate(lens):
        k[b, n:], v[b, n:] = float("nan"), float("nan")
    blocks = capacity // page
    order = torch.randperm(batch * blocks, device="cuda", generator=gen)
    table = order.view(batch, blocks).to(torch.int32)
    kp = torch.empty(batch * blocks, page, hkv, d, device="cuda", dtype=dtype)
    vp = torch.empty(batch * blocks, page, hkv, dv, device="cuda", dtype=dtype)
    kp[order] = k.reshape(batch * blocks, page, hkv, d)
    vp[order] = v.reshape(batch * blocks, page, hkv, dv)
    return k, v, kp, vp, table


def check_cache_queries(paged, lens, h, d, dtype, gen, mask_args, num_splits, dv=None):
    """Decode (one query per sequence), then chunked prefill (packed queries of lengths
    100, 1, 129, 3, 0) over a contiguous or paged cache of `lens` keys (capacity 1024,
    2 KV heads), split `num_splits` ways, each sequence against the reference."""
    k, v, kp, vp, table = paged_cache(lens, 1024, 2, d, dtype, gen, dv=dv)
    caches = (kp, vp) if paged else (k, v)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    tables = {"block_table": table} if paged else {}
    causal, window, softcap, sinks = mask_args
    mask = {"causal": causal, "window_size": window, "softcap": softcap, "sinks": sinks}

    decode_q = torch.randn(len(lens), 1, h, d, device="cuda", dtype=dtype, generator=gen)
    out, lse = sparsek.attention_with_kvcache(
        decode_q, *caches, seqlens, **tables, num_splits=num_splits, return_lse=True, **mask
    )
    pieces = [
        (decode_q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], torch.tensor([b], device="cuda"))
        for b, n in enumerate(lens)
    ]
    check_sequences(out[:, 0], lse[:, :, 0].T, pieces, mask_args, dtype)

    q_lens = [100, 1, 129, 3, 0]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d, device="cuda", dtype=dtype, generator=gen)
    out, lse = sparsek.attention_with_kvcache(
        q, *caches, seqlens, **tables, cu_seqlens_q=cu_q.cuda(), max_seqlen_q=max(q_lens),
        num_splits=num_splits, return_lse=True, **mask,
    )  # fmt: skip
    pieces = []
    for b, (nq, n) in enumerate(zip(q_lens, lens, strict=True)):
        if nq == 0:
            continue
        rows = torch.arange(int(cu_q[b]), int(cu_q[b]) + nq, device="cuda")
        pieces.append((q[rows][None], k[b : b + 1, :n], v[b : b + 1, :n], rows))
    check_sequences(out, lse, pieces, mask_args, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("num_splits", [1, 3], ids=["no-split", "3-splits"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", SEQ_MASKS, ids=str)
def test_kvcache_masks_match_the_reference(case, paged, num_splits, head_dim, dtype) -> None:
    """Decode (one query per sequence, GQA heads as a tile's rows unless windowed) and
    chunked prefill over a contiguous or paged cache, split or not (split partials leave
    the sinks to the combine)."""
    gen = torch.Generator(device="cuda").manual_seed(13)
    lens, h = [700, 1, 129, 1024, 33], 8
    mask_args = mask_inputs(case, h, gen)
    check_cache_queries(paged, lens, h, head_dim, dtype, gen, mask_args, num_splits)


def test_masks_under_cuda_graphs() -> None:
    """A captured call with a window, softcap and sinks replays with new inputs and new
    sink values written into the same tensors (sinks are an input, not a constant)."""
    gen = torch.Generator(device="cuda").manual_seed(17)
    q = torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    sinks = torch.zeros(8, device="cuda")
    mask = {"causal": True, "window_size": (64, -1), "softcap": 20.0}
    sparsek.attention(q, k, v, sinks=sinks, **mask)  # loads the kernel
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sparsek.attention(q, k, v, sinks=sinks, **mask)
    for seed in (1, 2):
        fresh = torch.Generator(device="cuda").manual_seed(seed)
        q.copy_(torch.randn(q.shape, device="cuda", generator=fresh))
        sinks.copy_(torch.randn(8, device="cuda", generator=fresh) * 3)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, sparsek.attention(q, k, v, sinks=sinks, **mask))
