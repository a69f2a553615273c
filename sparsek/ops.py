"""The three torch ops: one opaque node each for eager, torch.compile and CUDA graphs.

    torch.ops.sparsek.attention(q, k, v, causal, softmax_scale, causal_top_left,
                                window_left=-1, window_right=-1, softcap=0.0,
                                sinks=None, q_descale=None, k_descale=None,
                                v_descale=None, out_dtype=None) -> (out, lse)

    q:   (batch, seqlen_q, num_heads, head_dim)
    k:   (batch, seqlen_k, num_kv_heads, head_dim)
    v:   (batch, seqlen_k, num_kv_heads, head_dim_v)
    out: (batch, seqlen_q, num_heads, head_dim_v), q.dtype (FP8: out_dtype, bfloat16 when
         None), contiguous
    lse: (batch, num_heads, seqlen_q), float32, contiguous (natural-log log-sum-exp)

    torch.ops.sparsek.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, causal, softmax_scale,
                                       window_left=-1, window_right=-1, softcap=0.0,
                                       sinks=None, q_descale=None, k_descale=None,
                                       v_descale=None, out_dtype=None) -> (out, lse)

    q:   (total_q, num_heads, head_dim)          cu_seqlens_q: (batch + 1,) int32
    k:   (total_k, num_kv_heads, head_dim)       cu_seqlens_k: (batch + 1,) int32
    v:   (total_k, num_kv_heads, head_dim_v)     max_seqlen_q, max_seqlen_k: ints
    out: (total_q, num_heads, head_dim_v), q.dtype (FP8: out_dtype, bfloat16 when None),
         contiguous
    lse: (num_heads, total_q), float32, contiguous (FlashAttention's varlen layout)

    torch.ops.sparsek.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table,
                                             cu_seqlens_q, max_seqlen_q, causal,
                                             softmax_scale, num_splits, window_left=-1,
                                             window_right=-1, softcap=0.0,
                                             sinks=None, k_descale=None,
                                             v_descale=None) -> (out, lse)

    q:       (batch, seqlen_q, num_heads, head_dim)  [cu_seqlens_q, max_seqlen_q None]
         or  (total_q, num_heads, head_dim)          [cu_seqlens_q (batch + 1,) int32]
    k_cache: (batch, seqlen_cache, num_kv_heads, head_dim)      [block_table None]
         or  (num_blocks, block_size, num_kv_heads, head_dim)   [block_table (batch, max_blocks)]
    v_cache: like k_cache with head_dim_v;  cache_seqlens: (batch,) int32
             (float8_e4m3fn caches under float16/bfloat16 q: with k_descale, v_descale)
    out:     like q with head_dim_v, q.dtype, contiguous
    lse:     (batch, num_heads, seqlen_q) or, packed, (num_heads, total_q); float32

The mask arguments of all three (sliding window, softcap, sinks: (num_heads,) float32)
are those of `sparsek.masks`, and the FP8 arguments of the first two (float8_e4m3fn q, k,
v with (batch, num_kv_heads) float32 descales and an out_dtype; the third's float8_e4m3fn
caches with k_descale and v_descale) those of `sparsek.fp8`,
all checked by the entry points (the ops trust them); sinks and descale tensors are graph
inputs like q.

Semantics are those of `sparsek.reference` / `sparsek.reference_varlen` (bottom-right
causal per sequence for the varlen and cache ops, rows that see no key -> out 0, lse
-inf). `num_splits` is a hint for the split-KV decode kernel (0 = choose, 1 = no split);
it does not change the result.

Implementations:
  * CUDA: the kernels, through `sparsek.launch` (planned once per request signature, no
    host synchronization: capturable in a CUDA graph after a warm-up call has loaded the
    kernels). `attention` raises `UnsupportedError` when no kernel fits (callers wanting a
    fallback decide before calling); the varlen and cache ops run the reference instead.
    FP8 inputs run on the FP8 kernels (`sparsek.launch.fp8`); where none is registered,
    `sparsek.attention` and `attention_varlen` dequantize them to bfloat16 before they
    call an op.
  * Any other device (CPU): the reference (float32 compute, float64 for float64 inputs),
    slow but exact; for CPU tensors the varlen/cache metadata values are checked first
    (cheap there; on a GPU it would synchronize).
  * Fake (meta) tensors: shapes/dtypes/strides only, never values, so torch.compile and
    export trace the ops with symbolic shapes.
Forward only: no autograd formula is registered (PyTorch's fallback raises "not
implemented" if a caller backpropagates through an op).

`call_attention` and `call_attention_varlen` call an op past the dispatcher when nothing
can intercept the call (see `routing.plain_eager`); `sparsek.attention_with_kvcache` does
so with the request's plan (`attention_with_kvcache_cuda(..., plan)`), which it also asks
whether a kernel serves the request.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cutedsl_kernels.config import PACKED
from sparsek import fp8
from sparsek.launch import dense, kvcache, launcher, varlen
from sparsek.launch import fp8 as fp8_launch
from sparsek.launch.kvcache import KvcachePlan
from sparsek.masks import NO_MASK, Mask, make_mask
from sparsek.reference import reference_attention
from sparsek.reference_varlen import (
    check_kvcache_values,
    check_varlen_values,
    reference_attention_kvcache,
    reference_attention_varlen,
)
from sparsek.routing import plain_eager

# A plain `torch.library.Library` op rather than `torch.library.custom_op`: the latter
# wraps every eager call in Python-level autograd and dispatch layers (~25 us per call
# measured on the CI CPU, against ~2 us for this).
_LIB = torch.library.Library("sparsek", "DEF")  # type: ignore[no-untyped-call]
_LIB.define(  # type: ignore[no-untyped-call]
    "attention(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, "
    "bool causal_top_left, int window_left=-1, int window_right=-1, float softcap=0.0, "
    "Tensor? sinks=None, "
    "Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, "
    "ScalarType? out_dtype=None) -> (Tensor, Tensor)"
)
_LIB.define(  # type: ignore[no-untyped-call]
    "attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, float softmax_scale, "
    "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? sinks=None, "
    "Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, "
    "ScalarType? out_dtype=None) -> (Tensor, Tensor)"
)
_LIB.define(  # type: ignore[no-untyped-call]
    "attention_with_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
    "Tensor? block_table, Tensor? cu_seqlens_q, SymInt? max_seqlen_q, bool causal, "
    "float softmax_scale, int num_splits, int window_left=-1, int window_right=-1, "
    "float softcap=0.0, Tensor? sinks=None, Tensor? k_descale=None, Tensor? v_descale=None) "
    "-> (Tensor, Tensor)"
)


# The descales of a 16-bit call (q_descale, k_descale, v_descale).
NO_DESCALES: tuple[None, None, None] = (None, None, None)


def compute_dtype(q: Tensor) -> torch.dtype:
    """The reference's compute type for inputs like `q`: float64 for float64, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- attention


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    softmax_scale: float,
    causal_top_left: bool,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """`sparsek::attention` on any device without a kernel path: the reference (of the
    dequantized inputs, for FP8)."""
    out_type = fp8.output_dtype(q.dtype, out_dtype)
    if q_descale is not None and k_descale is not None and v_descale is not None:
        q, k, v = (
            fp8.dequantize(t, descale, compute_dtype(q))
            for t, descale in ((q, q_descale), (k, k_descale), (v, v_descale))
        )
    out, lse = reference_attention(
        q,
        k,
        v,
        causal=causal,
        causal_top_left=causal_top_left,
        softmax_scale=softmax_scale,
        window_size=(window_left, window_right),
        softcap=softcap,
        sinks=sinks,
        compute_dtype=compute_dtype(q),
    )
    return out.to(out_type).contiguous(), lse.to(torch.float32).contiguous()


