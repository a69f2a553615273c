"""CUDA implementations of `sparsek::attention_varlen` and `sparsek::attention_with_kvcache`.

How each request maps onto one kernel launch (plus the split-KV combine):

- attention_varlen: the `varlen_q` + kv "varlen" kernel over q/k/v viewed as a batch of
  one packed sequence axis, bounds from cu_seqlens_q/k.
- attention_with_kvcache, one query token per sequence (decode; a 4-D q with seqlen_q = 1,
  or a packed q whose max_seqlen_q is 1 and total_q == batch): the query heads that share
  a KV head become the rows of one query tile (q viewed as (batch, group, kv_heads, d),
  no copy), so each CTA reads its KV head's cache once for the whole group. With a single
  query the bottom-right causal mask hides nothing: the non-causal kernel runs.
- other kvcache requests: the kv "cache" / "paged" kernel, with `varlen_q` for a packed q.
- split-KV: when the (batch x heads x query tiles) CTAs cannot fill the GPU, the cache's
  key tiles are split across `num_splits` CTAs (chosen from the cache capacity, never from
  device values, so no host synchronization) and merged by the combine kernel.

Packed outputs (non-split) are pre-filled (0 / -inf) because rows past cu_seqlens_q[-1]
belong to no sequence and no CTA writes them. Every path is capturable in a CUDA graph
once its kernels are loaded. Requests no kernel serves fall back to the reference
(`sparsek.api_varlen` has already logged or, strict, refused them).
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
from sparsek.registry import Variant, detect_arch, dtype_name, find, lookup_kv_store

# Splits never exceed this (the partial buffers grow with it; past ~2x the SM count
# there is nothing left to fill).
MAX_SPLITS = 128
# choose_splits takes the fewest splits within this fraction of the best wave efficiency.
WAVE_EFFICIENCY = 0.95


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
    out.zero_()
    lse.fill_(float("-inf"))
    if max_seqlen_q == 0 or k.shape[0] == 0:
        return out, lse
    kernel = _launcher(q.device, head_dim, q.dtype, causal, Variant(True, "varlen"))
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
        float(softmax_scale),
        0,
        int(max_seqlen_q),
        1,
    )
    return out, lse


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    cu_seqlens_q: Tensor | None,
    max_seqlen_q: int | None,
    causal: bool,
    softmax_scale: float,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """See the module docstring; shapes as in `sparsek.ops_varlen`."""
    batch = cache_seqlens.shape[0]
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_kv_heads = k_cache.shape[2]
    packed = cu_seqlens_q is not None
    if packed:
        total_q = q.shape[0]
        out = ops._empty((total_q, num_heads, head_dim), q.dtype, q.device)
        lse = ops._empty((num_heads, total_q), torch.float32, q.device)
        seqlen_q = int(max_seqlen_q or 0)
    else:
        seqlen_q = q.shape[1]
        out = ops._empty((batch, seqlen_q, num_heads, head_dim), q.dtype, q.device)
        lse = ops._empty((batch, num_heads, seqlen_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    paged = block_table is not None
    capacity = (
        block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    )
    decode = seqlen_q == 1 and (not packed or q.shape[0] == batch)
    if capacity == 0 or seqlen_q == 0:
        return out.zero_(), lse.fill_(float("-inf"))

    q = tma_compatible(q)
    lse_rows = lse
    group = num_heads // num_kv_heads
    if decode:
        # (batch, group, kv_heads, d) views: the group's heads are one tile's rows.
        q_k = _group_rows(q.view(batch, num_heads, head_dim), num_kv_heads, group)
        out_k = _group_rows(out.view(batch, num_heads, head_dim), num_kv_heads, group)
        if packed:  # (num_heads, batch) is not row-contiguous per group: stage it
            lse_rows = ops._empty((batch, num_heads), torch.float32, q.device)
        lse_k = lse_rows.view(batch, num_kv_heads, group)
        causal, cu_q, rows, kernel_heads = False, None, group, num_kv_heads
    elif cu_seqlens_q is not None:
        out.zero_()
        lse.fill_(float("-inf"))
        q_k, out_k, lse_k = q.unsqueeze(0), out.unsqueeze(0), lse.unsqueeze(0)
        cu_q, rows, kernel_heads = cu_seqlens_q.contiguous(), seqlen_q, num_heads
    else:
        q_k, out_k, lse_k = q, out, lse
        cu_q, rows, kernel_heads = None, seqlen_q, num_heads

    variant = Variant(
        varlen_q=cu_q is not None,
        kv_layout="paged" if paged else "cache",
        page_size=k_cache.shape[1] if paged else 0,
    )
    config = kernel_config(q, v_cache, causal, variant)
    assert isinstance(config, FmhaFwdConfig), config  # the caller checked
    ctas = math.ceil(rows / config.tile_m) * kernel_heads * batch
    splits = choose_splits(num_splits, ctas, math.ceil(capacity / config.tile_n), q.device)
    k_cache, v_cache = tma_compatible(k_cache), tma_compatible(v_cache)
    seqused = cache_seqlens.contiguous()
    table = block_table.contiguous() if block_table is not None else None
    scale = float(softmax_scale)
    if splits == 1:
        kernel = _launcher(q.device, head_dim, q.dtype, causal, variant)
        args = (q_k, k_cache, v_cache, out_k, lse_k, cu_q, None, seqused, table)
        launch(q.device, kernel, *args, scale, 0, rows, 1)
    else:
        split_variant = Variant(variant.varlen_q, variant.kv_layout, variant.page_size, True)
        kernel = _launcher(q.device, head_dim, q.dtype, causal, split_variant)
        o_part = ops._empty((splits, *out_k.shape), torch.float32, q.device)
        lse_part = ops._empty((splits, *lse_k.shape), torch.float32, q.device)
        if cu_q is not None:  # rows past cu_seqlens_q[-1]: empty in every split
            lse_part.fill_(float("-inf"))
        args = (q_k, k_cache, v_cache, o_part, lse_part, cu_q, None, seqused, table)
        launch(q.device, kernel, *args, scale, 0, rows, splits)
        combine = _launcher(q.device, head_dim, q.dtype, None)
        launch(q.device, combine, o_part, lse_part, out_k, lse_k)
    if lse_rows is not lse:
        lse.copy_(lse_rows.t())
    return out, lse


def load_kvcache_kernels(
    device: torch.device, head_dim: int, dtype: torch.dtype, page_size: int
) -> None:
    """Load (compile on a cache miss) every kernel `attention_with_kvcache` may launch for
    packed queries over a cache of `page_size` (0: contiguous): decode (non-causal, one
    query per sequence), packed causal queries, each with and without split-KV, the
    combine, and (paged) the cache update `store_paged_kv`. Serving engines call this
    before their first request or CUDA-graph capture.

    Raises:
        UnsupportedError: no registered kernel serves one of them.
    """
    kv_layout = "paged" if page_size else "cache"
    for varlen_q, causal in ((False, False), (True, True)):
        for split in (False, True):
            variant = Variant(varlen_q, kv_layout, page_size, split)
            _launcher(device, head_dim, dtype, causal, variant)
    _launcher(device, head_dim, dtype, None)
    if page_size:
        _store_launcher(device, head_dim, dtype)


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


def _group_rows(t: Tensor, num_kv_heads: int, group: int) -> Tensor:
    """(batch, heads, d) -> (batch, group, kv_heads, d) view: head = kv_head * group + g."""
    return t.view(t.shape[0], num_kv_heads, group, t.shape[2]).transpose(1, 2)


def choose_splits(requested: int, ctas: int, key_tiles: int, device: torch.device) -> int:
    """Split-KV factor: `requested` if > 0 (capped by the key tiles), else automatic.

    Automatic: no split once the CTAs nearly fill the SMs (>= 80%); otherwise the fewest
    splits whose wave efficiency (CTAs / (waves x SMs), the last wave counted whole) is
    within `WAVE_EFFICIENCY` of the best reachable one, never more than there are key
    tiles of the cache's capacity. (A CTA of these kernels fills an SM: 3 splits of 64
    CTAs on 132 SMs run as two waves, the second 45% full.)
    """
    limit = max(1, min(key_tiles, MAX_SPLITS))
    if requested > 0:
        return min(requested, limit)
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if ctas * 5 >= sms * 4:
        return 1
    efficiency = [ctas * s / (sms * math.ceil(ctas * s / sms)) for s in range(1, limit + 1)]
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, 1) if e >= WAVE_EFFICIENCY * best)


@functools.cache
def _num_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)
