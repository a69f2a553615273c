"""Public entry points for variable-length batches and KV-cache attention.

    out = sparsek.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
    out = sparsek.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table)

Both take the mask arguments of `sparsek.attention` (`causal`, `window_size`, `softcap`,
`sinks`; see `sparsek.masks`), aligned per sequence.

On CUDA both run the sm90 kernels through the `sparsek::attention_varlen` and
`sparsek::attention_with_kvcache` ops. CPU tensors that do not require grad take the
documented torch reference (`sparsek.reference_varlen`; not a fallback); anything else no
kernel serves (inputs that require grad, on any device; another device, head_dim_v !=
head_dim, an unregistered head_dim or dtype) also runs the reference: correct but slow,
logged once per reason, and an `UnsupportedError` under `SPARSEK_STRICT=1` (the rule of
every entry point: `sparsek.routing`).

Validation reads shapes, dtypes and devices only, never tensor values (no host sync): the
values of `cu_seqlens_*`, `cache_seqlens` and `block_table` are the caller's contract (the
ops check them for CPU tensors, where that is cheap). `max_seqlen_*` are Python ints so that
neither eager calls nor torch.compile need to read them from a device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cutedsl_kernels.config import PACKED
from sparsek import fp8, ops
from sparsek.fp8 import Fp8Call, check_fp8_args, check_fp8_cache_args
from sparsek.launch import kvcache, launcher
from sparsek.launch.kvcache import KvcachePlan
from sparsek.masks import NO_SOFTCAP, NO_WINDOW, Mask, check_mask_args, make_mask
from sparsek.reference_varlen import (
    check_kvcache_values,
    check_varlen_values,
    reference_attention_kvcache,
    reference_attention_varlen,
)
from sparsek.routing import NEEDS_GRAD, Path, fallback, forward_path, plain_eager, route
from sparsek.validation import (
    check_attention_tensors,
    check_cache,
    check_flag,
    check_index_tensor,
    check_max_seqlen,
    check_num_splits,
    check_offsets_tensor,
    check_query_layout,
    resolve_scale,
)

__all__ = ["attention_varlen", "attention_with_kvcache"]


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = NO_SOFTCAP,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a batch of packed variable-length sequences (FlashAttention's varlen API).

    Sequence b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and key/value
    rows [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v; sequences attend only within
    themselves, and zero-length sequences are allowed. GQA/MQA as in `sparsek.attention`.
    The causal mask is bottom-right aligned per sequence: query i of a sequence with q_len
    queries and k_len keys sees key j iff j <= i + k_len - q_len. Rows that see no key, and
    rows of q past cu_seqlens_q[-1], return 0 (lse -inf).

    Args:
        q: (total_q, num_heads, head_dim), floating point (float8_e4m3fn with descales:
            `sparsek.fp8`).
        k: (total_k, num_kv_heads, head_dim), same dtype and device as q.
        v: (total_k, num_kv_heads, head_dim_v), same dtype and device as q.
        cu_seqlens_q: (batch + 1,) int32 on q's device, non-decreasing offsets into q.
        cu_seqlens_k: (batch + 1,) int32 on q's device, non-decreasing offsets into k/v.
        max_seqlen_q: Python int >= the longest query sequence.
        max_seqlen_k: Python int >= the longest key sequence.
        causal: apply the bottom-right aligned causal mask per sequence.
        softmax_scale: multiplier of q k^T; finite and > 0; 1/sqrt(head_dim) when None.
        window_size: (left, right) sliding window, aligned like causal per sequence:
            query i sees key j iff i + k_len - q_len - left <= j <= i + k_len - q_len +
            right; -1 is unbounded (`causal` sets right to 0). (-1, -1): no window.
        softcap: > 0: scores s become softcap * tanh(s / softcap) before the softmax;
            0: none.
        sinks: (num_heads,) float32 sink logits on q's device: each joins the softmax
            denominator of its head's rows (the LSE includes it for rows that see a key).
        return_lse: also return the log-sum-exp of each row.
        q_descale, k_descale, v_descale: FP8 inputs only, and required with them:
            (batch, num_kv_heads) float32 factors that dequantize sequence b's rows of q,
            k and v (`sparsek.fp8`).
        out_dtype: FP8 inputs only: torch.bfloat16 (None) or torch.float16.

    Returns:
        out: (total_q, num_heads, head_dim_v), dtype of q (FP8: `out_dtype`); and, when
        `return_lse`, lse: (num_heads, total_q) float32 (natural log; FlashAttention's
        varlen layout; FP8: of the dequantized scores).

    Raises:
        TypeError: a tensor argument is not a tensor or has the wrong kind of dtype
            (q/k/v floating point, cu_seqlens int32); a max_seqlen is not a Python int;
            `causal` or `return_lse` is not a bool; `softmax_scale` or `softcap` is not a
            real number; `window_size` is not a pair of ints; `sinks` is not a float32
            tensor; an 8-bit dtype other than float8_e4m3fn; a descale that is not a
            float32 tensor.
        ValueError: FP8 inputs without the three descales, descales of another shape
            than (batch, num_kv_heads), descales or `out_dtype` with 16-bit inputs; wrong
            rank, mismatched dtype / device / num_kv_heads / head_dim,
            num_heads not a multiple of num_kv_heads, cu_seqlens_q and cu_seqlens_k of
            different lengths (both must be batch + 1), a negative max_seqlen, a
            non-finite or non-positive `softmax_scale`, a window size below -1, a negative
            or non-finite `softcap`, or `sinks` not (num_heads,) on q's device. For CPU
            tensors also metadata values that contradict the shapes (decreasing offsets,
            offsets past the end, a max_seqlen below the longest sequence).
        UnsupportedError: `SPARSEK_STRICT=1` and no kernel serves the call: an input
            requires grad (on any device, CPU included), or a non-CPU input no kernel
            fits. CPU tensors without grad run the reference, never an error.
    """
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    check_attention_tensors(("q", "k", "v"), q, k, v, q_layouts={3: "(total_q, heads, head_dim)"})
    check_offsets_tensor("cu_seqlens_q", cu_seqlens_q, q)
    check_offsets_tensor("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(
            f"cu_seqlens_k has {cu_seqlens_k.shape[0]} entries but cu_seqlens_q has "
            f"{cu_seqlens_q.shape[0]}; both must have batch + 1"
        )
    check_max_seqlen("max_seqlen_q", max_seqlen_q)
    check_max_seqlen("max_seqlen_k", max_seqlen_k)
    scale = resolve_scale("softmax_scale", softmax_scale, q.shape[-1])
    window, cap = check_mask_args(
        window_size, softcap, sinks, num_heads=q.shape[1], device=q.device
    )
    mask = make_mask(causal, window, cap, sinks is not None)
    descales = (q_descale, k_descale, v_descale)
    batch = cu_seqlens_q.shape[0] - 1
    fp8_call = check_fp8_args(q, descales, out_dtype, batch=batch, num_kv_heads=k.shape[1])
    if fp8_call is not None:
        varlen_args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _attention_varlen_fp8(varlen_args, fp8_call, mask, scale, sinks, return_lse)

    path = forward_path(q, k, v, *(() if sinks is None else (sinks,)))
    if path is Path.AUTOGRAD:
        route(NEEDS_GRAD)
    elif path is Path.KERNELS:
        route(launcher.kernel_config(q, v, mask.spec, PACKED))
    if path is Path.AUTOGRAD:
        # The op has no autograd formula; the reference itself is differentiable.
        if q.device.type == "cpu" and not torch.compiler.is_compiling():
            check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        out, lse = reference_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            causal=mask.causal, softmax_scale=scale,
            window_size=(mask.window_left, mask.window_right), softcap=mask.softcap,
            sinks=sinks, compute_dtype=ops.compute_dtype(q),
        )  # fmt: skip
        out, lse = out.to(q.dtype), lse.to(torch.float32)
    else:
        out, lse = ops.call_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask.causal,
            scale, mask, sinks,
        )  # fmt: skip
    return (out, lse) if return_lse else out


