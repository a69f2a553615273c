"""Kernel or fallback: whether sparsek's kernels serve a checked request, and what happens
when they do not.

One rule for CPU tensors and inputs that require grad, shared by every entry point
(`attention`, `scaled_dot_product_attention`, `attention_varlen`, `attention_with_kvcache`;
`forward_path`):

  * an input requires grad (and grad mode is on): a fallback on every device, CPU included,
    because the kernels and the torch ops are forward only. A differentiable torch path
    runs; the reason is `NEEDS_GRAD`.
  * otherwise CPU tensors take the documented CPU path (the torch reference; the SDPA
    drop-in: PyTorch's SDPA), which is not a fallback: nothing is logged and
    `SPARSEK_STRICT=1` does not refuse it.
  * otherwise the kernels are asked; a request they cannot serve (another device, an
    unregistered head dim or dtype, an `attn_mask`, ...) falls back: dense calls to
    PyTorch's SDPA, the varlen and KV-cache calls to the torch reference.

Each distinct fallback reason is logged once; with `SPARSEK_STRICT=1` in the environment a
fallback raises `UnsupportedError` instead.

Under torch.compile the decision is made at trace time from constants
(`registry_blockers` is an `assume_constant_result`), so it does not break graphs.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import os
from typing import TypeGuard

import torch
from torch import Tensor

from cutedsl_kernels.config import MaskSpec
from sparsek import memo
from sparsek.errors import UnsupportedError
from sparsek.registry import (
    ARCH_ENV,
    MASK_BY_NAME,
    detect_arch,
    dtype_name,
    find,
    registered_arches,
    registered_head_dims,
    registered_value_head_dims,
)

logger = logging.getLogger(__name__)

STRICT_ENV = "SPARSEK_STRICT"
NEEDS_GRAD = "backward is not implemented (an input requires grad)"

# Every head dim any architecture registers, of Q/K or of V/O (a constant for
# torch.compile's sake).
REGISTERED_HEAD_DIMS: tuple[int, ...] = tuple(
    sorted(
        {
            dim
            for arch in registered_arches()
            for d in registered_head_dims(arch)
            for dim in (d, *registered_value_head_dims(arch, d))
        }
    )
)

_logged_reasons: set[str] = set()


def strict() -> bool:
    """`SPARSEK_STRICT` is set (to anything but "" or "0"): fallbacks raise."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def fallback(reasons: tuple[str, ...], action: str = "falling back to torch SDPA") -> None:
    """Raise in strict mode, else log each distinct reason once (never while tracing).

    Raises:
        UnsupportedError: `SPARSEK_STRICT=1`; its `reasons` are these.
    """
    if strict():
        raise UnsupportedError(f"sparsek kernels cannot run this input ({STRICT_ENV}=1)", reasons)
    if torch.compiler.is_compiling():
        return
    message = "; ".join(reasons)
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logger.warning("sparsek: %s: %s", action, message)


def route(found: object) -> None:
    """`found`: what serves a non-CPU varlen / KV-cache request (a kernel config or launch
    plan), or why nothing does (a str). Then the reference runs: log the reason once, or
    raise when strict."""
    if isinstance(found, str):
        fallback((found,), action="slow path (torch reference)")


def needs_grad(*tensors: Tensor) -> bool:
    """Autograd would record an op on these tensors (the kernels are forward only)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class Path(enum.Enum):
    """Where a checked request goes first (`choose_path`)."""

    KERNELS = "kernels"  # ask the kernels; a fallback when none serves the request
    CPU = "cpu"  # the documented CPU path: not a fallback
    AUTOGRAD = "autograd"  # an input requires grad: a differentiable torch path, a fallback


def choose_path(device_type: str, grad: bool) -> Path:
    """The rule every entry point applies to CPU tensors and inputs that require grad
    (see the module docstring); `grad`: `needs_grad` of the inputs. A pure function of
    its arguments, so the CUDA answers are testable without a GPU."""
    if grad:
        return Path.AUTOGRAD
    if device_type == "cpu":
        return Path.CPU
    return Path.KERNELS


def forward_path(q: Tensor, *others: Tensor) -> Path:
    """`choose_path` for these inputs: q's device, and whether any of them needs grad."""
    return choose_path(q.device.type, needs_grad(q, *others))


