"""Plain-PyTorch attention: the correctness oracle for sparsek's kernels.

This is deliberately the textbook computation (materialized score matrix, logsumexp,
softmax, weighted sum) in float32 or float64. It is what tests compare the kernels against
and what the `sparsek::attention` op runs on CPU tensors; it is not a fast path
(memory grows as batch * heads * seqlen_q * seqlen_k).

Masking semantics match the kernels' contract: with `causal=True`, key j is visible to
query i iff `j <= i + offset`, where offset = seqlen_k - seqlen_q (bottom-right aligned,
the default, as in FlashAttention) or 0 (`causal_top_left=True`, as in torch SDPA's
`is_causal`). Sliding windows, softcap and sinks follow `sparsek.masks` (windows align
like causal). A row with no visible key gets out = 0 and lse = -inf.
"""

from __future__ import annotations

import math

import torch

from sparsek.masks import make_mask, reference_scores, reference_softmax, visible


def causal_offset(seqlen_q: int, seqlen_k: int, causal_top_left: bool) -> int:
    """Offset of the causal diagonal: key j is visible to query i iff j <= i + offset."""
    return 0 if causal_top_left else seqlen_k - seqlen_q


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    causal_top_left: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference multi-head attention in (batch, seqlen, heads, head_dim) layout.

    Args:
        q: (batch, seqlen_q, num_heads, head_dim).
        k: (batch, seqlen_k, num_kv_heads, head_dim); num_heads % num_kv_heads == 0
            (grouped-query attention: each K/V head serves num_heads // num_kv_heads
            consecutive query heads).
        v: (batch, seqlen_k, num_kv_heads, head_dim_v).
        causal: apply the causal mask.
        causal_top_left: align the causal diagonal top-left (offset 0) instead of
            bottom-right (offset seqlen_k - seqlen_q). Ignored when `causal` is False.
        softmax_scale: multiplier of QK^T; 1/sqrt(head_dim) when None.
        window_size, softcap, sinks: sliding window (left, right), logit softcap and
            (num_heads,) sink logits, as `sparsek.masks` defines them.
        compute_dtype: torch.float32 or torch.float64; inputs are upcast to it.

    Returns:
        out: (batch, seqlen_q, num_heads, head_dim_v) in `compute_dtype`, contiguous.
        lse: (batch, num_heads, seqlen_q) in `compute_dtype`: log-sum-exp of the scaled,
            masked scores of each row (natural log; with sinks, the sink included); -inf
            for rows with no visible key.

    Raises:
        ValueError: `compute_dtype` is not float32/float64, or num_heads is not a
            multiple of num_kv_heads.
    """
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}"
        )
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    group = num_heads // num_kv_heads
    if group != 1:
        kf = kf.repeat_interleave(group, dim=2)
        vf = vf.repeat_interleave(group, dim=2)

    mask = make_mask(causal, window_size, softcap, sinks is not None)
    scores = reference_scores(torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale, mask.softcap)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    rows = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
    cols = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
    shown = visible(rows, cols, causal_offset(seqlen_q, seqlen_k, causal_top_left), mask)
    if shown is not None:
        scores = scores.masked_fill(~shown, float("-inf"))
    probs, lse = reference_softmax(scores, None if sinks is None else sinks.view(-1, 1))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf).contiguous()
    return out, lse
