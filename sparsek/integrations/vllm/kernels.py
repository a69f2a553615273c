"""The calls sparsek's vLLM backend makes, on vLLM's KV-cache layout; no vLLM import.

vLLM 0.33 hands each attention layer its cache as one tensor, logically
(num_blocks, num_kv_heads, block_size, 2 * head_size): K in the first head_size channels,
V in the last. The physical order of those axes is vLLM's `KVCacheLayout` (LBNHC by
default: per block, token-major (block_size, num_kv_heads, 2 * head_size)). Every layout
gives K and V as strided views (num_blocks, block_size, num_kv_heads, head_size): the
layout `sparsek.attention_with_kvcache` reads, with the strides TMA accepts, so the
kernels read vLLM's cache in place, whatever its layout (`split_kv_cache` refuses a cache
they could not read without a copy).

  split_kv_cache  kv_cache -> (k_cache, v_cache) views
  store_kv        write new tokens' K/V at their slots (block * block_size + offset),
                  skipping slots < 0 (padding): sparsek's cache-update kernel on CUDA (no
                  host synchronization: capturable in a CUDA graph), torch ops elsewhere
  paged_attention a batch of sequences mixing decodes, chunked prefills and prefills:
                  one `attention_with_kvcache` call (packed queries, causal bottom-right
                  per sequence, with the layer's sliding window, logit softcap and
                  attention sinks) written into vLLM's preallocated output
  window_size_of  vLLM's `sliding_window` (tokens a query sees, itself included) as the
                  (left, right) `window_size` of sparsek's kernels: (sliding_window - 1, 0)
  load_kernels    load (compile on a cache miss) every kernel paged_attention and
                  store_kv may launch for a layer's mask and cache dtype

FP8 caches (vLLM's kv_cache_dtype "fp8" / "fp8_e4m3"): the layer cache viewed as
float8_e4m3fn; store_kv quantizes new keys/values with the layer's per-tensor k_scale /
v_scale, paged_attention reads them back with the same factors (bf16/fp16 queries).

These are what the GPU tests (tests/gpu/test_vllm_gpu.py) check against float64 attention
on a cache filled by `store_kv`, so the backend's device path is tested without vLLM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsek import api_varlen
from sparsek.fp8 import is_fp8, quantize
from sparsek.launch import kv_store, kvcache
from sparsek.launch.tma import tma_readable
from sparsek.masks import NO_WINDOW, make_mask

# The key/value dtypes stored into float8_e4m3fn caches (and of the queries over them).
CACHE_QUERY_DTYPES = (torch.float16, torch.bfloat16)


def split_kv_cache(kv_cache: Tensor, head_size: int) -> tuple[Tensor, Tensor]:
    """K and V views (num_blocks, block_size, num_kv_heads, head_size) of a layer's cache.

    Args:
        kv_cache: (num_blocks, num_kv_heads, block_size, 2 * head_size), any strides.
        head_size: channels of K (and of V).

    Raises:
        ValueError: the shape is not the one above, or the kernels could not read a view
            in place (head channels not contiguous, or strides/base not 16-byte aligned).
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(
            "kv_cache must be (num_blocks, num_kv_heads, block_size, 2 * head_size) with "
            f"head_size={head_size}, got shape {tuple(kv_cache.shape)}"
        )
    per_token = kv_cache.transpose(1, 2)  # (num_blocks, block_size, num_kv_heads, 2 * D)
    k_cache = _canonical_singleton_strides(per_token[..., :head_size])
    v_cache = _canonical_singleton_strides(per_token[..., head_size:])
    for name, view in (("K", k_cache), ("V", v_cache)):
        if view.numel() and not tma_readable(view):
            raise ValueError(
                f"kv_cache: the {name} view has strides {view.stride()} (elements) at "
                f"address {view.data_ptr():#x}; sparsek's kernels read the cache in place "
                "and need contiguous head channels, other strides multiples of 8 elements "
                "and a 16-byte-aligned base"
            )
    return k_cache, v_cache


def _canonical_singleton_strides(view: Tensor) -> Tensor:
    """`view` with each size-1 axis given the stride a contiguous tensor would have.

    Such an axis is never stepped along, so its stride is arbitrary (vLLM leaves odd ones,
    e.g. num_kv_heads = 1 under tensor parallelism); TMA still checks it.
    """
    strides = list(view.stride())
    for dim in range(view.dim() - 1, -1, -1):
        if view.shape[dim] == 1:
            inner = dim + 1
            strides[dim] = 1 if inner == view.dim() else strides[inner] * view.shape[inner]
    if strides == list(view.stride()):
        return view
    return view.as_strided(view.shape, strides)