def plain_eager(*tensors: Tensor) -> bool:
    """Nothing can intercept an op call on these tensors: plain eager mode (no
    torch.compile tracing, no dispatch mode such as FakeTensor, profilers or export),
    plain tensors (no subclasses)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0:
        return False
    return all(type(t) is Tensor for t in tensors)


def dense_blockers(
    q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, out_dtype: torch.dtype | None = None
) -> tuple[str, ...]:
    """Why the kernels cannot serve these (validated) dense inputs with `mask`'s kernel
    features (FP8 inputs: writing `out_dtype`); empty when they can. An input that
    requires grad is named before the device (`choose_path`'s order)."""
    if needs_grad(q, k, v):
        return (NEEDS_GRAD,)
    if q.device.type != "cuda":
        return (f"device={q.device.type}: the kernels run on CUDA devices only",)
    return cuda_dense_blockers(q.device.index, q, v, mask, out_dtype)


def cuda_dense_blockers(
    device_index: int | None,
    q: Tensor,
    v: Tensor,
    mask: MaskSpec,
    out_dtype: torch.dtype | None = None,
) -> tuple[str, ...]:
    """`dense_blockers` for inputs without grad on CUDA device `device_index` (None: the
    current one). Reads q's and v's shapes and dtype only, not their device."""
    index = device_index if device_index is not None else -1
    out = None if out_dtype is None else dtype_name(out_dtype)
    if not torch.compiler.is_compiling():
        return _eager_registry_blockers(
            os.environ.get(ARCH_ENV), index, q.shape[-1], q.dtype, mask, v.shape[-1], out
        )
    reasons: tuple[str, ...] = registry_blockers(
        index,
        static_head_dim(q.shape[-1]),
        dtype_name(q.dtype),
        mask.name,
        static_head_dim(v.shape[-1]),
        out,
    )
    return reasons


def sdpa_blockers(
    query: object,
    key: object,
    value: object,
    attn_mask: object,
    dropout_p: object,
    is_causal: object,
    scale: object,
    enable_gqa: object,
) -> tuple[str, ...]:
    """Why the kernels cannot serve this call of the SDPA drop-in as PyTorch's SDPA would
    answer it, judged from the arguments alone (grad, device and registry:
    `forward_path`, `dense_blockers`); empty when the kernels' layout fits.

    Never raises: arguments PyTorch rejects get a reason too. The drop-in hands every
    call with a reason to PyTorch, which answers it or raises its own error.
    """
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return ("query, key and value are not all tensors",)
    q, k, v = query, key, value
    if q.is_nested or k.is_nested or v.is_nested:
        return ("nested tensors are not supported by the kernels",)
    if any(t.layout is not torch.strided for t in (q, k, v)):
        return ("the kernels read dense tensors only (layout torch.strided)",)
    if attn_mask is not None:
        return ("attn_mask tensors are not supported by the kernels",)
    if not _real(dropout_p) or dropout_p != 0:
        return (f"dropout_p={dropout_p!r}: the kernels do not apply dropout (supported: 0.0)",)
    if type(is_causal) is not bool or type(enable_gqa) is not bool:
        return ("is_causal and enable_gqa must be bools",)
    if scale is not None and not (_real(scale) and math.isfinite(scale) and scale > 0):
        return (f"scale={scale!r} (kernels: a finite float > 0, or None)",)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return (f"{_shapes(q, k, v)}: the kernels serve 4-D (batch, heads, seqlen, head_dim)",)
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        return ("query, key and value differ in dtype or device",)
    if k.shape[0] != q.shape[0] or v.shape[:-1] != k.shape[:-1] or k.shape[-1] != q.shape[-1]:
        return (
            f"{_shapes(q, k, v)}: the kernels need one batch size, key and value alike but "
            "for the last dim, and one head_dim for query and key",
        )
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if (
        num_kv_heads == 0
        or num_heads % num_kv_heads != 0
        or (num_heads != num_kv_heads and not enable_gqa)
    ):
        return (
            f"num_heads={num_heads} with num_kv_heads={num_kv_heads} (kernels: equal, or "
            "a multiple with enable_gqa=True)",
        )
    return ()


def _shapes(q: Tensor, k: Tensor, v: Tensor) -> str:
    return f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}"


def _real(x: object) -> TypeGuard[float]:
    """`x` is a Python int or float (bool excluded), as the kernels take it."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@functools.lru_cache(maxsize=256)
def _eager_registry_blockers(
    arch_override: str | None,
    device_index: int,
    head_dim: int,
    dtype: torch.dtype,
    mask: MaskSpec,
    head_dim_v: int,
    out_dtype: str | None = None,
) -> tuple[str, ...]:
    """`registry_blockers` memoized for eager calls: the answer depends only on these
    (`arch_override`: the SPARSEK_ARCH value, which `detect_arch` reads)."""
    reasons: tuple[str, ...] = registry_blockers(
        device_index, int(head_dim), dtype_name(dtype), mask.name, int(head_dim_v), out_dtype
    )
    return reasons


memo.register(_eager_registry_blockers.cache_clear)


def static_head_dim(head_dim: int) -> int | None:
    """`head_dim` as a Python int, or None when it is no registered head dim.

    Under torch.compile(dynamic=True) the head dim is symbolic; comparing it with each
    registered value guards on it and yields a constant the registry check can take.
    """
    if not torch.compiler.is_compiling():
        return int(head_dim)
    for candidate in REGISTERED_HEAD_DIMS:
        if head_dim == candidate:
            return candidate
    return None


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def registry_blockers(
    device_index: int,
    head_dim: int | None,
    dtype: str,
    mask_name: str,
    head_dim_v: int | None = 0,
    out_dtype: str | None = None,
) -> tuple[str, ...]:
    """Registry answer for a dense request with the mask named `mask_name` (`MaskSpec.name`)
    on CUDA device `device_index` (-1: the current one); empty when a kernel serves it. A
    constant under torch.compile (no tracing inside; the mask goes by name, a string
    constant). `head_dim` and `head_dim_v` (V's; 0: head_dim's) come from
    `static_head_dim` (None: not a registered head dim); `out_dtype`: O's dtype name
    (FP8 requests only)."""
    arch = detect_arch(None if device_index < 0 else device_index)
    if arch is None:
        return ("no CUDA device detected",)
    if head_dim is None or head_dim_v is None:
        dims = ", ".join(str(d) for d in REGISTERED_HEAD_DIMS)
        which = "head_dim" if head_dim is None else "value head_dim"
        return (f"{which} is not supported (supported: {dims})",)
    mask = MASK_BY_NAME.get(mask_name)
    if mask is None:
        supported = ", ".join(MASK_BY_NAME)
        return (f"mask={mask_name} is not supported (supported: {supported})",)
    found = find(arch, head_dim, dtype, mask, head_dim_v=head_dim_v or None, out_dtype=out_dtype)
    return tuple(found) if isinstance(found, tuple) else ()
