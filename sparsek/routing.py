"""Kernel or fallback: whether sparsek's kernels serve a checked request, and what happens
when they do not.

A request the kernels cannot serve (another device, inputs that require grad, an
unregistered head dim or dtype, ...) falls back: dense calls to PyTorch's SDPA, the varlen
and KV-cache calls to the torch reference. Each distinct reason is logged once; with
`SPARSEK_STRICT=1` in the environment a fallback raises `UnsupportedError` instead.

Under torch.compile the decision is made at trace time from constants
(`registry_blockers` is an `assume_constant_result`), so it does not break graphs.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

from sparsek import memo
from sparsek.errors import UnsupportedError
from sparsek.registry import (
    ARCH_ENV,
    detect_arch,
    dtype_name,
    find,
    mask_of,
    registered_arches,
    registered_head_dims,
)

logger = logging.getLogger(__name__)

STRICT_ENV = "SPARSEK_STRICT"
NEEDS_GRAD = "backward is not implemented (an input requires grad)"

# Every head dim any architecture registers (a constant for torch.compile's sake).
REGISTERED_HEAD_DIMS: tuple[int, ...] = tuple(
    sorted({d for arch in registered_arches() for d in registered_head_dims(arch)})
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


def plain_eager(*tensors: Tensor) -> bool:
    """Nothing can intercept an op call on these tensors: plain eager mode (no
    torch.compile tracing, no dispatch mode such as FakeTensor, profilers or export),
    plain tensors (no subclasses)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0:
        return False
    return all(type(t) is Tensor for t in tensors)


def dense_blockers(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[str, ...]:
    """Why the kernels cannot serve these (validated) dense inputs; empty when they can."""
    if q.device.type != "cuda":
        return (f"device={q.device.type}: the kernels run on CUDA devices only",)
    if needs_grad(q, k, v):
        return (NEEDS_GRAD,)
    if v.shape[-1] != q.shape[-1]:
        return (f"value head_dim={v.shape[-1]} differs from query head_dim={q.shape[-1]}",)
    index = q.device.index if q.device.index is not None else -1
    if not torch.compiler.is_compiling():
        return _eager_registry_blockers(
            os.environ.get(ARCH_ENV), index, q.shape[-1], q.dtype, causal
        )
    reasons: tuple[str, ...] = registry_blockers(
        index, static_head_dim(q.shape[-1]), dtype_name(q.dtype), causal
    )
    return reasons


@functools.lru_cache(maxsize=256)
def _eager_registry_blockers(
    arch_override: str | None, device_index: int, head_dim: int, dtype: torch.dtype, causal: bool
) -> tuple[str, ...]:
    """`registry_blockers` memoized for eager calls: the answer depends only on these
    (`arch_override`: the SPARSEK_ARCH value, which `detect_arch` reads)."""
    reasons: tuple[str, ...] = registry_blockers(
        device_index, int(head_dim), dtype_name(dtype), causal
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
    device_index: int, head_dim: int | None, dtype: str, causal: bool
) -> tuple[str, ...]:
    """Registry answer for a dense request on CUDA device `device_index` (-1: the current
    one); empty when a kernel serves it. A constant under torch.compile (no tracing
    inside)."""
    arch = detect_arch(None if device_index < 0 else device_index)
    if arch is None:
        return ("no CUDA device detected",)
    if head_dim is None:
        dims = ", ".join(str(d) for d in REGISTERED_HEAD_DIMS)
        return (f"head_dim is not supported (supported: {dims})",)
    found = find(arch, head_dim, dtype, mask_of(causal))
    return tuple(found) if isinstance(found, tuple) else ()
