"""Loaded kernels by request identity, and the pieces every launch shares.

`forward_kernel(device, head_dim, dtype, mask, layout, workload)` is the launch paths'
only lookup once a kernel is loaded: a memo in front of the registry (`sparsek.registry`,
which names the config for the device's architecture) and the compile cache
(`sparsek.cache`, which compiles or loads it). Also here: the device guard of a launch
(TVM-FFI launches on the current device), the SM count (the CTA count of a persistent
launch), the zeroed tile counter of dynamically scheduled kernels, and the allocation
seam of every output (`empty`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from cutedsl_kernels.config import DENSE, FmhaFwdConfig, KernelConfig, Layout, MaskSpec
from sparsek import memo
from sparsek.cache import KernelFn, get_kernel
from sparsek.errors import UnsupportedError
from sparsek.registry import (
    detect_arch,
    dtype_name,
    find,
    lookup,
    lookup_combine,
    lookup_kv_store,
)
from sparsek.tuning import Workload


@dataclass(frozen=True)
class ForwardKernel:
    """A loaded forward kernel and the config it was compiled from."""

    fn: KernelFn
    config: FmhaFwdConfig

    @property
    def takes_tile_counter(self) -> bool:
        """It takes its work tiles from a zeroed global counter (`dynamic_schedule`)."""
        return self.config.dynamic_schedule


ForwardKey = tuple[
    int | None,
    int,
    torch.dtype,
    MaskSpec,
    Layout,
    Workload,
    int | None,
    torch.dtype | None,
    torch.dtype | None,
]
_FORWARD: dict[ForwardKey, ForwardKernel] = {}
# (device index, head_dim, dtype[, cache dtype]) -> loaded combine / paged KV-cache update kernel.
_COMBINE: dict[tuple[int | None, int, torch.dtype, bool], KernelFn] = {}
_KV_STORE: dict[tuple[int | None, int, torch.dtype, torch.dtype | None], KernelFn] = {}
for _memo in (_FORWARD, _COMBINE, _KV_STORE):
    memo.register(_memo.clear)


def forward_kernel(
    device: torch.device,
    head_dim: int,
    dtype: torch.dtype,
    mask: MaskSpec,
    layout: Layout = DENSE,
    workload: Workload = Workload.DEFAULT,
    head_dim_v: int | None = None,
    out_dtype: torch.dtype | None = None,
    cache_dtype: torch.dtype | None = None,
) -> ForwardKernel:
    """The loaded forward kernel serving a request on `device` (compiled or loaded from
    the disk cache on first use); `head_dim_v`: V's and O's head dim (None: head_dim);
    `out_dtype`: O's dtype (FP8 requests only); `cache_dtype`: K's and V's as stored
    (FP8 caches under 16-bit queries only).

    Raises:
        UnsupportedError: no CUDA device, or no registered kernel fits (reasons attached).
    """
    head_dim_v = None if head_dim_v == head_dim else head_dim_v
    key = (
        device.index, head_dim, dtype, mask, layout, workload, head_dim_v, out_dtype, cache_dtype
    )  # fmt: skip
    kernel = _FORWARD.get(key)
    if kernel is None:
        config = device_config(
            device,
            lambda arch: lookup(
                arch, head_dim, dtype, mask, layout, workload, head_dim_v, out_dtype, cache_dtype
            ),
        )
        assert isinstance(config, FmhaFwdConfig)
        kernel = _FORWARD[key] = ForwardKernel(get_kernel(config), config)
    return kernel


def combine_kernel(
    device: torch.device, head_dim: int, dtype: torch.dtype, sinks: bool = False
) -> KernelFn:
    """The loaded split-KV combine kernel for outputs of `head_dim` and `dtype` (adding
    sink logits when `sinks`).

    Raises:
        UnsupportedError: no CUDA device, or the combine kernel cannot serve it.
    """
    key = (device.index, head_dim, dtype, sinks)
    kernel = _COMBINE.get(key)
    if kernel is None:
        config_for = functools.partial(lookup_combine, head_dim=head_dim, dtype=dtype, sinks=sinks)
        kernel = _COMBINE[key] = load(device, config_for)
    return kernel


def kv_store_kernel(
    device: torch.device,
    head_dim: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
) -> KernelFn:
    """The loaded paged KV-cache update kernel for K/V of `head_dim` and `dtype` into a
    cache of `cache_dtype` (None: `dtype`).

    Raises:
        UnsupportedError: no CUDA device, or no kernel serves it.
    """
    cache_dtype = None if cache_dtype in (None, dtype) else cache_dtype
    key = (device.index, head_dim, dtype, cache_dtype)
    kernel = _KV_STORE.get(key)
    if kernel is None:
        config_for = functools.partial(
            lookup_kv_store, head_dim=head_dim, dtype=dtype, cache_dtype=cache_dtype
        )
        kernel = _KV_STORE[key] = load(device, config_for)
    return kernel


def kernel_config(
    q: Tensor,
    v: Tensor,
    mask: MaskSpec,
    layout: Layout,
    workload: Workload = Workload.DEFAULT,
    out_dtype: torch.dtype | None = None,
) -> FmhaFwdConfig | str:
    """The kernel config serving a request on q's device, or why there is none (memoized
    per device: architecture detection and the registry are too slow to repeat per call).
    `out_dtype`: O's dtype (FP8 requests only). A `v` of another dtype than q's (an FP8
    cache under 16-bit queries) asks for the kernels that convert it."""
    key = (q.device, q.shape[-1], v.shape[-1], q.dtype, v.dtype, mask, layout, workload, out_dtype)
    found = _CONFIGS.get(key)
    if found is None:
        config = _kernel_config(q, v, mask, layout, workload, out_dtype)
        found = memo.remember(_CONFIGS, key, config)
    return found


_CONFIGS: dict[tuple[object, ...], FmhaFwdConfig | str] = {}
memo.register(_CONFIGS.clear)


def _kernel_config(
    q: Tensor,
    v: Tensor,
    mask: MaskSpec,
    layout: Layout,
    workload: Workload,
    out_dtype: torch.dtype | None,
) -> FmhaFwdConfig | str:
    if q.device.type != "cuda":
        return f"device={q.device.type}: the kernels run on CUDA devices only"
    arch = detect_arch(q.device)
    if arch is None:
        return "no CUDA device detected"
    head_dim, head_dim_v = int(q.shape[-1]), int(v.shape[-1])
    out = None if out_dtype is None else dtype_name(out_dtype)
    cache = None if v.dtype == q.dtype else dtype_name(v.dtype)
    request = (arch, head_dim, dtype_name(q.dtype), mask, layout, workload, head_dim_v)
    found = find(*request, out, cache)
    return found if isinstance(found, FmhaFwdConfig) else "; ".join(found)


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


def num_sms(index: int | None) -> int:
    """SMs of CUDA device `index` (None: the current one): the CTA count of a persistent
    kernel's launch, and the split-KV heuristic's measure of a full wave."""
    return _sms_of_device(torch.cuda.current_device() if index is None else index)


@functools.cache
def _sms_of_device(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


_SAME_DEVICE = contextlib.nullcontext()


def device_guard(device: torch.device) -> AbstractContextManager[object]:
    """Where a launch on `device` runs: TVM-FFI launches on the current device, so a
    launch on another one makes it current for the call (a no-op context otherwise)."""
    if device.index is None or _one_device() or device.index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(device)


@functools.cache
def _one_device() -> bool:
    """One CUDA device visible: it is the current one (`device_guard` skips the ~1.5 us
    query)."""
    return torch.cuda.device_count() == 1


def zeroed_counter(device: torch.device) -> Tensor:
    """A zeroed int32 work-tile counter, allocated per call so that launches on concurrent
    streams never share one."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def capturing(device: torch.device) -> bool:
    """`device` is a CUDA device whose current stream is being captured into a graph:
    device work is recorded, not run, and allocations come from the graph's private pool
    (freed with it)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def filled_int32(device: torch.device, length: int, value: int) -> Tensor:
    """A (length,) int32 tensor of `value`, kept per (device, length, value) once made
    outside CUDA-graph capture. Made during capture it is a fresh tensor whose fill the
    graph records (so it holds `value` when the graph runs, which is all a captured launch
    needs) and is not kept: it is not filled now, and its memory is the graph's."""
    key = (device, length, value)
    kept = _FILLED.get(key)
    if kept is not None:
        return kept
    tensor = torch.full((length,), value, dtype=torch.int32, device=device)
    if not capturing(device):
        _FILLED[key] = tensor
    return tensor


_FILLED: dict[tuple[torch.device, int, int], Tensor] = {}
memo.register(_FILLED.clear)


def empty(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    stride: tuple[int, ...] | None = None,
) -> Tensor:
    """A contiguous output allocation (a seam: GPU tests poison outputs with NaN through
    it). `stride`: `shape`'s `contiguous_strides` if the caller has them at hand, for the
    cheaper `torch.empty_strided`."""
    if stride is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of `shape` (as `torch.empty(shape).stride()`)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
