"""FP8 prefill on the GPU: dense and packed (varlen) requests on the FP8 kernels.

The FP8 kernels take q, k and v in float8_e4m3fn, their (batch, num_kv_heads) float32
descales as they are (any strides), and write O in the request's `out_dtype`. They read
V key-major (`FmhaFwdConfig.v_key_major`: the second GEMM's 8-bit B operand must be
K-major), so each call first writes V^T, (batch, num_kv_heads, head_dim, keys) with the
key axis padded to a multiple of 16 elements (TMA's 16-byte strides), one pass over V;
packed, the rows past the last sequence are zero in it (the kernel multiplies them by
P = 0, which NaN padding would poison). q and k are read in place where TMA can read
them, else copied. No host synchronization: capturable in a CUDA graph once the kernel
is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cutedsl_kernels.abi import call_fmha_fwd
from cutedsl_kernels.config import DENSE, PACKED
from sparsek.launch import launcher
from sparsek.launch.tma import tma_compatible
from sparsek.masks import Mask
from sparsek.reference import causal_offset

KEY_ALIGN = 16  # V^T's key axis is padded to this many FP8 elements (16 bytes)


def key_major(v: Tensor, valid_rows: Tensor | None = None) -> Tensor:
    """V (..., keys, heads, head_dim) as the same logical tensor stored key-major:
    (..., heads, head_dim, keys padded to KEY_ALIGN), viewed back as (..., keys, heads,
    head_dim). `valid_rows` (a 0-d int tensor on v's device): keys at or past it are
    written as zeros (packed padding)."""
    *lead, keys, heads, dim = v.shape
    padded = -(-keys // KEY_ALIGN) * KEY_ALIGN
    src = v.view(torch.uint8)  # (copies and fills of 8-bit floats, as bytes)
    if valid_rows is not None:
        rows = torch.arange(keys, device=v.device).view(keys, 1, 1)
        src = src.masked_fill(rows >= valid_rows, 0)  # byte 0 is +0.0 in E4M3
    store = torch.empty((*lead, heads, dim, padded), dtype=torch.uint8, device=v.device)
    n = len(lead)
    store[..., :keys].copy_(src.permute(*range(n), n + 1, n + 2, n))
    view = store.permute(*range(n), n + 2, n, n + 1)[..., :keys, :, :]
    return view.view(v.dtype)


def schedule_args(kernel: launcher.ForwardKernel, device: torch.device) -> dict[str, Any]:
    """A persistent kernel's CTA count (the SM count; ignored by the others) and a dynamic
    schedule's zeroed tile counter."""
    counter = launcher.zeroed_counter(device) if kernel.takes_tile_counter else None
    return {"tile_counter": counter, "num_ctas": launcher.num_sms(device.index)}


def attention_fp8(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask,
    softmax_scale: float,
    causal_top_left: bool,
    sinks: Tensor | None,
    descales: tuple[Tensor, Tensor, Tensor],
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Dense FP8 q (B, Sq, H, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, D) -> out (B, Sq, H,
    D) in `out_dtype`, lse (B, H, Sq) float32.

    Raises:
        UnsupportedError: no registered FP8 kernel serves the request.
    """
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    out = launcher.empty((batch, seqlen_q, num_heads, v.shape[-1]), out_dtype, q.device)
    lse = launcher.empty((batch, num_heads, seqlen_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    kernel = launcher.forward_kernel(
        q.device, head_dim, q.dtype, mask.spec, DENSE, out_dtype=out_dtype
    )
    offset = 0
    if mask.causal or mask.window:
        offset = causal_offset(seqlen_q, seqlen_k, causal_top_left)
    with launcher.device_guard(q.device):
        call_fmha_fwd(
            kernel.fn,
            tma_compatible(q),
            tma_compatible(k),
            key_major(v),
            out,
            lse,
            **schedule_args(kernel, q.device),
            sinks=None if sinks is None else sinks.view(1, -1),  # one logit per head
            q_descale=descales[0],
            k_descale=descales[1],
            v_descale=descales[2],
            softmax_scale=float(softmax_scale),
            causal_offset=offset,
            window_left=mask.window_left,
            window_right=mask.window_right,
            softcap=mask.softcap,
        )
    return out, lse


def attention_varlen_fp8(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    mask: Mask,
    softmax_scale: float,
    sinks: Tensor | None,
    descales: tuple[Tensor, Tensor, Tensor],
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Packed FP8 q (total_q, H, D), k and v (total_k, Hkv, D) -> out (total_q, H, D) in
    `out_dtype`, lse (H, total_q) float32; descale row b belongs to sequence b.

    Raises:
        UnsupportedError: no registered FP8 kernel serves the request.
    """
    total_q, num_heads, head_dim = q.shape
    out = launcher.empty((total_q, num_heads, v.shape[-1]), out_dtype, q.device)
    lse = launcher.empty((num_heads, total_q), torch.float32, q.device)
    if total_q == 0:
        return out, lse
    if max_seqlen_q == 0 or k.shape[0] == 0 or cu_seqlens_q.shape[0] < 2:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    kernel = launcher.forward_kernel(
        q.device, head_dim, q.dtype, mask.spec, PACKED, out_dtype=out_dtype
    )
    cu_seqlens_k = cu_seqlens_k.contiguous()
    with launcher.device_guard(q.device):
        call_fmha_fwd(
            kernel.fn,
            tma_compatible(q).unsqueeze(0),
            tma_compatible(k).unsqueeze(0),
            key_major(v.unsqueeze(0), cu_seqlens_k[-1]),
            out.unsqueeze(0),
            lse.unsqueeze(0),
            **schedule_args(kernel, q.device),
            cu_seqlens_q=cu_seqlens_q.contiguous(),
            cu_seqlens_k=cu_seqlens_k,
            sinks=None if sinks is None else sinks.view(1, -1),
            q_descale=descales[0],
            k_descale=descales[1],
            v_descale=descales[2],
            softmax_scale=float(softmax_scale),
            window_left=mask.window_left,
            window_right=mask.window_right,
            softcap=mask.softcap,
            max_seqlen_q=int(max_seqlen_q),
        )
    return out, lse