@torch.library.register_fake("sparsek::attention")  # type: ignore[untyped-decorator]
def _attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    softmax_scale: float,
    causal_top_left: bool,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, num_heads, _ = q.shape
    out_type = fp8.output_dtype(q.dtype, out_dtype)
    out = q.new_empty((batch, seqlen_q, num_heads, v.shape[-1]), dtype=out_type)
    lse = q.new_empty((batch, num_heads, seqlen_q), dtype=torch.float32)
    return out, lse


def call_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    causal_top_left: bool,
    mask: Mask = NO_MASK,
    sinks: Tensor | None = None,
    descales: tuple[Tensor | None, Tensor | None, Tensor | None] = NO_DESCALES,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """torch.ops.sparsek.attention (`mask`'s window and softcap, `sinks`, FP8 `descales`
    and `out_dtype`); in plain eager mode its CUDA kernel is called directly (the
    dispatcher round trip, Python -> C++ -> Python, is pure host overhead there)."""
    extra = (mask.window_left, mask.window_right, mask.op_softcap, sinks, *descales, out_dtype)
    if plain_eager(q, k, v):
        return dense.attention(q, k, v, causal, scale, causal_top_left, *extra)
    result: tuple[Tensor, Tensor] = torch.ops.sparsek.attention(
        q, k, v, causal, scale, causal_top_left, *extra
    )
    return result


