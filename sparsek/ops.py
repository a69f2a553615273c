"""The `sparsek::attention` torch op: one opaque node for eager, torch.compile and CUDA graphs.

    torch.ops.sparsek.attention(q, k, v, causal, softmax_scale, causal_top_left) -> (out, lse)

    q:   (batch, seqlen_q, num_heads, head_dim)
    k:   (batch, seqlen_k, num_kv_heads, head_dim)
    v:   (batch, seqlen_k, num_kv_heads, head_dim_v)
    out: (batch, seqlen_q, num_heads, head_dim_v), q.dtype, contiguous
    lse: (batch, num_heads, seqlen_q), float32, contiguous (natural-log log-sum-exp)

Implementations:
  * CUDA: registry lookup -> compile cache -> kernel launch. Inputs whose strides or
    alignment break TMA's rules (last dim contiguous, other strides positive multiples of
    8 elements, 16-byte-aligned base) are copied first; zero-size problems and
    seqlen_k == 0 are answered without a launch. No host synchronization on this path,
    so it can be captured in a CUDA graph (after one warm-up call has compiled/loaded
    the kernel). Raises `UnsupportedError` when no kernel fits: callers wanting a
    fallback (see `sparsek.api`) decide before calling the op.
  * Any other device (CPU): the float32 reference (`sparsek.reference`), slow but exact;
    it serves tests (opcheck, torch.compile) and machines without a GPU.
  * Fake (meta) tensors: shapes/dtypes/strides only, for torch.compile and export.

Forward only: no autograd formula is registered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from cutedsl_kernels.config import FmhaFwdConfig, KernelConfig
from sparsek.cache import KernelFn, get_kernel
from sparsek.errors import UnsupportedError
from sparsek.reference import causal_offset, reference_attention
from sparsek.registry import (
    DENSE,
    LONG_Q,
    LONG_SEQLEN_Q,
    Variant,
    detect_arch,
    lookup,
    lookup_combine,
)

# TMA: global strides must be multiples of 16 bytes (8 fp16/bf16 elements) and the base
# address 16-byte aligned.
_STRIDE_MULTIPLE = 8
_ALIGN_BYTES = 16


# A plain `torch.library.Library` op rather than `torch.library.custom_op`: the latter
# wraps every eager call in Python-level autograd and dispatch layers (~25 us per call
# measured on the CI CPU, against ~2 us for this). Without an autograd kernel, PyTorch's
# fallback raises "not implemented" if a caller backpropagates through the op.
_LIB = torch.library.Library("sparsek", "DEF")  # type: ignore[no-untyped-call]
_LIB.define(  # type: ignore[no-untyped-call]
    "attention(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, "
    "bool causal_top_left) -> (Tensor, Tensor)"
)


def _attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    softmax_scale: float,
    causal_top_left: bool,
) -> tuple[Tensor, Tensor]:
    """Reference implementation (every device without a registered kernel path)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = reference_attention(
        q,
        k,
        v,
        causal=causal,
        causal_top_left=causal_top_left,
        softmax_scale=softmax_scale,
        compute_dtype=compute,
    )
    return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous()


@torch.library.register_fake("sparsek::attention")  # type: ignore[untyped-decorator]
def _attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    softmax_scale: float,
    causal_top_left: bool,
) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, num_heads, _ = q.shape
    out = q.new_empty((batch, seqlen_q, num_heads, v.shape[-1]))
    lse = q.new_empty((batch, num_heads, seqlen_q), dtype=torch.float32)
    return out, lse


