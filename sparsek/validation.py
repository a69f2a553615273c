"""Every argument check of the public entry points, by public name (the integrations
use them too).

Checks read Python values, shapes, dtypes, strides and devices, never tensor values (no
host synchronization): the values of `cu_seqlens_*`, `cache_seqlens` and `block_table`
are the caller's contract (the ops check them for CPU tensors, where that is cheap; see
`sparsek.reference_varlen`, whose messages list bad values through `bad_entries`). Each
check raises `TypeError` (wrong kind of argument) or `ValueError` (wrong value or shape)
with a message that names the argument and says what is supported.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Paged caches: the kernels' K/V tiles are 16-token multiples (one MMA K-step of fp16/bf16).
BLOCK_SIZE_MULTIPLE = 16

# A message about bad tensor values names this many of them and counts the rest, so it
# stays one line long whatever the tensor's size (10k bad entries once made 59 KB).
SHOWN_ENTRIES = 3


def check_flag(name: str, value: object) -> None:
    """`value` is a bool (TypeError naming `name` otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def resolve_scale(name: str, scale: object, head_dim: int) -> float:
    """The softmax scale: `scale` (a finite real > 0) or 1/sqrt(head_dim) when None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a float (finite, > 0) or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {scale}")
    return float(scale)


def bad_entries(
    name: str, values: Tensor, bad: Tensor, of: int | None = None, counted: str = "entries"
) -> str:
    """The entries of `values` where `bad` holds, for an error message: the first
    `SHOWN_ENTRIES` with their indices, then how many there are, e.g.
    "cache_seqlens[3]=5000, [17]=6000, [20]=-1, ... (1234 of 10000 entries)".

    Args:
        name: the argument's name.
        values: the tensor (read on the host: for tensors whose values may be read).
        bad: bool, `values`' shape.
        of: the total the count is out of; values.numel() when None.
        counted: what the total counts ("entries in use", ...).
    """
    index = bad.nonzero()
    shown = [
        f"[{', '.join(str(i) for i in at)}]={values[tuple(at)].item()}"
        for at in index[:SHOWN_ENTRIES].tolist()
    ]
    more = ", ..." if index.shape[0] > SHOWN_ENTRIES else ""
    total = values.numel() if of is None else of
    return f"{name}{', '.join(shown)}{more} ({index.shape[0]} of {total} {counted})"


def check_strided(name: str, t: Tensor) -> None:
    """`t` is a dense (strided, not nested) tensor: TypeError naming `name` otherwise."""
    if t.is_nested:
        raise TypeError(
            f"{name} is a nested tensor; supported: dense tensors (layout torch.strided); "
            "sequences of different lengths: sparsek.attention_varlen"
        )
    if t.layout is not torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; supported: torch.strided (dense)")


def check_float_tensors(names: tuple[str, ...], tensors: tuple[object, ...], hint: str) -> None:
    """Each of `tensors` is a dense floating-point torch.Tensor (TypeError naming it
    otherwise)."""
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_strided(name, t)
        if not t.dtype.is_floating_point:
            raise TypeError(
                f"{name} has dtype {t.dtype}; supported: floating point {hint}".rstrip()
            )


# A KV cache may hold float8_e4m3fn K/V for float16 / bfloat16 queries (`sparsek.fp8`).
FP8_CACHE_DTYPE = torch.float8_e4m3fn
FP8_CACHE_QUERY_DTYPES = (torch.float16, torch.bfloat16)


def check_kv_matches_q(
    names: tuple[str, str, str], q: Tensor, k: Tensor, v: Tensor, fp8_kv: bool = False
) -> None:
    """Rules every attention entry point shares, whatever the layout (heads on dim -2 of
    k after any batch/sequence dims; K and V alike but for the last dim). `fp8_kv`: K and
    V may both be float8_e4m3fn under float16 / bfloat16 queries (KV caches).

    Raises:
        ValueError: k/v dtype or device differ from q's, v's shape differs from k's but for
            the last dim, head_dim differs or is 0, or q's heads are no multiple of k's.
    """
    q_name, k_name, v_name = names
    fp8_pair = (
        fp8_kv and k.dtype == v.dtype == FP8_CACHE_DTYPE and q.dtype in FP8_CACHE_QUERY_DTYPES
    )
    for name, t in ((k_name, k), (v_name, v)):
        if t.dtype != q.dtype and not fp8_pair:
            also = (
                f" (or both {k_name} and {v_name} float8_e4m3fn under float16/bfloat16 {q_name})"
                if fp8_kv
                else ""
            )
            raise ValueError(f"{name}.dtype={t.dtype} must equal {q_name}.dtype={q.dtype}{also}")
        if t.device != q.device:
            raise ValueError(f"{name}.device={t.device} must equal {q_name}.device={q.device}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"{v_name} shape {tuple(v.shape)} must match {k_name} shape {tuple(k.shape)} "
            "except for the last dim"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{k_name} head_dim={k.shape[-1]} must equal {q_name} head_dim={q.shape[-1]}"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"{q_name} head_dim must be >= 1, got 0")


def check_head_ratio(names: tuple[str, str, str], num_heads: int, num_kv_heads: int) -> None:
    """num_heads must be a positive multiple of num_kv_heads (GQA/MQA)."""
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads={num_heads} of {names[0]} must be a multiple of "
            f"num_kv_heads={num_kv_heads} of {names[1]}"
        )


def check_qkv(
    names: tuple[str, str, str],
    q: object,
    k: object,
    v: object,
    *,
    layout: str,
    head_axis: int,
) -> None:
    """Validate three attention tensors; `head_axis` is 2 for BSHD and 1 for BHSD."""
    q_name, k_name, v_name = names
    check_float_tensors(names, (q, k, v), "(kernels: float16, bfloat16; others fall back)")
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    for name, t in zip(names, (q, k, v), strict=True):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    for name, t in ((k_name, k), (v_name, v)):
        if t.shape[0] != q.shape[0]:
            raise ValueError(
                f"{name} batch size {t.shape[0]} must equal {q_name} batch size {q.shape[0]}"
            )
    num_heads, num_kv_heads = q.shape[head_axis], k.shape[head_axis]
    check_kv_matches_q(names, q, k, v)
    check_head_ratio(names, num_heads, num_kv_heads)


def check_attention_tensors(
    names: tuple[str, str, str],
    q: object,
    k: object,
    v: object,
    *,
    q_layouts: dict[int, str],
) -> None:
    """q: one of `q_layouts`' ranks; k/v: the same rank as q (varlen) or 4-D (caches,
    which may hold float8_e4m3fn K/V under 16-bit queries)."""
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
    check_kv_matches_q(names, q, k, v, fp8_kv=len(q_layouts) > 1)
    check_head_ratio(names, q.shape[-2], k.shape[-2])


def check_index_tensor(name: str, t: object, q: Tensor, layout: str, rank: int) -> None:
    """`t` is a dense int32 tensor of `rank` dims on q's device (`layout` names its dims)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_strided(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: torch.int32")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name}.device={t.device} must equal q.device={q.device}")


