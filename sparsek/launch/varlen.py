"""Packed variable-length attention on the GPU: `sparsek::attention_varlen`'s CUDA kernel.

The `varlen_q` + kv "varlen" kernel over q/k/v viewed as a batch of one packed sequence
axis, bounds from cu_seqlens_q/k. The kernel writes every row: those past
cu_seqlens_q[-1] belong to no sequence and get 0 / -inf (`SeqInfo.read_packed` in
`cutedsl_kernels/common/seqlen.py`). Masks (`sparsek.masks.Mask`) choose the kernel's
`MaskSpec`; window sizes and softcap are launch arguments, sinks a (1, num_heads) view.
No host synchronization: capturable in a CUDA graph once its kernel is loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cutedsl_kernels.abi import call_fmha_fwd
from cutedsl_kernels.config import PACKED
from sparsek.launch import launcher
from sparsek.launch.tma import one_kv_head, tma_compatible
from sparsek.masks import Mask


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    mask: Mask,
    softmax_scale: float,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Packed q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) -> out
    (total_q, H, Dv), lse (H, total_q). `sinks`: the (num_heads,) sink logits of a mask
    with sinks."""
    total_q, num_heads, head_dim = q.shape
    head_dim_v = v.shape[-1]
    out = launcher.empty((total_q, num_heads, head_dim_v), q.dtype, q.device)
    lse = launcher.empty((num_heads, total_q), torch.float32, q.device)
    if total_q == 0:
        return out, lse
    if max_seqlen_q == 0 or k.shape[0] == 0 or cu_seqlens_q.shape[0] < 2:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    k, v = one_kv_head(k, v)
    # The kernel writes every row, those past cu_seqlens_q[-1] included (0 and -inf).
    kernel = launcher.forward_kernel(
        q.device, head_dim, q.dtype, mask.spec, PACKED, head_dim_v=head_dim_v
    )
    counter = launcher.zeroed_counter(q.device) if kernel.takes_tile_counter else None
    with launcher.device_guard(q.device):
        call_fmha_fwd(
            kernel.fn,
            tma_compatible(q).unsqueeze(0),
            tma_compatible(k).unsqueeze(0),
            tma_compatible(v).unsqueeze(0),
            out.unsqueeze(0),
            lse.unsqueeze(0),
            cu_seqlens_q=cu_seqlens_q.contiguous(),
            cu_seqlens_k=cu_seqlens_k.contiguous(),
            tile_counter=counter,
            sinks=None if sinks is None else sinks.view(1, -1),  # one logit per head
            softmax_scale=float(softmax_scale),
            window_left=mask.window_left,
            window_right=mask.window_right,
            softcap=mask.softcap,
            max_seqlen_q=int(max_seqlen_q),
            num_ctas=launcher.num_sms(q.device.index),
        )
    return out, lse