def _attention_varlen_fp8(
    varlen_args: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int, int],
    fp8_call: Fp8Call,
    mask: Mask,
    scale: float,
    sinks: Tensor | None,
    return_lse: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """`attention_varlen` of checked FP8 inputs (`sparsek.fp8`): CPU tensors without grad
    run the op's reference of the dequantized inputs; elsewhere an FP8 kernel runs where
    one is registered, otherwise the inputs are dequantized to bfloat16 and take the
    16-bit path (a fallback: logged once, `UnsupportedError` under SPARSEK_STRICT=1)."""
    descales, out_dtype = fp8_call.descales, fp8_call.out_dtype
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = varlen_args
    path = forward_path(q, k, v, *(t for t in (sinks, *descales) if t is not None))
    if path is Path.CPU:
        out, lse = ops.call_attention_varlen(
            *varlen_args, mask.causal, scale, mask, sinks, descales, out_dtype
        )
        return (out, lse) if return_lse else out
    if path is Path.KERNELS:
        found = launcher.kernel_config(q, v, mask.spec, PACKED, out_dtype=out_dtype)
        if not isinstance(found, str):
            out, lse = ops.call_attention_varlen(
                *varlen_args, mask.causal, scale, mask, sinks, descales, out_dtype
            )
            return (out, lse) if return_lse else out
        fallback((found,), action="dequantizing the FP8 inputs to bfloat16")
    # (An input that requires grad: the 16-bit path's own fallback says so.)
    q16, k16, v16 = (
        fp8.dequantize_packed(t, descale, cu, torch.bfloat16)
        for t, descale, cu in zip(
            (q, k, v), descales, (cu_seqlens_q, cu_seqlens_k, cu_seqlens_k), strict=True
        )
    )
    result = attention_varlen(
        q16, k16, v16, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=mask.causal, softmax_scale=scale,
        window_size=(mask.window_left, mask.window_right), softcap=mask.softcap,
        sinks=sinks, return_lse=True,
    )  # fmt: skip
    return fp8.fp8_result(result, out_dtype, return_lse)


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None = None,
    *,
    cu_seqlens_q: Tensor | None = None,
    max_seqlen_q: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = NO_SOFTCAP,
    sinks: Tensor | None = None,
    num_splits: int = 0,
    return_lse: bool = False,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of new queries against a KV cache: decode and chunked prefill.

    The cache is contiguous (one row per sequence) or paged (vLLM's layout with K and V
    split: fixed-size blocks, addressed per sequence through `block_table`). The new
    queries are the last tokens of each sequence, already written into the cache:
    `cache_seqlens[b]` counts the valid cache tokens of sequence b *including* them. The
    causal mask is bottom-right aligned per sequence: query i of a sequence with q_len new
    queries sees cache positions j <= cache_seqlens[b] - q_len + i. Rows that see no key
    return 0 (lse -inf). GQA/MQA as in `sparsek.attention`.

    Query layouts: batched (batch, seqlen_q, ...) where every sequence has seqlen_q new
    queries (decode: seqlen_q = 1, or a few for speculative decoding), or packed
    (total_q, ...) with `cu_seqlens_q` and `max_seqlen_q` (chunked prefill: a different
    number of new queries per sequence).

    Args:
        q: (batch, seqlen_q, num_heads, head_dim), or packed (total_q, num_heads, head_dim)
            with `cu_seqlens_q`; floating point.
        k_cache: contiguous (batch, seqlen_cache, num_kv_heads, head_dim) when
            `block_table` is None, else paged (num_blocks, block_size, num_kv_heads,
            head_dim) with block_size a multiple of 16; same dtype and device as q, or
            float8_e4m3fn under float16/bfloat16 q (with `k_descale`, `v_descale`).
        v_cache: like `k_cache`, with head_dim_v as last dim.
        cache_seqlens: (batch,) int32 on q's device: valid cache tokens per sequence,
            new tokens included; <= seqlen_cache (contiguous) or max_blocks * block_size.
        block_table: (batch, max_blocks) int32 on q's device, or None for a contiguous
            cache. Token t of sequence b lives in block block_table[b, t // block_size] at
            offset t % block_size; entries past a sequence's last block are not read.
        cu_seqlens_q: (batch + 1,) int32 on q's device, offsets into a packed q; None for
            a 4-D q.
        max_seqlen_q: Python int >= the most new queries of a sequence; required with
            `cu_seqlens_q`, None otherwise.
        causal: apply the bottom-right aligned causal mask per sequence (the default:
            decoding is causal).
        softmax_scale: multiplier of q k^T; finite and > 0; 1/sqrt(head_dim) when None.
        window_size: (left, right) sliding window, aligned like causal per sequence:
            query i sees cache position j iff i + cache_len - q_len - left <= j <=
            i + cache_len - q_len + right; -1 is unbounded (`causal` sets right to 0).
            (-1, -1): no window.
        softcap: > 0: scores s become softcap * tanh(s / softcap) before the softmax;
            0: none.
        sinks: (num_heads,) float32 sink logits on q's device: each joins the softmax
            denominator of its head's rows (the LSE includes it for rows that see a key).
        num_splits: split-KV hint for the decode kernel: 0 chooses, 1 does not split,
            n > 1 asks for n splits. It never changes the result (recorded for the
            kernel; the reference ignores it).
        return_lse: also return the log-sum-exp of each row.
        k_descale, v_descale: float8_e4m3fn caches only, and required with them:
            (batch, num_kv_heads) float32 factors; sequence b's keys and values are the
            cache's times its row (`sparsek.fp8`). The output keeps q's dtype.

    Returns:
        out: like q with head_dim_v as last dim, dtype of q; and, when `return_lse`,
        lse: float32 (natural log), (batch, num_heads, seqlen_q) for a 4-D q or
        (num_heads, total_q) for a packed q.

    Raises:
        TypeError: a tensor argument is not a tensor or has the wrong kind of dtype
            (q/k_cache/v_cache floating point; cache_seqlens, block_table, cu_seqlens_q
            int32); `max_seqlen_q` or `num_splits` is not a Python int; a flag is not a
            bool; `softmax_scale` or `softcap` is not a real number; `window_size` is not
            a pair of ints; `sinks` is not a float32 tensor; a cache of an 8-bit type
            other than float8_e4m3fn; a descale that is not a float32 tensor.
        ValueError: an FP8 cache without both descales, descales of another shape than
            (batch, num_kv_heads), or descales with a 16-bit cache;
            wrong rank; q's layout does not match the presence of `cu_seqlens_q`
            / `max_seqlen_q`; mismatched batch (cache_seqlens, q, k_cache, block_table,
            cu_seqlens_q) / dtype / device / num_kv_heads / head_dim; num_heads not a
            multiple of num_kv_heads; a paged block_size that is not a multiple of 16; a
            negative `max_seqlen_q` or `num_splits`; a non-finite or non-positive
            `softmax_scale`; a window size below -1, a negative or non-finite `softcap`,
            or `sinks` not (num_heads,) on q's device. For CPU tensors also metadata
            values that contradict the shapes (cache_seqlens beyond the cache, block_table
            entries out of range).
        UnsupportedError: `SPARSEK_STRICT=1` and no kernel serves the call: an input
            requires grad (on any device, CPU included), or a non-CPU input no kernel
            fits. CPU tensors without grad run the reference, never an error.
    """
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    check_attention_tensors(
        ("q", "k_cache", "v_cache"),
        q,
        k_cache,
        v_cache,
        q_layouts={
            4: "(batch, seqlen_q, heads, head_dim)",
            3: "(total_q, heads, head_dim) with cu_seqlens_q",
        },
    )
    check_index_tensor("cache_seqlens", cache_seqlens, q, "(batch,)", 1)
    batch = cache_seqlens.shape[0]
    check_query_layout(q, cu_seqlens_q, max_seqlen_q, batch)
    check_cache(k_cache, block_table, q, batch)
    check_num_splits(num_splits)
    scale = resolve_scale("softmax_scale", softmax_scale, q.shape[-1])
    window, cap = check_mask_args(
        window_size, softcap, sinks, num_heads=q.shape[-2], device=q.device
    )
    mask = make_mask(causal, window, cap, sinks is not None)
    cache_descales = check_fp8_cache_args(
        q, k_cache, (k_descale, v_descale), batch=batch, num_kv_heads=k_cache.shape[2]
    )
    if cache_descales is not None:
        return _attention_with_fp8_cache(
            (q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q),
            cache_descales, mask, scale, sinks, num_splits, return_lse,
        )  # fmt: skip

    kv_args = (q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q)
    path = forward_path(q, k_cache, v_cache, *(() if sinks is None else (sinks,)))
    plan: KvcachePlan | str | None = None
    if path is Path.AUTOGRAD:
        route(NEEDS_GRAD)
    elif path is Path.KERNELS and q.is_cuda and plain_eager(*(t for t in kv_args if t is not None)):
        # Plain eager mode on CUDA: the request's launch plan (memoized per shape) both
        # answers whether a kernel serves it and runs it, past the dispatcher (see
        # `ops.call_attention`: that round trip is pure host overhead here).
        plan = kvcache.kvcache_plan(*kv_args, max_seqlen_q, mask, num_splits)
        route(plan)
    elif path is Path.KERNELS:
        layout = kvcache.request_layout(k_cache, block_table, cu_seqlens_q)
        route(launcher.kernel_config(q, v_cache, mask.spec, layout))
    if path is Path.AUTOGRAD:
        if q.device.type == "cpu" and not torch.compiler.is_compiling():
            check_kvcache_values(q, k_cache, cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q)
        out, lse = reference_attention_kvcache(
            q, k_cache, v_cache, cache_seqlens, block_table,
            cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, causal=mask.causal,
            softmax_scale=scale, window_size=(mask.window_left, mask.window_right),
            softcap=mask.softcap, sinks=sinks, compute_dtype=ops.compute_dtype(q),
        )  # fmt: skip
        out, lse = out.to(q.dtype), lse.to(torch.float32)
    else:
        extra = (mask.window_left, mask.window_right, mask.op_softcap, sinks)
        op_args = (*kv_args, max_seqlen_q, mask.causal, scale, num_splits, *extra)
        if isinstance(plan, KvcachePlan):
            out, lse = ops.attention_with_kvcache_cuda(*op_args, plan=plan)
        else:
            out, lse = torch.ops.sparsek.attention_with_kvcache(*op_args)
    return (out, lse) if return_lse else out


def _attention_with_fp8_cache(
    cache_args: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, int | None],
    descales: tuple[Tensor, Tensor],
    mask: Mask,
    scale: float,
    sinks: Tensor | None,
    num_splits: int,
    return_lse: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """`attention_with_kvcache` over checked float8_e4m3fn caches (`sparsek.fp8`): CPU
    tensors without grad run the op's reference of the dequantized cache. Elsewhere the
    kernels that convert the cache serve the request (`sparsek.launch.kvcache`); those
    they cannot serve (a head dim without FP8-cache kernels, strides TMA cannot read) run
    on the batch's blocks dequantized to q's dtype (`fp8.dequantize_cache`) on the 16-bit
    path (a fallback: logged once, `UnsupportedError` under SPARSEK_STRICT=1)."""
    q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q = cache_args
    path = forward_path(q, k_cache, v_cache, *(t for t in (sinks, *descales) if t is not None))
    extra = (mask.window_left, mask.window_right, mask.op_softcap, sinks, *descales)
    if path is Path.CPU:
        cpu_result: tuple[Tensor, Tensor] = torch.ops.sparsek.attention_with_kvcache(
            *cache_args, mask.causal, scale, num_splits, *extra
        )
        return cpu_result if return_lse else cpu_result[0]
    if path is Path.KERNELS:
        tensors = (t for t in cache_args[:6] if isinstance(t, Tensor))
        if not plain_eager(*tensors):  # (tracing: the op decides)
            traced: tuple[Tensor, Tensor] = torch.ops.sparsek.attention_with_kvcache(
                *cache_args, mask.causal, scale, num_splits, *extra
            )
            return traced if return_lse else traced[0]
        plan = kvcache.kvcache_plan(*cache_args, mask, num_splits)
        if isinstance(plan, KvcachePlan):
            op_args = (*cache_args, mask.causal, scale, num_splits, *extra)
            out, lse = ops.attention_with_kvcache_cuda(*op_args, plan=plan)
            return (out, lse) if return_lse else out
        fallback((plan,), action=f"dequantizing the FP8 KV cache to {q.dtype}")
    # (An input that requires grad: the 16-bit path's own fallback says so.)
    k16, v16 = (
        fp8.dequantize_cache(cache, descale, block_table, cache_seqlens, q.dtype)
        for cache, descale in zip((k_cache, v_cache), descales, strict=True)
    )
    table = None if block_table is None else fp8.compact_block_table(block_table)
    return attention_with_kvcache(
        q, k16, v16, cache_seqlens, table, cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max_seqlen_q, causal=mask.causal, softmax_scale=scale,
        window_size=(mask.window_left, mask.window_right), softcap=mask.softcap,
        sinks=sinks, num_splits=num_splits, return_lse=return_lse,
    )  # fmt: skip