def _attention_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    softmax_scale: float,
    causal_top_left: bool,
) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    out = _empty((batch, seqlen_q, num_heads, v.shape[-1]), q.dtype, q.device)
    lse = _empty((batch, num_heads, seqlen_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_k == 0:
        # No key at all: every row is fully masked.
        return out.zero_(), lse.fill_(float("-inf"))
    if v.shape[-1] != head_dim:
        raise UnsupportedError(
            "no sparsek kernel for this input",
            [f"value head_dim={v.shape[-1]} must equal query head_dim={head_dim}"],
        )
    variant = dense_variant(seqlen_q, causal)
    kernel = _launcher(q.device, head_dim, q.dtype, causal, variant)
    counter = tile_counter(q.device, head_dim, q.dtype, causal, variant)
    offset = causal_offset(seqlen_q, seqlen_k, causal_top_left) if causal else 0
    args = (tma_compatible(q), tma_compatible(k), tma_compatible(v), out, lse)
    scalars = (float(softmax_scale), offset, 0, 1, num_sms(q.device.index))
    launch(q.device, kernel, *args, None, None, None, None, counter, *scalars)
    return out, lse


def dense_variant(seqlen_q: int, causal: bool) -> Variant:
    """The registry variant of a dense request: long causal queries may take other tiles
    and schedules (`registry.LONG_Q`)."""
    return LONG_Q if causal and seqlen_q >= LONG_SEQLEN_Q else DENSE


def num_sms(index: int | None) -> int:
    """SMs of CUDA device `index` (None: the current one): the CTA count of a persistent
    kernel's launch, and the split-KV heuristic's measure of a full wave."""
    return _sms_of_device(torch.cuda.current_device() if index is None else index)


@functools.cache
def _sms_of_device(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def launch(device: torch.device, kernel: KernelFn, *args: object) -> None:
    """Call `kernel(*args)` with `device` current (TVM-FFI launches on the current one)."""
    if device.index is None or device.index == torch.cuda.current_device():
        kernel(*args)
    else:
        with torch.cuda.device(device):
            kernel(*args)


# (device index, head_dim, dtype, causal, variant) -> loaded kernel: the launch path's only
# lookup once a kernel is loaded (the arch of a device does not change within a process).
# The combine kernel of (head_dim, dtype) is stored under causal=None.
LauncherKey = tuple[int | None, int, torch.dtype, bool | None, Variant]
_LAUNCHERS: dict[LauncherKey, KernelFn] = {}
# Keys of _LAUNCHERS whose kernel takes its work tiles from a zeroed global counter
# (`FmhaFwdConfig.dynamic_schedule`).
_COUNTED: set[LauncherKey] = set()


def _launcher(
    device: torch.device,
    head_dim: int,
    dtype: torch.dtype,
    causal: bool | None,
    variant: Variant = DENSE,
) -> KernelFn:
    """The loaded forward kernel for a request (`causal=None`: the split-KV combine)."""
    key = (device.index, head_dim, dtype, causal, variant)
    kernel = _LAUNCHERS.get(key)
    if kernel is None:
        config: KernelConfig
        if causal is None:
            config = device_config(device, lambda arch: lookup_combine(arch, head_dim, dtype))
        else:
            config = device_config(
                device, lambda arch: lookup(arch, head_dim, dtype, causal, variant)
            )
        kernel = _LAUNCHERS[key] = get_kernel(config)
        if isinstance(config, FmhaFwdConfig) and config.dynamic_schedule:
            _COUNTED.add(key)
    return kernel


def tile_counter(
    device: torch.device, head_dim: int, dtype: torch.dtype, causal: bool, variant: Variant
) -> Tensor | None:
    """A zeroed int32 work-tile counter if the kernel `_launcher` loaded for these
    arguments takes one (`FmhaFwdConfig.dynamic_schedule`), else None. Call it after
    `_launcher`; allocated per call, so launches on concurrent streams never share one."""
    if (device.index, head_dim, dtype, causal, variant) in _COUNTED:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return None


def load(device: torch.device, config_for: Callable[[str], KernelConfig]) -> KernelFn:
    """The kernel `config_for(arch of device)` names, compiled or loaded through the cache
    (the slow path behind each launch path's own memo of loaded kernels).

    Raises:
        UnsupportedError: no CUDA device, or no registered kernel fits (reasons attached).
    """
    return get_kernel(device_config(device, config_for))


def device_config(device: torch.device, config_for: Callable[[str], KernelConfig]) -> KernelConfig:
    """`config_for(arch of device)`.

    Raises:
        UnsupportedError: no CUDA device, or no registered kernel fits (reasons attached).
    """
    arch = detect_arch(device)
    if arch is None:
        raise UnsupportedError("no sparsek kernel for this input", ["no CUDA device detected"])
    return config_for(arch)


_LIB.impl("attention", _attention_reference, "CompositeExplicitAutograd")  # type: ignore[no-untyped-call]
_LIB.impl("attention", _attention_cuda, "CUDA")  # type: ignore[no-untyped-call]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output allocation (a seam: GPU tests poison outputs with NaN through it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def tma_compatible(t: Tensor) -> Tensor:
    """`t` itself when TMA can read it (`tma_readable`), else a contiguous copy."""
    return t if tma_readable(t) else t.clone(memory_format=torch.contiguous_format)


def tma_readable(t: Tensor) -> bool:
    """Whether TMA can read `t` in place.

    TMA needs the last dim contiguous, every other stride a positive multiple of 8
    elements, and a 16-byte-aligned base address.
    """
    return t.data_ptr() % _ALIGN_BYTES == 0 and tma_strides_ok(t)


def tma_strides_ok(t: Tensor) -> bool:
    """`tma_readable` but for the base address: the last dim contiguous, every other
    stride a positive multiple of 8 elements."""
    strides = t.stride()
    ok = _TMA_STRIDES.get(strides)
    if ok is None:
        ok = strides[-1] == 1 and all(s > 0 and s % _STRIDE_MULTIPLE == 0 for s in strides[:-1])
        if len(_TMA_STRIDES) < _TMA_STRIDES_MAX:
            _TMA_STRIDES[strides] = ok
    return ok


# tma_strides_ok's answers by stride tuple (the launch path checks 3 tensors per call).
_TMA_STRIDES: dict[tuple[int, ...], bool] = {}
_TMA_STRIDES_MAX = 4096
