"""Tensors of more than 2^31 elements through the dense, varlen and paged paths.

A (1, 262144, 64, 128) bf16 tensor holds 2^31 elements (4 GiB): any 32-bit offset
arithmetic on the host or in a kernel would wrap for the rows past the first 2^31
elements. Compared against: a float64 reference of a few query rows (first, middle,
last; first and last head) over every key, with the tolerance rule of the other GPU
tests (|out - ref| <= 2 |sdpa_out - ref| + atol, torch SDPA on the same rows in bf16).
Needs about 30 GB of GPU memory.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import sparsek

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

DEVICE = "cuda"
DTYPE = torch.bfloat16
ATOL = 2e-3
SEQLEN, HEADS, HEAD_DIM = 262_144, 64, 128  # 2^31 elements per (1, S, H, D) tensor


@pytest.fixture(scope="module")
def qkv() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(2031)
    shape = (1, SEQLEN, HEADS, HEAD_DIM)
    tensors = tuple(torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=gen) for _ in range(3))
    assert tensors[0].numel() >= 2**31
    return tensors  # type: ignore[return-value]


def check_rows(out: Tensor, q: Tensor, k: Tensor, v: Tensor, rows: list[int], causal: bool):
    """out[rows] (rows, H, D) of one sequence q/k/v (S, H, D), heads 0 and H - 1, against
    float64 over every key (causal: bottom-right, keys j <= i + Sk - Sq)."""
    offset = k.shape[0] - q.shape[0]
    for h in (0, q.shape[1] - 1):
        h_kv = h // (q.shape[1] // k.shape[1])
        qr = q[rows, h].double()  # (R, D)
        kh, vh = k[:, h_kv], v[:, h_kv]
        scores = qr @ kh.double().T * q.shape[-1] ** -0.5  # (R, Sk)
        keys = torch.arange(k.shape[0], device=DEVICE)
        visible = torch.ones_like(scores, dtype=torch.bool)
        if causal:
            visible = keys[None, :] <= torch.tensor(rows, device=DEVICE)[:, None] + offset
        ref = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ vh.double()
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q[rows, h][None, None], kh[None, None], vh[None, None], attn_mask=visible[None, None]
        )[0, 0]
        got = out[rows, h]
        assert not torch.isnan(got).any()
        err = (got.double() - ref).abs().max().item()
        err_sdpa = (sdpa.double() - ref).abs().max().item()
        assert err <= 2 * err_sdpa + ATOL, (h, err, err_sdpa)


ROWS = [0, 1, SEQLEN // 2, SEQLEN - 2, SEQLEN - 1]


def test_dense_past_2_31_elements(qkv) -> None:
    q, k, v = qkv
    out = sparsek.attention(q, k, v, causal=True)
    check_rows(out[0], q[0], k[0], v[0], ROWS, causal=True)


def test_varlen_past_2_31_elements(qkv) -> None:
    """Two packed sequences, the second ending at the buffer's last row."""
    q, k, v = (t[0] for t in qkv)
    cu = torch.tensor([0, 1000, SEQLEN], dtype=torch.int32, device=DEVICE)
    longest = SEQLEN - 1000
    out = sparsek.attention_varlen(q, k, v, cu, cu, longest, longest, causal=True)
    check_rows(out[:1000], q[:1000], k[:1000], v[:1000], [0, 999], causal=True)
    tail = slice(1000, SEQLEN)
    check_rows(out[tail], q[tail], k[tail], v[tail], [0, longest // 2, longest - 1], causal=True)


def test_paged_cache_past_2_31_elements() -> None:
    """Decode over a paged cache of more than 2^31 elements, its sequences in the pages
    past that boundary (and one spanning it)."""
    page, kv_heads, heads, d, ctx = 16, 8, 32, 128, 2048
    pages = 2**31 // (page * kv_heads * d) + 1024
    gen = torch.Generator(device=DEVICE).manual_seed(2032)
    k_cache = torch.randn(pages, page, kv_heads, d, device=DEVICE, dtype=DTYPE, generator=gen)
    v_cache = torch.randn(pages, page, kv_heads, d, device=DEVICE, dtype=DTYPE, generator=gen)
    assert k_cache.numel() > 2**31
    per_seq = ctx // page
    boundary = 2**31 // (page * kv_heads * d)
    starts = [pages - per_seq, boundary - per_seq // 2, pages - 3 * per_seq]
    table = torch.stack([torch.arange(s, s + per_seq, device=DEVICE) for s in starts]).int()
    table = table[:, torch.randperm(per_seq, device=DEVICE, generator=gen)]  # shuffled pages
    q = torch.randn(len(starts), 1, heads, d, device=DEVICE, dtype=DTYPE, generator=gen)
    lens = torch.full((len(starts),), ctx, dtype=torch.int32, device=DEVICE)
    out = sparsek.attention_with_kvcache(q, k_cache, v_cache, lens, table)
    for b in range(len(starts)):
        k = k_cache[table[b].long()].reshape(ctx, kv_heads, d)
        v = v_cache[table[b].long()].reshape(ctx, kv_heads, d)
        check_rows(out[b], q[b], k, v, [0], causal=False)
