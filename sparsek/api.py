"""Public entry points: `attention` (FlashAttention layout) and an SDPA drop-in.

Both validate their inputs, then either run the `sparsek::attention` op (CUDA tensors a
registered kernel can serve) or fall back to `torch.nn.functional.scaled_dot_product_attention`
for everything else, logging each distinct fallback reason once. With `SPARSEK_STRICT=1` in
the environment a fallback raises `UnsupportedError` instead.

Strides: any strides are accepted. Inputs whose layout TMA cannot read are copied
(contiguously) inside the op; the values, and so the result, are unchanged.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsek import ops as _ops  # also registers torch.ops.sparsek.attention
from sparsek.errors import UnsupportedError
from sparsek.ops import remember
from sparsek.reference import reference_attention
from sparsek.registry import (
    ARCH_ENV,
    detect_arch,
    dtype_name,
    find,
    registered_arches,
    registered_head_dims,
)

logger = logging.getLogger(__name__)

STRICT_ENV = "SPARSEK_STRICT"

# Every head dim any architecture registers (a constant for torch.compile's sake).
_REGISTERED_HEAD_DIMS: tuple[int, ...] = tuple(
    sorted({d for arch in registered_arches() for d in registered_head_dims(arch)})
)

_logged_reasons: set[str] = set()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head attention, softmax(q k^T * scale) v, in (batch, seqlen, heads, head_dim) layout.

    Grouped-query / multi-query attention is implied by num_kv_heads < num_heads: K/V head
    j serves query heads [j * g, (j + 1) * g) with g = num_heads // num_kv_heads. The causal
    mask is bottom-right aligned (FlashAttention's convention): query i sees key j iff
    j <= i + seqlen_k - seqlen_q. Rows that see no key return 0 (lse -inf).

    Args:
        q: (batch, seqlen_q, num_heads, head_dim), float16/bfloat16 for the kernels (other
            floating dtypes fall back).
        k: (batch, seqlen_k, num_kv_heads, head_dim), same dtype and device as q.
        v: (batch, seqlen_k, num_kv_heads, head_dim_v), same dtype and device as q.
        causal: apply the bottom-right aligned causal mask.
        softmax_scale: multiplier of q k^T; finite and > 0; 1/sqrt(head_dim) when None.
        return_lse: also return the log-sum-exp of each row.

    Returns:
        out: (batch, seqlen_q, num_heads, head_dim_v), dtype of q; and, when `return_lse`,
        lse: (batch, num_heads, seqlen_q) float32 (natural log).

    Raises:
        TypeError: a tensor argument is not a tensor or not floating point; `causal` or
            `return_lse` is not a bool; `softmax_scale` is not a real number.
        ValueError: wrong rank, mismatched batch / seqlen_k / num_kv_heads / head_dim /
            dtype / device, num_heads not a multiple of num_kv_heads, or a non-finite or
            non-positive `softmax_scale`.
        UnsupportedError: no kernel fits and `SPARSEK_STRICT=1` forbids the fallback.
    """
    signature = None
    if type(return_lse) is bool:  # (no key part: it changes neither checks nor plan)
        signature = _eager_signature(q, k, v, softmax_scale, causal)
    plan = _SERVED.get(signature) if signature is not None else None
    if plan is not None:  # this signature passed every check below before
        out, lse = _ops.run_dense(plan, q, k, v, return_lse)
        return (out, lse) if return_lse else out
    _check_flag("causal", causal)
    _check_flag("return_lse", return_lse)
    _check_qkv(("q", "k", "v"), q, k, v, layout="(batch, seqlen, heads, head_dim)", head_axis=2)
    scale = _resolve_scale("softmax_scale", softmax_scale, q.shape[-1])

    reasons = _kernel_blockers(q, k, v, causal)
    if not reasons:
        result = _run_kernels(_SERVED, signature, q, k, v, causal, scale, False)
        return result if return_lse else result[0]
    if q.device.type == "cpu" and not _needs_grad(q, k, v):
        # The documented CPU path: the op's float32 reference (the correctness oracle).
        cpu_result: tuple[Tensor, Tensor] = torch.ops.sparsek.attention(
            q, k, v, causal, scale, False
        )
        return cpu_result if return_lse else cpu_result[0]
    _fallback(reasons)
    if return_lse:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        ref_out, ref_lse = reference_attention(
            q, k, v, causal=causal, softmax_scale=scale, compute_dtype=compute
        )
        return ref_out.to(q.dtype), ref_lse.to(torch.float32)
    return _sdpa_bshd(q, k, v, causal, scale)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention`.

    Same layout and semantics as PyTorch: (batch, heads, seqlen, head_dim), top-left aligned
    `is_causal`. The kernels serve 4-D float16/bfloat16 CUDA inputs of a registered head_dim
    without `attn_mask` or dropout; everything else goes to PyTorch's SDPA.

    Args:
        query: (batch, num_heads, seqlen_q, head_dim).
        key: (batch, num_kv_heads, seqlen_k, head_dim).
        value: (batch, num_kv_heads, seqlen_k, head_dim_v).
        attn_mask: boolean or additive mask broadcastable to (batch, num_heads, seqlen_q,
            seqlen_k), or None. Any mask falls back to PyTorch.
        dropout_p: dropout probability in [0, 1); > 0 falls back to PyTorch.
        is_causal: top-left aligned causal mask (query i sees key j iff j <= i).
        scale: multiplier of query key^T; finite and > 0; 1/sqrt(head_dim) when None.
        enable_gqa: allow num_kv_heads < num_heads (num_heads must be a multiple).

    Returns:
        (batch, num_heads, seqlen_q, head_dim_v), dtype of query.

    Raises:
        TypeError: a tensor argument is not a tensor or not floating point, `attn_mask` is
            neither a tensor nor None, a flag is not a bool, or a number is not a real number.
        ValueError: wrong rank or mismatched shapes/dtypes/devices, num_heads != num_kv_heads
            without `enable_gqa`, `attn_mask` together with `is_causal`, `dropout_p`
            outside [0, 1), or a non-finite or non-positive `scale`.
        UnsupportedError: no kernel fits and `SPARSEK_STRICT=1` forbids the fallback.
    """
    signature = None
    if attn_mask is None and type(dropout_p) is float and dropout_p == 0.0:
        signature = _eager_signature(query, key, value, scale, is_causal, enable_gqa)
    plan = _SERVED_SDPA.get(signature) if signature is not None else None
    if plan is not None:  # this signature passed every check below before
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        return _ops.run_dense(plan, q, k, v, False)[0].transpose(1, 2)
    _check_flag("is_causal", is_causal)
    _check_flag("enable_gqa", enable_gqa)
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True cannot be combined; pass one of them")
    _check_dropout(dropout_p)
    if any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value)):
        # PyTorch's SDPA serves some nested inputs; sparsek's kernels none.
        _fallback(("nested tensors are not supported by the kernels",))
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
    _check_qkv(
        ("query", "key", "value"),
        query,
        key,
        value,
        layout="(batch, heads, seqlen, head_dim)",
        head_axis=1,
        enable_gqa=enable_gqa,
    )
    head_dim = query.shape[-1]
    resolved = _resolve_scale("scale", scale, head_dim)

    reasons: tuple[str, ...] = ()
    if attn_mask is not None:
        reasons = ("attn_mask tensors are not supported by the kernels",)
    elif dropout_p > 0.0:
        reasons = ("dropout_p > 0 is not supported by the kernels",)
    else:
        reasons = _kernel_blockers(query, key, value, is_causal)
    if not reasons:
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = _run_kernels(_SERVED_SDPA, signature, q, k, v, is_causal, resolved, True)[0]
        return out.transpose(1, 2)
    _fallback(reasons)
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


# ---------------------------------------------------------------------------- validation


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_dropout(dropout_p: object) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _resolve_scale(name: str, scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a float (finite, > 0) or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {scale}")
    return float(scale)


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


def check_kv_matches_q(names: tuple[str, str, str], q: Tensor, k: Tensor, v: Tensor) -> None:
    """Rules every attention entry point shares, whatever the layout (heads on dim -2 of
    k after any batch/sequence dims; K and V alike but for the last dim).

    Raises:
        ValueError: k/v dtype or device differ from q's, v's shape differs from k's but for
            the last dim, head_dim differs or is 0, or q's heads are no multiple of k's.
    """
    q_name, k_name, v_name = names
    for name, t in ((k_name, k), (v_name, v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype={t.dtype} must equal {q_name}.dtype={q.dtype}")
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


def _check_qkv(
    names: tuple[str, str, str],
    q: object,
    k: object,
    v: object,
    *,
    layout: str,
    head_axis: int,
    enable_gqa: bool = True,
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
    if not enable_gqa and num_heads != num_kv_heads:
        raise ValueError(
            f"{q_name} has {num_heads} heads but {k_name} has {num_kv_heads}; "
            "pass enable_gqa=True for grouped-query attention"
        )


# ---------------------------------------------------------------------------- dispatch


def _eager_signature(
    q: object, k: object, v: object, softmax_scale: object, *flags: object
) -> tuple[object, ...] | None:
    """The key under which an entry point memoizes a call that passed validation and the
    kernel check (`_SERVED`, `_SERVED_SDPA`), or None for calls never memoized: anything
    but plain eager calls on plain tensors without grad, flags of another type than bool,
    a scale of another type than float (True == 1.0 as a key), and any tensor argument
    that is no tensor. Everything validation and the kernel check read is in the key:
    shapes, strides, dtypes, devices, the scale, the flags and the SPARSEK_ARCH value."""
    if (
        type(q) is not Tensor
        or type(k) is not Tensor
        or type(v) is not Tensor
        or (softmax_scale is not None and type(softmax_scale) is not float)
    ):
        return None
    for flag in flags:
        if type(flag) is not bool:
            return None
    # `plain_eager` and `_needs_grad`, inline: this runs on every call.
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0:
        return None
    if (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled():
        return None
    try:
        strides = q.stride(), k.stride(), v.stride()
    except RuntimeError:  # sparse or nested: validation names the argument
        return None
    return (
        q.shape, k.shape, v.shape, strides, q.dtype, k.dtype, v.dtype,
        q.device, k.device, v.device, softmax_scale, flags, os.environ.get(ARCH_ENV),
    )  # fmt: skip


# `_eager_signature` -> the plan of a call the kernels serve, per entry point (`attention`
# reads (batch, seqlen, heads, head_dim) tensors, the SDPA drop-in (batch, heads, ...)).
_SERVED: dict[tuple[object, ...], _ops.DensePlan] = {}
_SERVED_SDPA: dict[tuple[object, ...], _ops.DensePlan] = {}


def _needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _run_kernels(
    served: dict[tuple[object, ...], _ops.DensePlan],
    signature: tuple[object, ...] | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    causal_top_left: bool,
) -> tuple[Tensor, Tensor]:
    """Run a checked request on the kernels: a plain eager call (`signature`) is planned,
    remembered in `served` under its signature and run; any other (tracing, autograd,
    dispatch modes) goes through the torch op."""
    if signature is None:
        return _run_op(q, k, v, causal, scale, causal_top_left)
    plan = _ops.dense_plan(q, k, v, causal, scale, causal_top_left)
    return _ops.run_dense(remember(served, signature, plan), q, k, v)


def _run_op(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, top_left: bool
) -> tuple[Tensor, Tensor]:
    """torch.ops.sparsek.attention; in plain eager mode its CUDA kernel is called directly.

    The dispatcher round trip (Python -> C++ -> Python kernel) is pure host overhead when
    nothing can intercept the call: no torch.compile tracing, no dispatch mode (FakeTensor,
    profilers, export), no tensor subclasses. Anything else goes through the op.
    """
    if plain_eager(q, k, v):
        return _ops._attention_cuda(q, k, v, causal, scale, top_left)
    result: tuple[Tensor, Tensor] = torch.ops.sparsek.attention(q, k, v, causal, scale, top_left)
    return result


def plain_eager(*tensors: Tensor) -> bool:
    """Nothing can intercept an op call on these tensors: plain eager mode, plain tensors."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0:
        return False
    return all(type(t) is Tensor for t in tensors)


def _kernel_blockers(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[str, ...]:
    """Why the kernels cannot serve these (validated) inputs; empty when they can."""
    if q.device.type != "cuda":
        return (f"device={q.device.type}: the kernels run on CUDA devices only",)
    if _needs_grad(q, k, v):
        return ("backward is not implemented (an input requires grad)",)
    if v.shape[-1] != q.shape[-1]:
        return (f"value head_dim={v.shape[-1]} differs from query head_dim={q.shape[-1]}",)
    index = q.device.index if q.device.index is not None else -1
    if not torch.compiler.is_compiling():
        return _eager_registry_blockers(
            os.environ.get(ARCH_ENV), index, q.shape[-1], q.dtype, causal
        )
    reasons: tuple[str, ...] = _registry_blockers(
        index, _static_head_dim(q.shape[-1]), dtype_name(q.dtype), causal
    )
    return reasons


@functools.lru_cache(maxsize=256)
def _eager_registry_blockers(
    arch_override: str | None, device_index: int, head_dim: int, dtype: torch.dtype, causal: bool
) -> tuple[str, ...]:
    """`_registry_blockers` memoized for eager calls: the answer depends only on these
    (`arch_override`: the SPARSEK_ARCH value, which `detect_arch` reads)."""
    reasons: tuple[str, ...] = _registry_blockers(
        device_index, int(head_dim), dtype_name(dtype), causal
    )
    return reasons


def _static_head_dim(head_dim: int) -> int | None:
    """`head_dim` as a Python int, or None when it is no registered head dim.

    Under torch.compile(dynamic=True) the head dim is symbolic; comparing it with each
    registered value guards on it and yields a constant the registry check can take.
    """
    if not torch.compiler.is_compiling():
        return int(head_dim)
    for candidate in _REGISTERED_HEAD_DIMS:
        if head_dim == candidate:
            return candidate
    return None


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _registry_blockers(
    device_index: int, head_dim: int | None, dtype: str, causal: bool
) -> tuple[str, ...]:
    """Registry answer for a CUDA device (constant under torch.compile: no tracing inside)."""
    arch = detect_arch(None if device_index < 0 else device_index)
    if arch is None:
        return ("no CUDA device detected",)
    if head_dim is None:
        dims = ", ".join(str(d) for d in _REGISTERED_HEAD_DIMS)
        return (f"head_dim is not supported (supported: {dims})",)
    found = find(arch, head_dim, dtype, causal)
    return tuple(found) if isinstance(found, tuple) else ()


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _fallback(reasons: tuple[str, ...], action: str = "falling back to torch SDPA") -> None:
    """Raise in strict mode, else log each distinct reason once (never while tracing)."""
    if _strict():
        raise UnsupportedError(f"sparsek kernels cannot run this input ({STRICT_ENV}=1)", reasons)
    if torch.compiler.is_compiling():
        return
    message = "; ".join(reasons)
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logger.warning("sparsek: %s: %s", action, message)


def _sdpa_bshd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """torch SDPA on (batch, seqlen, heads, head_dim) inputs with bottom-right causal masking."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = False
    if q.shape[2] != k.shape[2]:  # a Python bool even for symbolic head counts
        gqa = True
    if not causal or seqlen_q == seqlen_k:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        return out.transpose(1, 2)
    offset = seqlen_k - seqlen_q
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device).tril(offset)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, scale=scale, enable_gqa=gqa)
    # Rows with no visible key (i < seqlen_q - seqlen_k) are 0 by sparsek's contract.
    masked_rows = torch.arange(seqlen_q, device=q.device) < -offset
    return out.masked_fill(masked_rows.view(1, 1, seqlen_q, 1), 0.0).transpose(1, 2)
