"""The float64 oracle of FP8 attention that the CPU and GPU FP8 tests share.

Inputs are dequantized one head at a time from the definition in `sparsek/fp8.py` (x *
descale[b, h // group]), independent of `sparsek.fp8`'s vectorized dequantization, then
attended in float64 with FlashAttention's bottom-right window and causal conventions.
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn


def dequantized(t: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """(batch, seq, heads, dim) FP8 -> float64, head h scaled by descale[b, h // group]."""
    group = t.shape[2] // descale.shape[1]
    out = t.double().clone()
    for b in range(t.shape[0]):
        for h in range(t.shape[2]):
            out[b, :, h] *= descale[b, h // group].double()
    return out


def masked_scores(q, k, v, descales, causal, window=(-1, -1), scale=None, softcap=0.0):
    """float64 scores (b, h, sq, sk) of the dequantized inputs, softcapped and masked
    (-inf), the values (b, sk, h, dv) repeated per query head, and the (sq, sk) mask."""
    qf, kf, vf = (dequantized(t, d) for t, d in zip((q, k, v), descales, strict=True))
    group = q.shape[2] // k.shape[2]
    kf, vf = kf.repeat_interleave(group, dim=2), vf.repeat_interleave(group, dim=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    sq, sk = q.shape[1], k.shape[1]
    i = torch.arange(sq, device=q.device).view(sq, 1) + sk - sq
    j = torch.arange(sk, device=q.device).view(1, sk)
    left, right = window
    right = 0 if causal else right
    seen = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if right >= 0:
        seen &= j <= i + right
    if left >= 0:
        seen &= j >= i - left
    return scores.masked_fill(~seen, -math.inf), vf, seen


def oracle(q, k, v, descales, causal, window=(-1, -1), scale=None, softcap=0.0, sinks=None):
    """float64 attention of the dequantized inputs: out (b, sq, h, dv), lse (b, h, sq).

    softcap > 0: scores s become softcap * tanh(s / softcap); sinks: (h,) logits that join
    the denominator (and the LSE) of every row that sees a key (`sparsek.masks`)."""
    scores, vf, _ = masked_scores(q, k, v, descales, causal, window, scale, softcap)
    lse = torch.logsumexp(scores, dim=-1)
    if sinks is not None:
        with_sink = torch.logaddexp(lse, sinks.double().view(1, -1, 1).expand_as(lse))
        lse = torch.where(torch.isneginf(lse), lse, with_sink)
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", probs, vf), lse