def check_offsets_tensor(name: str, t: object, q: Tensor) -> None:
    """`t` is a (batch + 1,) int32 offsets tensor on q's device, batch + 1 >= 1."""
    check_index_tensor(name, t, q, "(batch + 1,)", 1)
    assert isinstance(t, Tensor)
    if t.shape[0] == 0:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries, got 0")


def check_max_seqlen(name: str, value: object) -> None:
    """`value` is a Python int (or a torch.SymInt) >= 0, never a tensor."""
    # torch.SymInt: a Python int that torch.compile chose to trace symbolically.
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(
            f"{name} must be a Python int >= 0 (not a tensor: reading it would synchronize), "
            f"got {type(value).__name__}"
        )
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_query_layout(q: Tensor, cu_seqlens_q: object, max_seqlen_q: object, batch: int) -> None:
    """A KV-cache request's q: 4-D batched without `cu_seqlens_q` / `max_seqlen_q`, or
    3-D packed with both, `batch` sequences either way."""
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
    check_offsets_tensor("cu_seqlens_q", cu_seqlens_q, q)
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
    check_max_seqlen("max_seqlen_q", max_seqlen_q)


def check_cache(k_cache: Tensor, block_table: object, q: Tensor, batch: int) -> None:
    """A contiguous cache of `batch` rows, or a paged one with a (batch, max_blocks)
    int32 `block_table` and a block size that is a multiple of 16."""
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"k_cache batch size {k_cache.shape[0]} must equal batch={batch} (entries of "
                "cache_seqlens); a paged cache needs block_table"
            )
        return
    check_index_tensor("block_table", block_table, q, "(batch, max_blocks)", 2)
    assert isinstance(block_table, Tensor)
    if block_table.shape[0] != batch:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows; it must have batch={batch} "
            "(entries of cache_seqlens)"
        )
    block_size = k_cache.shape[1]
    if block_size == 0 or block_size % BLOCK_SIZE_MULTIPLE != 0:
        raise ValueError(
            f"block_size={block_size} (k_cache.shape[1]) is not supported for paged caches "
            f"(supported: positive multiples of {BLOCK_SIZE_MULTIPLE})"
        )


def check_num_splits(num_splits: object) -> None:
    """`num_splits` is an int >= 0 (0: choose, 1: no split, n > 1: n splits)."""
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(
            "num_splits must be an int >= 0 (0: auto, 1: no split), "
            f"got {type(num_splits).__name__}"
        )
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: auto, 1: no split), got {num_splits}")
