"""FP8 (float8_e4m3fn) attention on the Hopper kernels, through `sparsek.attention` and
`attention_varlen`.

Compared against: float64 attention of the exactly dequantized inputs (the FP8 values
times their descales; `tests/fp8_oracle.py`). Tolerance, as the other GPU suites,
relative to a peer that rounds where the kernel must: the FP8 kernels round P to E4M3
(with the softmax's 2^8 headroom: P = 2^8 exp(s - max) in [0, 256]) before the PV
product and divide by the sum of the unrounded P, so the peer is that computation in
float64:
    max|out - ref| <= 2 * max|peer - ref| + atol   (atol 2e-3 bf16, 1e-3 fp16 outputs)
LSE: atol 2e-3, rtol 1e-3 where finite, -inf exactly where the reference's is. Outputs
are poisoned with NaN before each launch and fallbacks are refused (`SPARSEK_STRICT=1`),
so each case runs a kernel. Error must not grow with the context (two-level
accumulation): the mean error at 32k keys is within 2x of that at 1k.

Head dims without an FP8 kernel take the documented fallback (dequantized to bfloat16
on the 16-bit kernels), checked once against the same reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fp8_oracle import FP8, masked_scores, oracle

import sparsek
from sparsek import api, tuning

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

ATOL = {torch.float16: 1e-3, torch.bfloat16: 2e-3}
HEAD_DIMS = tuning.fp8_head_dims("sm_90a")
HEADROOM = 2.0**8  # the kernels' P scale (`hopper/softmax.py`, FP8_MAX_OFFSET)


def cuda_fp8_inputs(gen, batch, sq, sk, heads, kv_heads, dim):
    """FP8 q, k, v on the GPU and (batch, kv_heads) float32 descales in [0.1, 1.1)."""
    q, k, v = (
        (3 * torch.randn(batch, s, h, dim, device="cuda", generator=gen)).to(FP8)
        for s, h in ((sq, heads), (sk, kv_heads), (sk, kv_heads))
    )
    descales = [torch.rand(batch, kv_heads, device="cuda", generator=gen) + 0.1 for _ in "qkv"]
    return q, k, v, descales


def dequantized(t, descale):
    group = t.shape[2] // descale.shape[1]
    return t.double() * descale.double().repeat_interleave(group, dim=1)[:, None, :, None]


def peer(q, k, v, descales, causal, window, softcap, sinks):
    """The reference with P rounded the FP8 kernels' way (see the module docstring)."""
    scores, vf, seen = masked_scores(q, k, v, descales, causal, window, softcap=softcap)
    sq = q.shape[1]
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isneginf(top), 0.0, top)
    p = torch.exp(scores - top) * HEADROOM
    total = p.sum(dim=-1, keepdim=True)
    if sinks is not None:
        sink = torch.exp(sinks.double().view(1, -1, 1, 1) - top) * HEADROOM
        total = total + torch.where(seen.any(dim=1).view(1, 1, sq, 1), sink, 0.0)
    p8 = p.to(FP8).double()
    out = torch.einsum("bhqk,bkhd->bqhd", p8 / torch.where(total == 0, 1.0, total), vf)
    return out


def check(out, lse, q, k, v, descales, causal, window, out_dtype, softcap=0.0, sinks=None):
    want, want_lse = oracle(q.cpu(), k.cpu(), v.cpu(), [d.cpu() for d in descales], causal,
                            window, softcap=softcap,
                            sinks=None if sinks is None else sinks.cpu())  # fmt: skip
    want, want_lse = want.to(q.device), want_lse.to(q.device)
    bound = 2 * (peer(q, k, v, descales, causal, window, softcap, sinks) - want).abs().max()
    err = (out.double() - want).abs().max().item()
    assert out.dtype == out_dtype and not out.isnan().any()
    assert err <= bound.item() + ATOL[out_dtype], (err, bound.item())
    empty = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty].double(), want_lse[~empty], atol=2e-3, rtol=1e-3)


CASES = [
    # (b, sq, sk, h, hkv, causal, window, softcap, with_sinks)
    (2, 300, 300, 8, 2, True, (-1, -1), 0.0, False),  # GQA causal
    (1, 257, 1031, 4, 4, False, (-1, -1), 0.0, False),  # Sq < Sk, odd lengths
    (2, 333, 100, 4, 1, True, (-1, -1), 0.0, False),  # Sq > Sk: early rows see nothing, MQA
    (1, 513, 513, 8, 2, False, (128, 17), 0.0, False),  # two-sided window
    (2, 200, 260, 8, 2, True, (64, -1), 20.0, True),  # window, softcap and sinks, GQA
    (3, 1, 77, 4, 2, False, (-1, -1), 0.0, False),  # one query per sequence
]


