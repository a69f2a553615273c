"""The paged KV-cache update on the GPU (vLLM's `do_kv_cache_update`): one launch of the
SIMT kernel `cutedsl_kernels/simt/paged_kv_store.py`, no host synchronization."""

from __future__ import annotations

import torch
from torch import Tensor

from cutedsl_kernels.abi import call_kv_store
from sparsek.launch import launcher


def store_paged_kv(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    scales: tuple[Tensor, Tensor] | None = None,
) -> None:
    """The paged KV-cache update kernel: token i's key/value at slot `slot_mapping[i]`
    (block * block_size + offset) of (num_blocks, block_size, num_kv_heads, head_dim)
    caches, slots < 0 skipped. key/value (>= len(slot_mapping), num_kv_heads, head_dim)
    in the caches' dtype, last dims contiguous; or 16-bit into float8_e4m3fn caches with
    `scales` = (k_scale, v_scale), one-element float32 tensors on the device (the caches
    hold key / k_scale and value / v_scale, rounded). One launch, no host
    synchronization."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    kernel = launcher.kv_store_kernel(key.device, key.shape[-1], key.dtype, k_cache.dtype)
    slots = slot_mapping.to(torch.int64).contiguous()
    k_scale, v_scale = (None, None) if scales is None else (s.reshape(1) for s in scales)
    with launcher.device_guard(key.device):
        call_kv_store(kernel, key[:n], value[:n], k_cache, v_cache, slots, k_scale, v_scale)
