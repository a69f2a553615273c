"""CUDA implementations of `sparsek::attention_varlen` and the pieces the KV-cache paths share.

- attention_varlen: the `varlen_q` + kv "varlen" kernel over q/k/v viewed as a batch of
  one packed sequence axis, bounds from cu_seqlens_q/k. The kernel writes every row: those
  past cu_seqlens_q[-1] belong to no sequence and get 0 / -inf (`SeqInfo.read_packed`
  in `cutedsl_kernels/common/seqlen.py`).
- kernel_config: which registered config serves a request (memoized per device).
- choose_splits: the split-KV factor of `sparsek.ops_kvcache_cuda` (attention_with_kvcache).
- store_paged_kv: the paged KV-cache update kernel (vLLM's `do_kv_cache_update`).

No host synchronization anywhere: every path is capturable in a CUDA graph once its
kernels are loaded.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from cutedsl_kernels.config import FmhaFwdConfig
from sparsek import ops
from sparsek.cache import KernelFn
from sparsek.ops import _launcher, launch, tma_compatible
from sparsek.registry import PACKED, Variant, detect_arch, dtype_name, find, lookup_kv_store

# Splits never exceed this (the partial buffers grow with it; past ~2x the SM count
# there is nothing left to fill).
MAX_SPLITS = 128
# choose_splits takes the fewest splits within this fraction of the best wave efficiency.
WAVE_EFFICIENCY = 0.95
# ... and does not split caches of at most this many key tiles once the CTAs fill a
# quarter of the SMs: there the partial outputs and the combine cost more than the
# shorter key walk saves (H200, B8 x 8 KV heads = 64 CTAs, 1k context: 2 splits 22.4 us,
# none 19.5; at 4k, 8 tiles per split are even, at 16k 2 splits are 15% faster;
# perf/results/h200/decode_splits_*.md).
SHORT_CACHE_KEY_TILES = 8


def kernel_config(q: Tensor, v: Tensor, causal: bool, variant: Variant) -> FmhaFwdConfig | str:
    """The kernel config serving this request on q's device, or why there is none."""
    key = (q.device, q.shape[-1], v.shape[-1], q.dtype, causal, variant)
    found = _CONFIGS.get(key)
    if found is None:
        found = _CONFIGS[key] = _kernel_config(q, v, causal, variant)
    return found


# kernel_config's answers: the launch path's per-call lookup (architecture detection and
# the registry are too slow to repeat on every call).
_CONFIGS: dict[tuple[object, ...], FmhaFwdConfig | str] = {}


def _kernel_config(q: Tensor, v: Tensor, causal: bool, variant: Variant) -> FmhaFwdConfig | str:
    if q.device.type != "cuda":
        return f"device={q.device.type}: the kernels run on CUDA devices only"
    if v.shape[-1] != q.shape[-1]:
        return f"value head_dim={v.shape[-1]} differs from query head_dim={q.shape[-1]}"
    arch = detect_arch(q.device)
    if arch is None:
        return "no CUDA device detected"
    found = find(arch, int(q.shape[-1]), dtype_name(q.dtype), causal, variant)
    return found if isinstance(found, FmhaFwdConfig) else "; ".join(found)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    """Packed q (total_q, H, D), k/v (total_k, Hkv, D) -> out like q, lse (H, total_q)."""
    total_q, num_heads, head_dim = q.shape
    out = ops._empty((total_q, num_heads, head_dim), q.dtype, q.device)
    lse = ops._empty((num_heads, total_q), torch.float32, q.device)
    if total_q == 0:
        return out, lse
    if max_seqlen_q == 0 or k.shape[0] == 0 or cu_seqlens_q.shape[0] < 2:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    # The kernel writes every row, those past cu_seqlens_q[-1] included (0 and -inf).
    kernel = _launcher(q.device, head_dim, q.dtype, causal, PACKED)
    counter = ops.tile_counter(q.device, head_dim, q.dtype, causal, PACKED)
    launch(
        q.device,
        kernel,
        tma_compatible(q).unsqueeze(0),
        tma_compatible(k).unsqueeze(0),
        tma_compatible(v).unsqueeze(0),
        out.unsqueeze(0),
        lse.unsqueeze(0),
        cu_seqlens_q.contiguous(),
        cu_seqlens_k.contiguous(),
        None,
        None,
        counter,
        float(softmax_scale),
        0,
        int(max_seqlen_q),
        1,
        ops.num_sms(q.device.index),
    )
    return out, lse


def store_paged_kv(
    key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
) -> None:
    """The paged KV-cache update kernel: token i's key/value at slot `slot_mapping[i]`
    (block * block_size + offset) of (num_blocks, block_size, num_kv_heads, head_dim)
    caches, slots < 0 skipped. key/value (>= len(slot_mapping), num_kv_heads, head_dim)
    in the caches' dtype, last dims contiguous. One launch, no host synchronization."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    kernel = _store_launcher(key.device, key.shape[-1], k_cache.dtype)
    slots = slot_mapping.to(torch.int64).contiguous()
    launch(key.device, kernel, key[:n], value[:n], k_cache, v_cache, slots)


# (device index, head_dim, dtype) -> loaded paged KV-cache update kernel.
_STORE_LAUNCHERS: dict[tuple[int | None, int, torch.dtype], KernelFn] = {}


def _store_launcher(device: torch.device, head_dim: int, dtype: torch.dtype) -> KernelFn:
    key = (device.index, head_dim, dtype)
    kernel = _STORE_LAUNCHERS.get(key)
    if kernel is None:
        config_for = functools.partial(lookup_kv_store, head_dim=head_dim, dtype=dtype)
        kernel = _STORE_LAUNCHERS[key] = ops.load(device, config_for)
    return kernel


def choose_splits(requested: int, ctas: int, key_tiles: int, device: torch.device) -> int:
    """Split-KV factor: `requested` if > 0 (capped by the key tiles), else automatic.

    Automatic: no split once the CTAs nearly fill the SMs (>= 80%), nor for a short
    cache (`SHORT_CACHE_KEY_TILES`) once they fill a quarter; otherwise the fewest splits
    whose wave efficiency (CTAs / (waves x SMs), the last wave counted whole) is within
    `WAVE_EFFICIENCY` of the best reachable one, never more than there are key tiles of
    the cache's capacity. (A CTA of these kernels fills an SM: 3 splits of 64 CTAs on
    132 SMs run as two waves, the second 45% full; the two-CTAs-per-SM decode tiles are
    never split.)
    """
    limit = max(1, min(key_tiles, MAX_SPLITS))
    if requested > 0:
        return min(requested, limit)
    sms = ops.num_sms(device.index)
    if ctas * 5 >= sms * 4 or (ctas * 4 >= sms and key_tiles <= SHORT_CACHE_KEY_TILES):
        return 1
    efficiency = [ctas * s / (sms * math.ceil(ctas * s / sms)) for s in range(1, limit + 1)]
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, 1) if e >= WAVE_EFFICIENCY * best)