def store_kv(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    scales: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Write token i's key/value at slot `slot_mapping[i]` of the paged caches, in place.

    Args:
        key, value: (num_tokens, num_kv_heads, head_size) in the caches' dtype, or
            float16/bfloat16 for float8_e4m3fn caches; rows past len(slot_mapping)
            ignored (CUDA-graph padding).
        k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_size) views.
        slot_mapping: (n,) integer slots block * block_size + offset; slots < 0 are
            padding and write nothing.
        scales: float8_e4m3fn caches only, and required with them: (k_scale, v_scale),
            one-element float32 tensors on the caches' device (vLLM's per-tensor
            `layer._k_scale`, `layer._v_scale`). The caches hold E4M3 of key / k_scale and
            value / v_scale, saturated at +-448 (`sparsek.fp8.quantize`); attention reads
            them back with the same factors as `k_descale` / `v_descale`.

    Raises:
        ValueError: dtypes that do not match (above), or scales missing, given for a
            16-bit cache, or not one-element float32 tensors on the caches' device.

    CUDA: sparsek's cache-update kernel (one launch, no host synchronization: capturable
    in a CUDA graph; the scales are read when it runs). Elsewhere: `store_kv_reference`.
    """
    check_store_args(key, value, k_cache, v_cache, scales)
    if key.is_cuda:
        key = key if key.stride(-1) == 1 else key.contiguous()
        value = value if value.stride(-1) == 1 else value.contiguous()
        kv_store.store_paged_kv(key, value, k_cache, v_cache, slot_mapping, scales)
    else:
        store_kv_reference(key, value, k_cache, v_cache, slot_mapping, scales)


def check_store_args(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    scales: tuple[Tensor, Tensor] | None,
) -> None:
    """`store_kv`'s checks of dtypes and scales (see its `Raises:`)."""
    if not (is_fp8(k_cache.dtype) and is_fp8(v_cache.dtype)):
        if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype:
            raise ValueError(
                f"key/value dtype ({key.dtype}, {value.dtype}) must match the cache's "
                f"({k_cache.dtype}, {v_cache.dtype}), or the caches be float8_e4m3fn (both)"
            )
        if scales is not None:
            raise ValueError(f"scales are for float8_e4m3fn caches, not {k_cache.dtype}")
        return
    if key.dtype not in CACHE_QUERY_DTYPES or value.dtype != key.dtype:
        raise ValueError(
            f"key/value dtype ({key.dtype}, {value.dtype}): float8_e4m3fn caches take "
            "float16 or bfloat16 keys and values (one dtype), quantized with `scales`"
        )
    if scales is None:
        raise ValueError(
            "float8_e4m3fn caches need scales=(k_scale, v_scale): one-element float32 "
            "tensors (the cache holds key / k_scale, value / v_scale)"
        )
    for name, scale in zip(("k_scale", "v_scale"), scales, strict=True):
        if (
            not isinstance(scale, Tensor)
            or scale.dtype != torch.float32
            or scale.numel() != 1
            or scale.device != k_cache.device
        ):
            got = (
                f"{tuple(scale.shape)} {scale.dtype} on {scale.device}"
                if isinstance(scale, Tensor)
                else type(scale).__name__
            )
            raise ValueError(
                f"scales: {name} must be a one-element float32 tensor on {k_cache.device}, "
                f"got {got}"
            )