# ---------------------------------------------------------------------------- varlen


def attention_varlen_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """`sparsek::attention_varlen` without a kernel: the reference (values checked on CPU;
    of the dequantized inputs, for FP8)."""
    if q.device.type == "cpu":
        check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out_type = fp8.output_dtype(q.dtype, out_dtype)
    if q_descale is not None and k_descale is not None and v_descale is not None:
        q, k, v = (
            fp8.dequantize_packed(t, descale, cu, compute_dtype(q))
            for t, descale, cu in (
                (q, q_descale, cu_seqlens_q),
                (k, k_descale, cu_seqlens_k),
                (v, v_descale, cu_seqlens_k),
            )
        )
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
        window_size=(window_left, window_right),
        softcap=softcap,
        sinks=sinks,
        compute_dtype=compute_dtype(q),
    )
    return out.to(out_type).contiguous(), lse.to(torch.float32).contiguous()


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
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    total_q, num_heads, _ = q.shape
    out_type = fp8.output_dtype(q.dtype, out_dtype)
    out = q.new_empty((total_q, num_heads, v.shape[-1]), dtype=out_type)
    lse = q.new_empty((num_heads, total_q), dtype=torch.float32)
    return out, lse


def attention_varlen_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """`sparsek::attention_varlen` on CUDA: the packed kernel, or the reference when no
    kernel serves the request."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    mask = make_mask(causal, (window_left, window_right), softcap, sinks is not None)
    extra = (window_left, window_right, softcap, sinks, q_descale, k_descale, v_descale, out_dtype)
    if q_descale is not None and k_descale is not None and v_descale is not None:
        out_type = fp8.output_dtype(q.dtype, out_dtype)
        if isinstance(launcher.kernel_config(q, v, mask.spec, PACKED, out_dtype=out_type), str):
            return attention_varlen_reference(*args, softmax_scale, *extra)
        descales = (q_descale, k_descale, v_descale)
        return fp8_launch.attention_varlen_fp8(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, mask, softmax_scale, sinks,
            descales, out_type,
        )  # fmt: skip
    if isinstance(launcher.kernel_config(q, v, mask.spec, PACKED), str):
        return attention_varlen_reference(*args, softmax_scale, *extra)
    return varlen.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, mask, softmax_scale, sinks
    )


def call_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    mask: Mask = NO_MASK,
    sinks: Tensor | None = None,
    descales: tuple[Tensor | None, Tensor | None, Tensor | None] = NO_DESCALES,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """torch.ops.sparsek.attention_varlen (`mask`'s window and softcap, `sinks`, FP8
    `descales` and `out_dtype`), past the dispatcher in plain eager mode on CUDA."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    extra = (mask.window_left, mask.window_right, mask.op_softcap, sinks, *descales, out_dtype)
    if q.is_cuda and plain_eager(q, k, v, cu_seqlens_q, cu_seqlens_k):
        return attention_varlen_cuda(*args, softmax_scale, *extra)
    result: tuple[Tensor, Tensor] = torch.ops.sparsek.attention_varlen(*args, softmax_scale, *extra)
    return result


