"""FP8 (E4M3) inputs: their descale factors, the output type, and dequantization.

FP8 attention takes FlashAttention-3's convention. q, k and v hold `torch.float8_e4m3fn`
values x that stand for x * descale, with one float32 factor per (sequence, KV head):
`q_descale`, `k_descale` and `v_descale` of shape (batch, num_kv_heads). Query head h
takes the factor of its KV head, h // (num_heads // num_kv_heads). A per-tensor scale
passes as a stride-0 view, e.g. `scale.reshape(1, 1).expand(batch, num_kv_heads)`. The
result is the attention of the dequantized inputs,

    out = softmax(softmax_scale * (q * q_descale) (k * k_descale)^T) (v * v_descale),

in `out_dtype` (bfloat16 unless torch.float16 is asked for). The LSE is that of the
dequantized scores (float32, natural log), the same quantity as for 16-bit inputs, masks
included. All three descales are required with FP8 inputs, and none may be given
without them. Other float8 formats (e5m2, the "fnuz" variants) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsek.validation import check_strided

FP8_DTYPE = torch.float8_e4m3fn
DESCALE_NAMES = ("q_descale", "k_descale", "v_descale")
OUT_DTYPES = (torch.bfloat16, torch.float16)
DEFAULT_OUT_DTYPE = torch.bfloat16
# Every 8-bit float type this torch defines; only FP8_DTYPE is served.
FLOAT8_DTYPES = frozenset(
    getattr(torch, name)
    for name in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(torch, name)
)


def is_fp8(dtype: torch.dtype) -> bool:
    """`dtype` is the FP8 type the entry points take (float8_e4m3fn)."""
    return dtype == FP8_DTYPE


@dataclass(frozen=True)
class Fp8Call:
    """The checked FP8 arguments of one call.

    Attributes:
        descales: (q_descale, k_descale, v_descale), each (batch, num_kv_heads) float32.
        out_dtype: the output's dtype (bfloat16 or float16).
    """

    descales: tuple[Tensor, Tensor, Tensor]
    out_dtype: torch.dtype


def check_fp8_args(
    q: Tensor,
    descales: tuple[object, object, object],
    out_dtype: object,
    *,
    batch: int,
    num_kv_heads: int,
) -> Fp8Call | None:
    """Check the FP8 arguments of a call whose q, k, v passed the tensor checks.

    Args:
        q: the query tensor (its dtype decides whether the call is FP8).
        descales: (q_descale, k_descale, v_descale) as passed.
        out_dtype: as passed (None, or a torch dtype).
        batch: sequences of the call (the descales' first dim).
        num_kv_heads: K/V heads of the call (the descales' second dim).

    Returns:
        An FP8 call's descales and output dtype (`out_dtype`, or bfloat16 when None);
        None for a 16-bit call (which returns q's dtype).

    Raises:
        TypeError: q of an 8-bit float type other than float8_e4m3fn, a descale that is
            not a float32 tensor, or an `out_dtype` that is not a torch.dtype.
        ValueError: FP8 inputs without all three descales, a descale of another shape
            than (batch, num_kv_heads) or on another device than q, an `out_dtype` other
            than bfloat16/float16; descales, or an `out_dtype` other than q's, with
            16-bit inputs.
    """
    if q.dtype in FLOAT8_DTYPES and not is_fp8(q.dtype):
        raise TypeError(
            f"q has dtype {q.dtype}; the supported 8-bit type is torch.float8_e4m3fn "
            "(with q_descale, k_descale, v_descale)"
        )
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype or None, got {type(out_dtype).__name__}")
    if not is_fp8(q.dtype):
        refuse_descales(DESCALE_NAMES, descales, "inputs", f"q.dtype={q.dtype}")
        if out_dtype is not None and out_dtype != q.dtype:
            raise ValueError(
                f"out_dtype={out_dtype} applies to float8_e4m3fn inputs only; the output "
                f"of q.dtype={q.dtype} inputs is q.dtype (pass out_dtype=None)"
            )
        return None
    checked = check_descales(DESCALE_NAMES, descales, q.device, batch, num_kv_heads, "inputs")
    out_dtype = output_dtype(q.dtype, out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(
            f"out_dtype={out_dtype} is not supported for float8_e4m3fn inputs (supported: "
            "torch.bfloat16, torch.float16)"
        )
    return Fp8Call((checked[0], checked[1], checked[2]), out_dtype)


def refuse_descales(
    names: tuple[str, ...], descales: tuple[object, ...], what: str, found: str
) -> None:
    """ValueError naming the first of `descales` given (not None) for 16-bit `what`
    (`found`: the dtype that makes them 16-bit, e.g. "q.dtype=torch.bfloat16")."""
    for name, descale in zip(names, descales, strict=True):
        if descale is not None:
            raise ValueError(
                f"{name} applies to float8_e4m3fn {what} only; {found} takes {name}=None"
            )


def check_descales(
    names: tuple[str, ...],
    descales: tuple[object, ...],
    device: torch.device,
    batch: int,
    num_kv_heads: int,
    what: str,
) -> list[Tensor]:
    """Each of `descales` (named `names`) is a float32 (batch, num_kv_heads) tensor on
    `device`; `what` names the FP8 tensors they belong to in the message of a missing one.

    Raises:
        TypeError: a descale that is not a float32 tensor.
        ValueError: a missing descale, or one of another shape or device.
    """
    expected = (batch, num_kv_heads)
    checked: list[Tensor] = []
    for name, descale in zip(names, descales, strict=True):
        if descale is None:
            raise ValueError(
                f"{name} is required with float8_e4m3fn {what}: a float32 tensor of shape "
                f"(batch, num_kv_heads) = {expected} (a stride-0 expanded view for one "
                "per-tensor scale)"
            )
        if not isinstance(descale, Tensor):
            raise TypeError(
                f"{name} must be a float32 tensor (batch, num_kv_heads), got "
                f"{type(descale).__name__}"
            )
        check_strided(name, descale)
        if descale.dtype != torch.float32:
            raise TypeError(f"{name} has dtype {descale.dtype}; supported: torch.float32")
        if tuple(descale.shape) != expected:
            raise ValueError(
                f"{name} has shape {tuple(descale.shape)}; it must be (batch, num_kv_heads) "
                f"= {expected}"
            )
        if descale.device != device:
            raise ValueError(f"{name}.device={descale.device} must equal q.device={device}")
        checked.append(descale)
    return checked


CACHE_DESCALE_NAMES = ("k_descale", "v_descale")


def check_fp8_cache_args(
    q: Tensor,
    k_cache: Tensor,
    descales: tuple[object, object],
    *,
    batch: int,
    num_kv_heads: int,
) -> tuple[Tensor, Tensor] | None:
    """Check the FP8 arguments of a KV-cache call whose tensors passed their checks (a
    float8_e4m3fn cache holds K and V of float16 / bfloat16 queries).

    Returns:
        (k_descale, v_descale) for an FP8 cache; None for a 16-bit one.

    Raises:
        TypeError: an FP8 q (the KV-cache call takes float16 / bfloat16 queries), a cache
            of an 8-bit float type other than float8_e4m3fn, a descale that is not a
            float32 tensor.
        ValueError: an FP8 cache without both descales, descales of another shape than
            (batch, num_kv_heads) or on another device; descales with a 16-bit cache.
    """
    if q.dtype in FLOAT8_DTYPES:
        raise TypeError(
            f"q has dtype {q.dtype}; attention_with_kvcache takes float16 or bfloat16 "
            "queries (over float8_e4m3fn caches too, with k_descale and v_descale)"
        )
    if k_cache.dtype in FLOAT8_DTYPES and not is_fp8(k_cache.dtype):
        raise TypeError(
            f"k_cache has dtype {k_cache.dtype}; the supported 8-bit cache type is "
            "torch.float8_e4m3fn (with k_descale, v_descale)"
        )
    if not is_fp8(k_cache.dtype):
        refuse_descales(CACHE_DESCALE_NAMES, descales, "caches", f"k_cache.dtype={k_cache.dtype}")
        return None
    checked = check_descales(CACHE_DESCALE_NAMES, descales, q.device, batch, num_kv_heads, "caches")
    return checked[0], checked[1]


def dequantize_cache(
    cache: Tensor,
    descale: Tensor,
    block_table: Tensor | None,
    cache_seqlens: Tensor,
    dtype: torch.dtype,
) -> Tensor:
    """An FP8 KV cache as `dtype`, batch entry b's rows times its (num_kv_heads,)
    factors: a contiguous cache (batch, capacity, heads, dim) whole; a paged one
    (num_blocks, block_size, heads, dim) as the blocks `block_table` (batch, max_blocks)
    lists, in a new paged cache whose block table is `compact_block_table(block_table)`
    (entries past a sequence's `cache_seqlens` tokens, stale in vLLM, read block 0
    instead). No host synchronization."""
    if block_table is None:
        return dequantize(cache, descale, dtype)
    block_size = cache.shape[1]
    if cache.shape[0] == 0:  # no blocks: nothing is read (every sequence is empty)
        return cache.new_zeros((block_table.numel(), *cache.shape[1:]), dtype=dtype)
    starts = torch.arange(block_table.shape[1], device=cache.device) * block_size
    used = starts.view(1, -1) < cache_seqlens.view(-1, 1)
    table = torch.where(used, block_table.long(), 0)
    pages = cache.view(torch.uint8)[table].view(cache.dtype)  # (batch, blocks, size, h, d)
    scales = descale[:, None, None, :, None]
    return (pages.to(torch.float32) * scales).to(dtype).flatten(0, 1)


def compact_block_table(block_table: Tensor) -> Tensor:
    """The block table of `dequantize_cache`'s paged cache: batch entry b's blocks are
    b * max_blocks .. (b + 1) * max_blocks - 1."""
    batch, max_blocks = block_table.shape
    return torch.arange(
        batch * max_blocks, dtype=block_table.dtype, device=block_table.device
    ).view(batch, max_blocks)


def output_dtype(dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """The output dtype of inputs of `dtype` given `out_dtype` (None: bfloat16 for FP8
    inputs, the inputs' own dtype otherwise)."""
    if out_dtype is not None:
        return out_dtype
    return DEFAULT_OUT_DTYPE if is_fp8(dtype) else dtype


# The largest finite E4M3 magnitude: quantization saturates there.
E4M3_MAX = 448.0


def quantize(t: Tensor, scale: Tensor) -> Tensor:
    """E4M3 of t / scale (float32 division, rounded to nearest even), saturating finite
    values at +-448 (NaN stays NaN): what sparsek's KV-cache update, vLLM's and
    FlashAttention-3's quantization write. `scale`: a one-element float32 tensor."""
    scaled = t.to(torch.float32) / scale.reshape(()).to(torch.float32)
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def head_scales(descale: Tensor, num_heads: int) -> Tensor:
    """(rows, num_kv_heads) factors -> (rows, num_heads): each head its KV head's."""
    group = num_heads // descale.shape[1]
    return descale if group == 1 else descale.repeat_interleave(group, dim=1)


def dequantize(t: Tensor, descale: Tensor, dtype: torch.dtype) -> Tensor:
    """(batch, seqlen, heads, head_dim) FP8 values times their (batch, num_kv_heads)
    factors, in `dtype` (rounded once, from the float32 product)."""
    scales = head_scales(descale, t.shape[2])[:, None, :, None]
    return (t.to(torch.float32) * scales).to(dtype)


def dequantize_packed(t: Tensor, descale: Tensor, cu_seqlens: Tensor, dtype: torch.dtype) -> Tensor:
    """(total, heads, head_dim) packed FP8 values times the factors of the sequence each
    row belongs to (`cu_seqlens`: (batch + 1,) offsets), in `dtype`. Rows past the last
    sequence (belonging to none) take the last sequence's factors; without sequences
    they stay unscaled. No host synchronization."""
    if descale.shape[0] == 0:
        return t.to(dtype)
    rows = torch.arange(t.shape[0], device=t.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:], rows, right=True).clamp_(max=descale.shape[0] - 1)
    scales = head_scales(descale, t.shape[1])[seq][:, :, None]
    return (t.to(torch.float32) * scales).to(dtype)


def fp8_result(
    result: Tensor | tuple[Tensor, Tensor], out_dtype: torch.dtype, return_lse: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """What an FP8 call returns from the (out, lse) its dequantized inputs gave on the
    16-bit path: out cast to `out_dtype`, and lse when `return_lse`."""
    assert isinstance(result, tuple)
    out, lse = result
    return (out.to(out_dtype), lse) if return_lse else out.to(out_dtype)
