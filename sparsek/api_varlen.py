"""Public entry points for variable-length batches and KV-cache attention.

    out = sparsek.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
    out = sparsek.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table)

On CUDA both run the sm90 kernels through the `sparsek::attention_varlen` and
`sparsek::attention_with_kvcache` ops. CPU tensors take the documented torch reference
(`sparsek.reference_varlen`); anything else no kernel serves (another device, inputs that
require grad, head_dim_v != head_dim, an unregistered head_dim or dtype) also runs the
reference: correct but slow, logged once per reason through `sparsek.api`'s fallback
logging, and an `UnsupportedError` under `SPARSEK_STRICT=1`.

Validation reads shapes, dtypes and devices only, never tensor values (no host sync): the
values of `cu_seqlens_*`, `cache_seqlens` and `block_table` are the caller's contract (the
ops check them for CPU tensors, where that is cheap). `max_seqlen_*` are Python ints so that
neither eager calls nor torch.compile need to read them from a device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsek import ops_kvcache_cuda, ops_varlen
from sparsek.api import (
    _check_flag,
    _fallback,
    _needs_grad,
    _resolve_scale,
    check_float_tensors,
    check_head_ratio,
    check_kv_matches_q,
    check_strided,
    plain_eager,
)
from sparsek.ops_kvcache_cuda import KvcachePlan
from sparsek.ops_varlen_cuda import kernel_config
from sparsek.reference_varlen import (
    check_kvcache_values,
    check_varlen_values,
    reference_attention_kvcache,
    reference_attention_varlen,
)
from sparsek.registry import PACKED

__all__ = ["attention_varlen", "attention_with_kvcache"]

NEEDS_GRAD = "backward is not implemented (an input requires grad)"

# Paged caches: the kernels' K/V tiles are 16-token multiples (one MMA K-step of fp16/bf16).
_BLOCK_SIZE_MULTIPLE = 16


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
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a batch of packed variable-length sequences (FlashAttention's varlen API).

    Sequence b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and key/value
    rows [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v; sequences attend only within
    themselves, and zero-length sequences are allowed. GQA/MQA as in `sparsek.attention`.
    The causal mask is bottom-right aligned per sequence: query i of a sequence with q_len
    queries and k_len keys sees key j iff j <= i + k_len - q_len. Rows that see no key, and
    rows of q past cu_seqlens_q[-1], return 0 (lse -inf).

    Args:
        q: (total_q, num_heads, head_dim), floating point.
        k: (total_k, num_kv_heads, head_dim), same dtype and device as q.
        v: (total_k, num_kv_heads, head_dim_v), same dtype and device as q.
        cu_seqlens_q: (batch + 1,) int32 on q's device, non-decreasing offsets into q.
        cu_seqlens_k: (batch + 1,) int32 on q's device, non-decreasing offsets into k/v.
        max_seqlen_q: Python int >= the longest query sequence.
        max_seqlen_k: Python int >= the longest key sequence.
        causal: apply the bottom-right aligned causal mask per sequence.
        softmax_scale: multiplier of q k^T; finite and > 0; 1/sqrt(head_dim) when None.
        return_lse: also return the log-sum-exp of each row.

    Returns:
        out: (total_q, num_heads, head_dim_v), dtype of q; and, when `return_lse`,
        lse: (num_heads, total_q) float32 (natural log; FlashAttention's varlen layout).

    Raises:
        TypeError: a tensor argument is not a tensor or has the wrong kind of dtype
            (q/k/v floating point, cu_seqlens int32); a max_seqlen is not a Python int;
            `causal` or `return_lse` is not a bool; `softmax_scale` is not a real number.
        ValueError: wrong rank, mismatched dtype / device / num_kv_heads / head_dim,
            num_heads not a multiple of num_kv_heads, cu_seqlens_q and cu_seqlens_k of
            different lengths (both must be batch + 1), a negative max_seqlen, or a
            non-finite or non-positive `softmax_scale`. For CPU tensors also metadata values
            that contradict the shapes (decreasing offsets, offsets past the end, a
            max_seqlen below the longest sequence).
        UnsupportedError: `SPARSEK_STRICT=1` and no kernel serves a non-CPU input.
    """
    _check_flag("causal", causal)
    _check_flag("return_lse", return_lse)
    _check_attention_tensors(("q", "k", "v"), q, k, v, q_layouts={3: "(total_q, heads, head_dim)"})
    _check_offsets_tensor("cu_seqlens_q", cu_seqlens_q, q)
    _check_offsets_tensor("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(
            f"cu_seqlens_k has {cu_seqlens_k.shape[0]} entries but cu_seqlens_q has "
            f"{cu_seqlens_q.shape[0]}; both must have batch + 1"
        )
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    scale = _resolve_scale("softmax_scale", softmax_scale, q.shape[-1])

    needs_grad = _needs_grad(q, k, v)
    if q.device.type != "cpu":
        _route(NEEDS_GRAD if needs_grad else kernel_config(q, v, causal, PACKED))
    if needs_grad:
        # The op has no autograd formula; the reference itself is differentiable.
        if q.device.type == "cpu" and not torch.compiler.is_compiling():
            check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        out, lse = reference_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            causal=causal, softmax_scale=scale, compute_dtype=_compute_dtype(q),
        )  # fmt: skip
        out, lse = out.to(q.dtype), lse.to(torch.float32)
    else:
        # In plain eager mode on CUDA the op's CUDA kernel is called directly (see
        # `sparsek.api._run_op`: the dispatcher round trip is pure host overhead there).
        varlen_op = (
            ops_varlen._attention_varlen_cuda
            if q.is_cuda and plain_eager(q, k, v, cu_seqlens_q, cu_seqlens_k)
            else torch.ops.sparsek.attention_varlen
        )
        out, lse = varlen_op(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
        )
    return (out, lse) if return_lse else out


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
    num_splits: int = 0,
    return_lse: bool = False,
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
            head_dim) with block_size a multiple of 16; same dtype and device as q.
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
        num_splits: split-KV hint for the decode kernel: 0 chooses, 1 does not split,
            n > 1 asks for n splits. It never changes the result (recorded for the
            kernel; the reference ignores it).
        return_lse: also return the log-sum-exp of each row.

    Returns:
        out: like q with head_dim_v as last dim, dtype of q; and, when `return_lse`,
        lse: float32 (natural log), (batch, num_heads, seqlen_q) for a 4-D q or
        (num_heads, total_q) for a packed q.

    Raises:
        TypeError: a tensor argument is not a tensor or has the wrong kind of dtype
            (q/k_cache/v_cache floating point; cache_seqlens, block_table, cu_seqlens_q
            int32); `max_seqlen_q` or `num_splits` is not a Python int; a flag is not a
            bool; `softmax_scale` is not a real number.
        ValueError: wrong rank; q's layout does not match the presence of `cu_seqlens_q`
            / `max_seqlen_q`; mismatched batch (cache_seqlens, q, k_cache, block_table,
            cu_seqlens_q) / dtype / device / num_kv_heads / head_dim; num_heads not a
            multiple of num_kv_heads; a paged block_size that is not a multiple of 16; a
            negative `max_seqlen_q` or `num_splits`; a non-finite or non-positive
            `softmax_scale`. For CPU tensors also metadata values that contradict the
            shapes (cache_seqlens beyond the cache, block_table entries out of range).
        UnsupportedError: `SPARSEK_STRICT=1` and no kernel serves a non-CPU input.
    """
    _check_flag("causal", causal)
    _check_flag("return_lse", return_lse)
    _check_attention_tensors(
        ("q", "k_cache", "v_cache"),
        q,
        k_cache,
        v_cache,
        q_layouts={
            4: "(batch, seqlen_q, heads, head_dim)",
            3: "(total_q, heads, head_dim) with cu_seqlens_q",
        },
    )
    _check_index_tensor("cache_seqlens", cache_seqlens, q, "(batch,)", 1)
    batch = cache_seqlens.shape[0]
    _check_query_layout(q, cu_seqlens_q, max_seqlen_q, batch)
    _check_cache(k_cache, block_table, q, batch)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(
            "num_splits must be an int >= 0 (0: auto, 1: no split), "
            f"got {type(num_splits).__name__}"
        )
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: auto, 1: no split), got {num_splits}")
    scale = _resolve_scale("softmax_scale", softmax_scale, q.shape[-1])

    kv_args = (q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q)
    needs_grad = _needs_grad(q, k_cache, v_cache)
    plan: KvcachePlan | str | None = None
    if needs_grad:
        _route(NEEDS_GRAD)
    elif q.is_cuda and plain_eager(*(t for t in kv_args if t is not None)):
        # Plain eager mode on CUDA: the request's launch plan (memoized per shape) both
        # answers whether a kernel serves it and runs it, past the dispatcher (see
        # `sparsek.api._run_op`: that round trip is pure host overhead here).
        plan = ops_kvcache_cuda.kvcache_plan(*kv_args, max_seqlen_q, causal, num_splits)
        _route(plan)
    elif q.device.type != "cpu":
        _route(kernel_config(q, v_cache, causal, ops_varlen.kvcache_variant(kv_args)))
    if needs_grad:
        if q.device.type == "cpu" and not torch.compiler.is_compiling():
            check_kvcache_values(q, k_cache, cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q)
        out, lse = reference_attention_kvcache(
            q, k_cache, v_cache, cache_seqlens, block_table,
            cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, causal=causal,
            softmax_scale=scale, compute_dtype=_compute_dtype(q),
        )  # fmt: skip
        out, lse = out.to(q.dtype), lse.to(torch.float32)
    else:
        op_args = (*kv_args, max_seqlen_q, causal, scale, num_splits)
        if isinstance(plan, KvcachePlan):
            out, lse = ops_kvcache_cuda.attention_with_kvcache(*op_args, plan)
        else:
            out, lse = torch.ops.sparsek.attention_with_kvcache(*op_args)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------- validation


def _check_attention_tensors(
    names: tuple[str, str, str],
    q: object,
    k: object,
    v: object,
    *,
    q_layouts: dict[int, str],
) -> None:
    """q: one of `q_layouts`' ranks; k/v: the same rank as q (varlen) or 4-D (caches)."""
    q_name, k_name, v_name = names
    check_float_tensors(names, (q, k, v), "")
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    if q.dim() not in q_layouts:
        layouts = " or ".join(f"{rank}-D {text}" for rank, text in q_layouts.items())
        raise ValueError(f"{q_name} must be {layouts}, got shape {tuple(q.shape)}")
    kv_rank = 4 if len(q_layouts) > 1 else q.dim()
    kv_layout = "(total_k, kv_heads, head_dim)" if kv_rank == 3 else (
        "(batch, seqlen_cache, kv_heads, head_dim) or (num_blocks, block_size, kv_heads, head_dim)"
    )  # fmt: skip
    for name, t in ((k_name, k), (v_name, v)):
        if t.dim() != kv_rank:
            raise ValueError(f"{name} must be {kv_rank}-D {kv_layout}, got shape {tuple(t.shape)}")
    check_kv_matches_q(names, q, k, v)
    check_head_ratio(names, q.shape[-2], k.shape[-2])