@pytest.mark.usefixtures("strict_and_poisoned")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize(
    ("b", "sq", "sk", "h", "hkv", "causal", "window", "softcap", "sinks"), CASES
)
def test_fp8_kernels_match_the_dequantized_reference(
    b, sq, sk, h, hkv, causal, window, softcap, sinks, head_dim, out_dtype
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(sq + 7 * sk + head_dim)
    q, k, v, descales = cuda_fp8_inputs(gen, b, sq, sk, h, hkv, head_dim)
    sink_logits = torch.randn(h, device="cuda", generator=gen) * 2 if sinks else None
    out, lse = sparsek.attention(
        q, k, v, causal=causal, window_size=window, softcap=softcap, sinks=sink_logits,
        return_lse=True, out_dtype=out_dtype,
        q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
    )  # fmt: skip
    check(out, lse, q, k, v, descales, causal, window, out_dtype, softcap, sink_logits)


@pytest.mark.usefixtures("strict_and_poisoned")
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_fp8_varlen_takes_each_sequences_descales(head_dim) -> None:
    """Packed sequences (an empty one, padding rows past the last, NaN keys and values
    past the last sequence) with one descale row per sequence: each sequence matches its
    own dense reference; padding rows are 0 with LSE -inf."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    q_lens, k_lens, h, hkv = [130, 0, 257, 1], [300, 40, 257, 77], 8, 2
    seqs = [
        cuda_fp8_inputs(gen, 1, sq, sk, h, hkv, head_dim)
        for sq, sk in zip(q_lens, k_lens, strict=True)
    ]
    pad = (3 * torch.randn(5, h, head_dim, device="cuda", generator=gen)).to(FP8)
    nan = torch.full((40, hkv, head_dim), float("nan"), device="cuda").to(FP8)
    q = torch.cat([*(s[0][0] for s in seqs), pad])
    k, v = (torch.cat([*(s[i][0] for s in seqs), nan]) for i in (1, 2))
    descales = [torch.cat([s[3][i] for s in seqs]) for i in range(3)]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    out, lse = sparsek.attention_varlen(
        q, k, v, cu_q.cuda(), cu_k.cuda(), max(q_lens), max(k_lens), causal=True,
        return_lse=True, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
    )  # fmt: skip
    for b, (sq, s) in enumerate(zip(q_lens, seqs, strict=True)):
        if sq:
            rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
            check(out[rows][None], lse[:, rows][None], *s[:3], s[3], True, (-1, -1),
                  torch.bfloat16)  # fmt: skip
    total_q = int(cu_q[-1])
    assert (out[total_q:] == 0).all() and torch.isneginf(lse[:, total_q:]).all()


def context_errors() -> list[float]:
    """Mean |out - ref| of d128 FP8 attention at 1k and at 32k keys (128 queries)."""
    errors = []
    for sk in (1024, 32768):
        gen = torch.Generator(device="cuda").manual_seed(sk)
        q, k, v, descales = cuda_fp8_inputs(gen, 1, 128, sk, 4, 4, 128)
        # Values of one sign: O is their (large) mean, where dropped low bits show.
        v = (v.float().abs() + 1).to(FP8)
        out = sparsek.attention(q, k, v, q_descale=descales[0], k_descale=descales[1],
                                v_descale=descales[2])  # fmt: skip
        want, _ = oracle(q.cpu(), k.cpu(), v.cpu(), [d.cpu() for d in descales], False)
        errors.append((out.double().cpu() - want).abs().mean().item())
    return errors


@pytest.mark.usefixtures("strict_and_poisoned")
def test_fp8_error_does_not_grow_with_the_context() -> None:
    """Mean |out - ref| at 32k keys within 2x of that at 1k keys (the PV products of each
    key tile are added to O in float32); and the check can fail: the same kernel
    accumulating O in the tensor cores across tiles (`pv_two_level=False`) fails it."""
    errors = context_errors()
    assert errors[1] <= 2 * errors[0], errors
    row = tuning.FP8[("sm_90a", 128)]
    with tuning.override("fp8", "sm_90a", 128, dataclasses.replace(row, pv_two_level=False)):
        planted = context_errors()
    assert planted[1] > 2 * planted[0], planted


@pytest.mark.usefixtures("strict_and_poisoned")
def test_fp8_attention_replays_in_a_cuda_graph_with_new_descales() -> None:
    gen = torch.Generator(device="cuda").manual_seed(9)
    q, k, v, descales = cuda_fp8_inputs(gen, 2, 200, 200, 8, 2, HEAD_DIMS[-1])

    def call():
        return sparsek.attention(q, k, v, causal=True, q_descale=descales[0],
                                 k_descale=descales[1], v_descale=descales[2])  # fmt: skip

    call()  # loads the kernel
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    descales[2].mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, call(), rtol=0, atol=0)


def test_head_dims_without_an_fp8_kernel_run_dequantized(monkeypatch) -> None:
    """d32 has no FP8 kernel: the inputs are dequantized to bfloat16 and run on the 16-bit
    kernels (one logged fallback, and no other: the 16-bit step runs a kernel)."""
    taken: list[str] = []
    real = api.fallback

    def record(reasons, action="falling back to torch SDPA"):
        taken.append(action)
        real(reasons, action)

    monkeypatch.setattr(api, "fallback", record)
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, descales = cuda_fp8_inputs(gen, 2, 129, 300, 4, 2, 32)
    out, lse = sparsek.attention(q, k, v, causal=True, return_lse=True, q_descale=descales[0],
                                 k_descale=descales[1], v_descale=descales[2])  # fmt: skip
    assert taken == ["dequantizing the FP8 inputs to bfloat16"]
    want, want_lse = oracle(q.cpu(), k.cpu(), v.cpu(), [d.cpu() for d in descales], True)
    assert (out.double().cpu() - want).abs().max().item() < 2e-2 * want.abs().max().item()
    torch.testing.assert_close(lse.double().cpu(), want_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.usefixtures("strict_and_poisoned")
@pytest.mark.parametrize("num_splits", [1, 0], ids=["unsplit", "auto-split"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("seqlen_q", [1, 3, 77], ids=["decode", "chunk", "prefill"])
def test_fp8_caches_match_the_dequantized_reference(seqlen_q, paged, num_splits) -> None:
    """A float8_e4m3fn KV cache under bfloat16 queries runs the kernels that convert the
    cache in shared memory (fallbacks refused, outputs poisoned; split and not): decode,
    a few new queries per sequence and a prefill chunk of two 64-row query tiles (causal,
    bottom-right). Each sequence matches attention over its keys and values times its
    descale rows, within the 16-bit suites' rule against SDPA in bfloat16 on the same
    dequantized values."""
    gen = torch.Generator(device="cuda").manual_seed(4 + seqlen_q)
    lens, heads, kv_heads, dim, capacity = [100, 1000, 81], 8, 2, 128, 1024
    batch = len(lens)
    k, v = (
        (3 * torch.randn(batch, capacity, kv_heads, dim, device="cuda", generator=gen)).to(FP8)
        for _ in range(2)
    )
    descales = [torch.rand(batch, kv_heads, device="cuda", generator=gen) + 0.1 for _ in "kv"]
    q = torch.randn(batch, seqlen_q, heads, dim, device="cuda", dtype=torch.bfloat16,
                    generator=gen)  # fmt: skip
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    table = None
    k_cache, v_cache = k, v
    if paged:  # blocks of 16, shuffled
        blocks = capacity // 16
        order = torch.randperm(batch * blocks, device="cuda", generator=gen)
        table = order.view(batch, blocks).to(torch.int32)
        k_cache, v_cache = (
            torch.empty_like(t.view(torch.uint8).reshape(-1, 16, kv_heads, dim))
            .index_copy_(0, order, t.view(torch.uint8).reshape(-1, 16, kv_heads, dim))
            .view(FP8)
            for t in (k, v)
        )
    out = sparsek.attention_with_kvcache(q, k_cache, v_cache, seqlens, table,
                                         k_descale=descales[0], v_descale=descales[1],
                                         num_splits=num_splits)  # fmt: skip
    assert not out.isnan().any()
    ones = torch.ones(1, kv_heads)
    for b, n in enumerate(lens):
        kb, vb = (
            dequantized(t[b : b + 1, :n], d[b : b + 1])
            for t, d in zip((k, v), descales, strict=True)
        )
        want, _ = oracle(
            q[b : b + 1].float().cpu(), k[b : b + 1, :n].cpu(), v[b : b + 1, :n].cpu(),
            [ones, descales[0][b : b + 1].cpu(), descales[1][b : b + 1].cpu()], causal=True,
        )  # fmt: skip
        qt, kt, vt = (t.transpose(1, 2).to(torch.bfloat16) for t in (q[b : b + 1], kb, vb))
        kt, vt = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (kt, vt))
        seen = torch.ones(seqlen_q, n, dtype=torch.bool, device="cuda").tril(n - seqlen_q)
        sdpa = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=seen)
        bound = 2 * (sdpa.transpose(1, 2).double().cpu() - want).abs().max().item() + 2e-3
        err = (out[b : b + 1].double().cpu() - want).abs().max().item()
        assert err <= bound, (b, err, bound)
