"""The `sparsek::attention_varlen` and `sparsek::attention_with_kvcache` torch ops.

    torch.ops.sparsek.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, causal, softmax_scale) -> (out, lse)

    q:   (total_q, num_heads, head_dim)          cu_seqlens_q: (batch + 1,) int32
    k:   (total_k, num_kv_heads, head_dim)       cu_seqlens_k: (batch + 1,) int32
    v:   (total_k, num_kv_heads, head_dim_v)     max_seqlen_q, max_seqlen_k: ints
    out: (total_q, num_heads, head_dim_v), q.dtype, contiguous
    lse: (num_heads, total_q), float32, contiguous (FlashAttention's varlen layout)

    torch.ops.sparsek.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table,
                                             cu_seqlens_q, max_seqlen_q, causal,
                                             softmax_scale, num_splits) -> (out, lse)

    q:       (batch, seqlen_q, num_heads, head_dim)  [cu_seqlens_q, max_seqlen_q None]
         or  (total_q, num_heads, head_dim)          [cu_seqlens_q (batch + 1,) int32]
    k_cache: (batch, seqlen_cache, num_kv_heads, head_dim)      [block_table None]
         or  (num_blocks, block_size, num_kv_heads, head_dim)   [block_table (batch, max_blocks)]
    v_cache: like k_cache with head_dim_v;  cache_seqlens: (batch,) int32
    out:     like q with head_dim_v, q.dtype, contiguous
    lse:     (batch, num_heads, seqlen_q) or, packed, (num_heads, total_q); float32

Semantics are those of `sparsek.reference_varlen` (bottom-right causal per sequence, rows
that see no key -> out 0, lse -inf). `num_splits` is a hint for the split-KV decode kernel
(0 = choose, 1 = no split); it does not change the result.

Implementations:
  * CUDA: the sm90 kernels (`sparsek.ops_varlen_cuda` and `sparsek.ops_kvcache_cuda`:
    packed, cached and paged variants, split-KV with a combine kernel); requests no
    kernel serves (e.g. head_dim_v != head_dim, an unregistered head_dim or dtype) run
    the reference. No host synchronization.
  * Any other device: the reference (`sparsek.reference_varlen`, float32 compute, float64
    for float64 inputs); for CPU tensors the metadata values are checked first (cheap
    there; on a GPU it would synchronize).
  * Fake (meta): shapes only, never values, so torch.compile traces both ops with
    symbolic shapes.
Forward only: no autograd formula is registered.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsek import ops_kvcache_cuda, ops_varlen_cuda
from sparsek.reference_varlen import (
    check_kvcache_values,
    check_varlen_values,
    reference_attention_kvcache,
    reference_attention_varlen,
)
from sparsek.registry import PACKED, Variant

# A fragment of the `sparsek` namespace that `sparsek.ops` defines (same plain
# torch.library.Library style, for the same per-call overhead reasons).
_LIB = torch.library.Library("sparsek", "FRAGMENT")  # type: ignore[no-untyped-call]
_LIB.define(  # type: ignore[no-untyped-call]
    "attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, float softmax_scale) "
    "-> (Tensor, Tensor)"
)
_LIB.define(  # type: ignore[no-untyped-call]
    "attention_with_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
    "Tensor? block_table, Tensor? cu_seqlens_q, SymInt? max_seqlen_q, bool causal, "
    "float softmax_scale, int num_splits) -> (Tensor, Tensor)"
)


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _attention_varlen_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    """Reference implementation (any device; CUDA requests no kernel serves)."""
    if q.device.type == "cpu":
        check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = reference_attention_varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal=causal,
        softmax_scale=softmax_scale,
        compute_dtype=_compute_dtype(q),
    )
    return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous()


@torch.library.register_fake("sparsek::attention_varlen")  # type: ignore[untyped-decorator]
def _attention_varlen_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    total_q, num_heads, _ = q.shape
    out = q.new_empty((total_q, num_heads, v.shape[-1]))
    lse = q.new_empty((num_heads, total_q), dtype=torch.float32)
    return out, lse


def _attention_with_kvcache_reference(
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
    """Reference implementation (any device; CUDA requests no kernel serves)."""
    if q.device.type == "cpu":
        check_kvcache_values(q, k_cache, cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q)
    out, lse = reference_attention_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        block_table,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max_seqlen_q,
        causal=causal,
        softmax_scale=softmax_scale,
        compute_dtype=_compute_dtype(q),
    )
    return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous()


@torch.library.register_fake("sparsek::attention_with_kvcache")  # type: ignore[untyped-decorator]
def _attention_with_kvcache_fake(
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
    head_dim_v = v_cache.shape[-1]
    if cu_seqlens_q is None:
        batch, seqlen_q, num_heads, _ = q.shape
        out = q.new_empty((batch, seqlen_q, num_heads, head_dim_v))
        lse = q.new_empty((batch, num_heads, seqlen_q), dtype=torch.float32)
        return out, lse
    total_q, num_heads, _ = q.shape
    out = q.new_empty((total_q, num_heads, head_dim_v))
    lse = q.new_empty((num_heads, total_q), dtype=torch.float32)
    return out, lse


_LIB.impl("attention_varlen", _attention_varlen_reference, "CompositeExplicitAutograd")  # type: ignore[no-untyped-call]
_LIB.impl(  # type: ignore[no-untyped-call]
    "attention_with_kvcache", _attention_with_kvcache_reference, "CompositeExplicitAutograd"
)


def _attention_varlen_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    if isinstance(ops_varlen_cuda.kernel_config(q, v, causal, PACKED), str):
        return _attention_varlen_reference(*args, softmax_scale)
    return ops_varlen_cuda.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, softmax_scale
    )


def _attention_with_kvcache_cuda(
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
    args = (q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q, causal)
    plan = ops_kvcache_cuda.kvcache_plan(*args, num_splits)
    if isinstance(plan, str):
        return _attention_with_kvcache_reference(*args, softmax_scale, num_splits)
    return ops_kvcache_cuda.attention_with_kvcache(*args, softmax_scale, num_splits, plan)


def kvcache_variant(args: tuple[object, ...]) -> Variant:
    """The (non-split) kernel variant of attention_with_kvcache(q, k_cache, v_cache,
    cache_seqlens, block_table, cu_seqlens_q, ...)."""
    k_cache, block_table, cu_seqlens_q = args[1], args[4], args[5]
    assert isinstance(k_cache, Tensor)
    paged = block_table is not None
    return Variant(
        varlen_q=cu_seqlens_q is not None,
        kv_layout="paged" if paged else "cache",
        page_size=k_cache.shape[1] if paged else 0,
    )


_LIB.impl("attention_varlen", _attention_varlen_cuda, "CUDA")  # type: ignore[no-untyped-call]
_LIB.impl("attention_with_kvcache", _attention_with_kvcache_cuda, "CUDA")  # type: ignore[no-untyped-call]