def _check_index_tensor(name: str, t: object, q: Tensor, layout: str, rank: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_strided(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: torch.int32")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name}.device={t.device} must equal q.device={q.device}")


def _check_offsets_tensor(name: str, t: object, q: Tensor) -> None:
    _check_index_tensor(name, t, q, "(batch + 1,)", 1)
    assert isinstance(t, Tensor)
    if t.shape[0] == 0:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries, got 0")


def _check_max_seqlen(name: str, value: object) -> None:
    # torch.SymInt: a Python int that torch.compile chose to trace symbolically.
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(
            f"{name} must be a Python int >= 0 (not a tensor: reading it would synchronize), "
            f"got {type(value).__name__}"
        )
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_query_layout(q: Tensor, cu_seqlens_q: object, max_seqlen_q: object, batch: int) -> None:
    if cu_seqlens_q is None:
        if q.dim() != 4:
            raise ValueError(
                f"q has shape {tuple(q.shape)} (packed, 3-D) but cu_seqlens_q is None; pass "
                "cu_seqlens_q and max_seqlen_q, or q as 4-D (batch, seqlen_q, heads, head_dim)"
            )
        if max_seqlen_q is not None:
            raise ValueError(
                "max_seqlen_q is only used with cu_seqlens_q (packed q); pass None for a 4-D q"
            )
        if q.shape[0] != batch:
            raise ValueError(
                f"q batch size {q.shape[0]} must equal batch={batch} (entries of cache_seqlens)"
            )
        return
    _check_offsets_tensor("cu_seqlens_q", cu_seqlens_q, q)
    assert isinstance(cu_seqlens_q, Tensor)
    if q.dim() != 3:
        raise ValueError(
            f"q has shape {tuple(q.shape)} but cu_seqlens_q is given; packed queries must be "
            "3-D (total_q, heads, head_dim)"
        )
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries; it must have batch + 1 = "
            f"{batch + 1} (batch={batch} from cache_seqlens)"
        )
    if max_seqlen_q is None:
        raise ValueError("max_seqlen_q is required with cu_seqlens_q (a Python int >= 0)")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)


def _check_cache(k_cache: Tensor, block_table: object, q: Tensor, batch: int) -> None:
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"k_cache batch size {k_cache.shape[0]} must equal batch={batch} (entries of "
                "cache_seqlens); a paged cache needs block_table"
            )
        return
    _check_index_tensor("block_table", block_table, q, "(batch, max_blocks)", 2)
    assert isinstance(block_table, Tensor)
    if block_table.shape[0] != batch:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows; it must have batch={batch} "
            "(entries of cache_seqlens)"
        )
    block_size = k_cache.shape[1]
    if block_size == 0 or block_size % _BLOCK_SIZE_MULTIPLE != 0:
        raise ValueError(
            f"block_size={block_size} (k_cache.shape[1]) is not supported for paged caches "
            f"(supported: positive multiples of {_BLOCK_SIZE_MULTIPLE})"
        )


# ---------------------------------------------------------------------------- dispatch


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _route(found: object) -> None:
    """`found`: what serves a non-CPU request (a kernel config or launch plan), or why
    nothing does. Then the reference runs: log the reason once, or raise when strict."""
    if isinstance(found, str):
        _fallback((found,), action="slow path (torch reference)")