def store_kv_reference(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    scales: tuple[Tensor, Tensor] | None = None,
) -> None:
    """`store_kv` in torch operations, on any device (the CPU path and the kernel's oracle).

    Every token is scattered in one indexed write without reading its validity back to
    the host: padding rows are sent to the largest slot of the batch carrying that
    slot's own new key/value (or, if no slot is valid, to slot 0 carrying its current
    content), so every index written more than once receives equal values and the
    result does not depend on the scatter's order.
    """
    n = slot_mapping.shape[0]
    if n == 0:
        return
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    # Device tensors only (indexing with a 0-d tensor would read it back: a sync).
    largest = torch.argmax(slots, keepdim=True)  # (1,): the largest slot's token
    top = slots.gather(0, largest)
    target = torch.where(valid, slots, top.clamp_min(0))
    block_size = k_cache.shape[1]
    index = (target // block_size, target % block_size)
    any_valid = (top >= 0).view(1, 1, 1)
    k_scale, v_scale = scales or (None, None)
    for new, cache, scale in ((key[:n], k_cache, k_scale), (value[:n], v_cache, v_scale)):
        if scale is not None:  # E4M3 rows, moved as bytes (no FP8 indexing kernels needed)
            new, cache = quantize(new, scale).view(torch.uint8), cache.view(torch.uint8)
        filler = torch.where(any_valid, new.index_select(0, largest), cache[0, 0].unsqueeze(0))
        rows = torch.where(valid[:, None, None], new, filler)
        cache.index_put_(index, rows)


def window_size_of(sliding_window: int | None) -> tuple[int, int]:
    """The `window_size` of a layer with vLLM's `sliding_window` (None: no window).

    vLLM's sliding window counts the tokens a query attends to, itself included: the query
    at position p sees positions p - sliding_window + 1 .. p (vLLM's FlashAttention backend
    passes FlashAttention the same (sliding_window - 1, 0) for decoder layers). Causal
    attention already bounds the right side at 0.

    Raises:
        ValueError: `sliding_window` is not None or an int >= 1.
    """
    if sliding_window is None:
        return NO_WINDOW
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
        raise ValueError(
            f"sliding_window={sliding_window!r} must be a number of tokens (an int >= 1) or None"
        )
    if sliding_window < 1:
        raise ValueError(
            f"sliding_window={sliding_window} must be >= 1 (the tokens a query sees, "
            "itself included) or None"
        )
    return (sliding_window - 1, 0)


def paged_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    block_table: Tensor,
    max_query_len: int,
    softmax_scale: float,
    output: Tensor,
    *,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    descales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Causal attention of each sequence's new queries over its cached tokens -> output.

    Args:
        query: (num_tokens, num_heads, head_size), sequences packed by query_start_loc.
        k_cache, v_cache: from `split_kv_cache`, holding every sequence's tokens (the new
            ones included, as `store_kv` wrote them).
        query_start_loc: (num_seqs + 1,) int32 offsets into query.
        seq_lens: (num_seqs,) int32, cached tokens per sequence including the new ones.
        block_table: (num_seqs, max_blocks) int32.
        max_query_len: Python int >= every sequence's number of new queries.
        softmax_scale: multiplier of q k^T.
        output: (num_tokens, num_heads, head_size), written in place and returned.
        window_size: (left, right) sliding window, aligned bottom-right per sequence (the
            query at position p sees cached positions p - left .. p + right; right is
            capped at 0 by causality); (-1, -1): none. `window_size_of` converts vLLM's
            `sliding_window`.
        softcap: > 0: scores s become softcap * tanh(s / softcap) (vLLM's
            `logits_soft_cap`); 0: none.
        sinks: (num_heads,) float32 sink logits on query's device (each joins its head's
            softmax denominator), or None. Read by the kernel when it runs: a persistent
            tensor updated in place is seen by CUDA-graph replays.
        descales: float8_e4m3fn caches only, and required with them: (k_scale, v_scale),
            the one-element float32 tensors `store_kv` quantized with (read when the
            kernel runs, as the sinks are).
    """
    k_descale = v_descale = None
    if descales is not None:  # per-tensor factors as (num_seqs, num_kv_heads) views
        shape = (query_start_loc.shape[0] - 1, k_cache.shape[2])
        k_descale, v_descale = (d.reshape(1, 1).expand(shape) for d in descales)
    out = api_varlen.attention_with_kvcache(
        query,
        k_cache,
        v_cache,
        seq_lens,
        block_table,
        cu_seqlens_q=query_start_loc,
        max_seqlen_q=max_query_len,
        causal=True,
        softmax_scale=softmax_scale,
        window_size=window_size,
        softcap=softcap,
        sinks=sinks,
        k_descale=k_descale,
        v_descale=v_descale,
    )
    assert isinstance(out, Tensor)
    return output.copy_(out)


def load_kernels(
    device: torch.device,
    head_size: int,
    dtype: torch.dtype,
    block_size: int,
    *,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    has_sinks: bool = False,
    cache_dtype: torch.dtype | None = None,
) -> None:
    """Load every kernel `paged_attention` and `store_kv` may launch on `device` with this
    mask (`window_size`, `softcap`, and whether `sinks` are passed) over a cache of
    `cache_dtype` (None: `dtype`; or float8_e4m3fn), compiling on a miss.

    Raises:
        UnsupportedError: no kernel serves (head_size, dtype, block_size, mask, cache
            dtype) on the device.
    """
    if device.type == "cuda" and device.index is None:  # kernels are kept per device index
        device = torch.device("cuda", torch.cuda.current_device())
    mask = make_mask(True, window_size, softcap, has_sinks)
    kvcache.load_kvcache_kernels(device, head_size, dtype, block_size, mask, cache_dtype)