# ---------------------------------------------------------------------------- KV cache


def attention_with_kvcache_reference(
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
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`sparsek::attention_with_kvcache` without a kernel: the reference (values checked
    on CPU; FP8 caches dequantized by their descales)."""
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
        window_size=(window_left, window_right),
        softcap=softcap,
        sinks=sinks,
        compute_dtype=compute_dtype(q),
        k_descale=k_descale,
        v_descale=v_descale,
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
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
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


def attention_with_kvcache_cuda(
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
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    plan: KvcachePlan | None = None,
) -> tuple[Tensor, Tensor]:
    """`sparsek::attention_with_kvcache` on CUDA: the request's kernels (`plan`: its
    `kvcache.kvcache_plan` if the caller has it), or the reference when none serves it.
    An FP8 cache: `fp8_cache_cuda`."""
    if k_descale is not None and v_descale is not None:
        return fp8_cache_cuda(
            (q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q),
            (k_descale, v_descale), causal, softmax_scale, num_splits,
            (window_left, window_right, softcap, sinks), plan,
        )  # fmt: skip
    args = (q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q, causal)
    mask = make_mask(causal, (window_left, window_right), softcap, sinks is not None)
    found = plan if plan is not None else kvcache.kvcache_plan(*args[:-1], mask, num_splits)
    if isinstance(found, str):
        extra = (window_left, window_right, softcap, sinks)
        return attention_with_kvcache_reference(*args, softmax_scale, num_splits, *extra)
    return kvcache.attention_with_kvcache(*args[:-1], mask, softmax_scale, num_splits, found, sinks)


def fp8_cache_cuda(
    cache_args: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, int | None],
    descales: tuple[Tensor, Tensor],
    causal: bool,
    softmax_scale: float,
    num_splits: int,
    mask_args: tuple[int, int, float, Tensor | None],
    plan: KvcachePlan | None = None,
) -> tuple[Tensor, Tensor]:
    """`sparsek::attention_with_kvcache` on CUDA over an FP8 cache: the kernels that
    convert it (`plan`, or the request's own), else the batch's blocks
    dequantized to q's dtype (`fp8.dequantize_cache`) on the 16-bit path."""
    q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q = cache_args
    window_left, window_right, softcap, sinks = mask_args
    mask = make_mask(causal, (window_left, window_right), softcap, sinks is not None)
    found = plan if plan is not None else kvcache.kvcache_plan(*cache_args, mask, num_splits)
    if isinstance(found, KvcachePlan):
        return kvcache.attention_with_kvcache(
            *cache_args, mask, softmax_scale, num_splits, found, sinks, descales
        )
    caches = [
        fp8.dequantize_cache(cache, descale, block_table, cache_seqlens, q.dtype)
        for cache, descale in zip((k_cache, v_cache), descales, strict=True)
    ]
    table = None if block_table is None else fp8.compact_block_table(block_table)
    return attention_with_kvcache_cuda(
        q, caches[0], caches[1], cache_seqlens, table, cu_seqlens_q, max_seqlen_q, causal,
        softmax_scale, num_splits, *mask_args,
    )  # fmt: skip


_LIB.impl("attention", attention_reference, "CompositeExplicitAutograd")  # type: ignore[no-untyped-call]
_LIB.impl("attention", dense.attention, "CUDA")  # type: ignore[no-untyped-call]
_LIB.impl("attention_varlen", attention_varlen_reference, "CompositeExplicitAutograd")  # type: ignore[no-untyped-call]
_LIB.impl("attention_varlen", attention_varlen_cuda, "CUDA")  # type: ignore[no-untyped-call]
_LIB.impl(  # type: ignore[no-untyped-call]
    "attention_with_kvcache", attention_with_kvcache_reference, "CompositeExplicitAutograd"
)
_LIB.impl("attention_with_kvcache", attention_with_kvcache_cuda, "CUDA")  # type: ignore[no-untyped-call]
