"""The reference (the oracle) against a naive float64 loop over (batch, head, query row).

Compared against: `naive_attention` below, written independently (explicit loops, explicit
visibility test per key, softmax by hand), in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsek.reference import causal_offset, reference_attention


def naive_attention(q, k, v, causal: bool, top_left: bool, scale: float):
    b_, sq, h_, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(b_, sq, h_, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b_, h_, sq), -math.inf, dtype=torch.float64)
    offset = 0 if top_left else sk - sq
    for b in range(b_):
        for h in range(h_):
            kh = h // (h_ // hkv)
            for i in range(sq):
                keys = [j for j in range(sk) if not causal or j <= i + offset]
                if not keys:
                    continue
                s = torch.stack(
                    [(q[b, i, h].double() @ k[b, j, kh].double()) * scale for j in keys]
                )
                m = s.max()
                p = torch.exp(s - m)
                lse[b, h, i] = m + torch.log(p.sum())
                out[b, i, h] = (p / p.sum()) @ v[b, keys, kh].double()
    return out, lse


CASES = [
    # (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, top_left)
    (2, 5, 5, 2, 2, 8, False, False),
    (1, 7, 11, 4, 1, 16, True, False),  # MQA, Sq < Sk, bottom-right
    (1, 7, 11, 4, 2, 16, True, True),  # GQA 2:1, top-left
    (2, 9, 4, 2, 1, 8, True, False),  # Sq > Sk bottom-right: rows 0..4 fully masked
    (1, 9, 4, 4, 4, 8, True, True),  # Sq > Sk top-left
    (1, 6, 13, 6, 2, 8, False, False),  # GQA 3:1, no mask
]


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("b", "sq", "sk", "h", "hkv", "d", "causal", "top_left"), CASES)
def test_reference_matches_naive(b, sq, sk, h, hkv, d, causal, top_left, compute_dtype) -> None:
    gen = torch.Generator().manual_seed(sq * 100 + sk)
    q = torch.randn(b, sq, h, d, generator=gen)
    k = torch.randn(b, sk, hkv, d, generator=gen)
    v = torch.randn(b, sk, hkv, d, generator=gen)
    scale = 0.7 / math.sqrt(d)
    out, lse = reference_attention(
        q,
        k,
        v,
        causal=causal,
        causal_top_left=top_left,
        softmax_scale=scale,
        compute_dtype=compute_dtype,
    )
    want_out, want_lse = naive_attention(q, k, v, causal, top_left, scale)
    tol = 1e-12 if compute_dtype == torch.float64 else 2e-5
    assert out.dtype == compute_dtype and out.shape == (b, sq, h, d) and out.is_contiguous()
    assert lse.shape == (b, h, sq)
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)


def test_fully_masked_rows_are_zero_with_neg_inf_lse() -> None:
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    out, lse = reference_attention(q, k, v, causal=True)  # bottom-right: offset -4
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert torch.isneginf(lse[:, :, :4]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 4:]).all()


def test_default_scale_and_alignment_helpers() -> None:
    q, k, v = torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16)
    a, _ = reference_attention(q, k, v)
    b, _ = reference_attention(q, k, v, softmax_scale=0.25)
    torch.testing.assert_close(a, b)
    assert causal_offset(3, 10, False) == 7 and causal_offset(3, 10, True) == 0


def test_reference_rejects_bad_arguments() -> None:
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="compute_dtype"):
        reference_attention(q, q, q, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="num_heads=3 must be a multiple of num_kv_heads=2"):
        reference_attention(q, torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
