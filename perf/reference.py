"""Float32 reference attention (chunked, plain torch) and the output check every row records.

The reference is deliberately independent of sparsek and of every provider: explicit
QK^T -> mask -> softmax -> PV in float32, query-chunked so a 16k x 16k problem fits in memory.
Its masks: causal and a sliding window (the xformers suite's local biases), both aligned
bottom-right.
The masks suite checks against sparsek's float64 reference instead (`sparsek.reference`, the
oracle of window, softcap and sinks; built in `perf.inputs`), on blocks of query rows where
the whole problem is too large for it (`RowBlocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

# Scores held at once per chunk (float32 elements): 128 Mi elements = 512 MiB.
_CHUNK_ELEMENTS = 128 * 1024 * 1024

# Output check: |out - ref| <= atol + rtol * |ref| everywhere. Sized from the storage
# precision of the output (bf16: 8 mantissa bits, fp16: 11) with headroom for the low-precision
# P matrix that flash-style kernels feed to the PV matmul.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (2e-3, 5e-3),
    torch.float32: (1e-4, 1e-4),
}


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    max_err: float

    @property
    def label(self) -> str:
        return "ok" if self.ok else "FAIL"


NO_WINDOW: tuple[int, int] = (-1, -1)


@torch.no_grad()
def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, window: tuple[int, int] = NO_WINDOW
) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v in float32, bottom-right causal, GQA by head groups.

    Args:
        q: (batch, seqlen_q, num_heads, head_dim).
        k: (batch, seqlen_k, num_kv_heads, head_dim).
        v: (batch, seqlen_k, num_kv_heads, head_dim).
        causal: query i sees key j iff j <= i + seqlen_k - seqlen_q; rows seeing no key are 0.
        window: (left, right) sliding window on the same diagonal: query i sees key j iff
            i + offset - left <= j <= i + offset + right (offset = seqlen_k - seqlen_q; -1
            unbounded on that side; causal sets right to 0).

    Returns:
        (batch, seqlen_q, num_heads, head_dim) float32.
    """
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    offset = seqlen_k - seqlen_q
    left, right = window
    right = 0 if causal else right
    chunk = max(1, min(seqlen_q, _CHUNK_ELEMENTS // (num_heads * seqlen_k)))
    out_shape = (batch, seqlen_q, num_heads, v.shape[-1])  # v's head dim may differ from q's
    out = torch.empty(out_shape, dtype=torch.float32, device=q.device)
    key_idx = torch.arange(seqlen_k, device=q.device)
    for b in range(batch):
        # (heads, seqlen_k, head_dim): K/V head j serves query heads [j * group, (j + 1) * group).
        kb = k[b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        vb = v[b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        for start in range(0, seqlen_q, chunk):
            stop = min(start + chunk, seqlen_q)
            qc = q[b, start:stop].transpose(0, 1).float()  # (heads, chunk, head_dim)
            scores = torch.matmul(qc, kb.transpose(1, 2)).mul_(scale)  # (heads, chunk, seqlen_k)
            diagonal = torch.arange(start, stop, device=q.device)[:, None] + offset
            if right >= 0:
                hidden = key_idx[None, :] > diagonal + right
                scores.masked_fill_(hidden[None], float("-inf"))
            if left >= 0:
                hidden = key_idx[None, :] < diagonal - left
                scores.masked_fill_(hidden[None], float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num_(nan=0.0)
            out[b, start:stop] = torch.matmul(probs, vb).transpose(0, 1)
    return out


@torch.no_grad()
def reference_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool,
    window: tuple[int, int] = NO_WINDOW,
) -> Tensor:
    """`reference_attention` of each packed sequence on its own (FlashAttention's varlen).

    Args:
        q: (total_q, num_heads, head_dim).
        k: (total_k, num_kv_heads, head_dim).
        v: (total_k, num_kv_heads, head_dim).
        cu_seqlens_q: (batch + 1,) offsets of each sequence's queries into q.
        cu_seqlens_k: (batch + 1,) offsets of each sequence's keys into k and v.
        causal: bottom-right aligned per sequence.
        window: (left, right) sliding window, bottom-right aligned per sequence.

    Returns:
        (total_q, num_heads, head_dim) float32; rows of empty sequences, or that see no key, 0.
    """
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
    q_bounds, k_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(q_bounds) - 1):
        q0, q1, k0, k1 = q_bounds[b], q_bounds[b + 1], k_bounds[b], k_bounds[b + 1]
        if q1 > q0 and k1 > k0:
            qs, ks, vs = q[None, q0:q1], k[None, k0:k1], v[None, k0:k1]
            seq = reference_attention(qs, ks, vs, causal, window)
            out[q0:q1] = seq[0]
    return out


@dataclass(frozen=True)
class RowBlocks:
    """The reference of some query rows of a (batch, seqlen_q, heads, head_dim) output:
    `blocks` holds (first row, reference of rows [first, first + n)) pairs."""

    shape: tuple[int, ...]
    blocks: tuple[tuple[int, Tensor], ...]


Reference: TypeAlias = Tensor | RowBlocks


@torch.no_grad()
def check(out: Tensor, ref: Reference, dtype: torch.dtype) -> CheckResult:
    """`check_output` against a whole reference, or against each block of `RowBlocks`
    (ok when every block is; max_err over the blocks)."""
    if isinstance(ref, Tensor):
        return check_output(out, ref, dtype)
    if tuple(out.shape) != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != expected {ref.shape}")
    results = [
        check_output(out[:, start : start + part.shape[1]], part, dtype)
        for start, part in ref.blocks
    ]
    return CheckResult(
        ok=all(r.ok for r in results), max_err=max((r.max_err for r in results), default=0.0)
    )


@torch.no_grad()
def check_output(out: Tensor, ref: Tensor, dtype: torch.dtype) -> CheckResult:
    """Compare a provider's output with the reference (same shape: (batch, seqlen_q, heads,
    head_dim), or (total_q, heads, head_dim) for varlen)."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)} != expected {tuple(ref.shape)}")
    atol, rtol = TOLERANCES[dtype]
    err = (out.float() - ref).abs_()
    finite = bool(torch.isfinite(err).all())
    max_err = float(err.max()) if finite else math.inf
    within = bool((err <= atol + rtol * ref.abs()).all()) if finite else False
    return CheckResult(ok=within, max_err=max_err)
