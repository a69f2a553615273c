"""FP8 (float8_e4m3fn) inputs on the GPU through `sparsek.attention` and
`attention_varlen`.

No FP8 kernel is registered yet, so a CUDA request takes the documented route: its
inputs are dequantized to bfloat16 (`sparsek.fp8`) and run on the 16-bit kernels. These
tests check that route end to end: the result, the one fallback reason it logs (and no
other: the 16-bit step runs a kernel), per-sequence descales of packed inputs, and CUDA
graph replay with new descale values.

Compared against: float64 attention of the exactly dequantized inputs (the FP8 values
times their descales, `tests/fp8_oracle.py`). Tolerance, as the other GPU
suites, relative to a same-precision peer: PyTorch's SDPA in bfloat16 on the
dequantized inputs rounded to bfloat16 (what the route computes):
    max|out - ref| <= 2 * max|peer - ref| + atol   (atol 2e-3 bf16, 1e-3 fp16 outputs)
LSE: atol 2e-3, rtol 1e-3 where finite, -inf exactly where the reference's is.
(The FP8 kernel, when it lands, brings its own rule: P rounded to e4m3.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp8_oracle import FP8, oracle

import sparsek
from sparsek import api, fp8, registry

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

ATOL = {torch.float16: 1e-3, torch.bfloat16: 2e-3}
HEAD_DIMS = [d for d in (64, 128, 256) if d in registry.registered_head_dims("sm_90a")]


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[str, ...], str]]:
    """Every fallback `sparsek.attention` takes, as (reasons, action)."""
    taken: list[tuple[tuple[str, ...], str]] = []
    real = api.fallback

    def record(reasons: tuple[str, ...], action: str = "falling back to torch SDPA") -> None:
        taken.append((reasons, action))
        real(reasons, action)

    monkeypatch.setattr(api, "fallback", record)
    return taken


def cuda_fp8_inputs(gen, batch, sq, sk, heads, kv_heads, dim):
    """FP8 q, k, v on the GPU and (batch, kv_heads) float32 descales in [0.1, 1.1)."""
    q, k, v = (
        (3 * torch.randn(batch, s, h, dim, device="cuda", generator=gen)).to(FP8)
        for s, h in ((sq, heads), (sk, kv_heads), (sk, kv_heads))
    )
    descales = [torch.rand(batch, kv_heads, device="cuda", generator=gen) + 0.1 for _ in "qkv"]
    return q, k, v, descales


def peer(q, k, v, descales, causal, window):
    """SDPA in bfloat16 on the dequantized inputs rounded to bfloat16, (b, sq, h, dv)."""
    q16, k16, v16 = (
        fp8.dequantize(t, d, torch.bfloat16) for t, d in zip((q, k, v), descales, strict=True)
    )
    group = q.shape[2] // k.shape[2]
    sq, sk = q.shape[1], k.shape[1]
    i = torch.arange(sq, device="cuda").view(sq, 1) + sk - sq
    j = torch.arange(sk, device="cuda").view(1, sk)
    left, right = window
    right = 0 if causal else right
    seen = torch.ones(sq, sk, dtype=torch.bool, device="cuda")
    if right >= 0:
        seen &= j <= i + right
    if left >= 0:
        seen &= j >= i - left
    qt, kt, vt = (t.transpose(1, 2) for t in (q16, k16, v16))
    kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=seen).transpose(1, 2)
    return out.masked_fill(~seen.any(dim=1).view(1, sq, 1, 1), 0)


def check(out, lse, q, k, v, descales, causal, window, out_dtype) -> None:
    want, want_lse = oracle(q.cpu(), k.cpu(), v.cpu(), [d.cpu() for d in descales], causal,
                            window)  # fmt: skip
    want, want_lse = want.cuda(), want_lse.cuda()
    bound = 2 * (peer(q, k, v, descales, causal, window).double() - want).abs().max().item()
    err = (out.double() - want).abs().max().item()
    assert out.dtype == out_dtype and not out.isnan().any()
    assert err <= bound + ATOL[out_dtype], (err, bound)
    empty = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty].double(), want_lse[~empty], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize(
    ("b", "sq", "sk", "h", "hkv", "causal", "window"),
    [
        (2, 300, 300, 8, 2, True, (-1, -1)),  # GQA causal
        (1, 257, 1031, 4, 4, False, (-1, -1)),  # Sq < Sk, odd lengths
        (2, 333, 100, 4, 1, True, (-1, -1)),  # Sq > Sk: early rows see nothing, MQA
        (1, 513, 513, 8, 2, True, (128, -1)),  # sliding window
    ],
)
def test_fp8_attention_matches_the_dequantized_reference(
    b, sq, sk, h, hkv, causal, window, head_dim, out_dtype, fallbacks
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(sq + 7 * sk + head_dim)
    q, k, v, descales = cuda_fp8_inputs(gen, b, sq, sk, h, hkv, head_dim)
    out, lse = sparsek.attention(
        q, k, v, causal=causal, window_size=window, return_lse=True, out_dtype=out_dtype,
        q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
    )  # fmt: skip
    check(out, lse, q, k, v, descales, causal, window, out_dtype)
    assert [action for _, action in fallbacks] == ["dequantizing the FP8 inputs to bfloat16"]


def test_fp8_varlen_takes_each_sequences_descales() -> None:
    """Packed sequences (an empty one, padding rows past the last) with one descale row
    per sequence: each sequence matches its own dense reference; padding rows are 0."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    q_lens, k_lens, h, hkv, d = [130, 0, 257, 1], [300, 40, 257, 77], 8, 2, 128
    seqs = [
        cuda_fp8_inputs(gen, 1, sq, sk, h, hkv, d) for sq, sk in zip(q_lens, k_lens, strict=True)
    ]
    pad = (3 * torch.randn(5, h, d, device="cuda", generator=gen)).to(FP8)
    q = torch.cat([*(s[0][0] for s in seqs), pad])
    k, v = (torch.cat([s[i][0] for s in seqs]) for i in (1, 2))
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


def test_fp8_attention_replays_in_a_cuda_graph_with_new_descales() -> None:
    gen = torch.Generator(device="cuda").manual_seed(9)
    q, k, v, descales = cuda_fp8_inputs(gen, 2, 200, 200, 8, 2, 128)

    def call():
        return sparsek.attention(q, k, v, causal=True, q_descale=descales[0],
                                 k_descale=descales[1], v_descale=descales[2])  # fmt: skip

    call()  # loads the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    descales[2].mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, call(), rtol=0, atol=0)
