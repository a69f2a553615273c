"""The `sparsek::attention` torch op: one opaque node for eager, torch.compile and CUDA graphs.

    torch.ops.sparsek.attention(q, k, v, causal, softmax_scale, causal_top_left) -> (out, lse)

    q:   (batch, seqlen_q, num_heads, head_dim)
    k:   (batch, seqlen_k, num_kv_heads, head_dim)
    v:   (batch, seqlen_k, num_kv_heads, head_dim_v)
    out: (batch, seqlen_q, num_heads, head_dim_v), q.dtype, contiguous
    lse: (batch, num_heads, seqlen_q), float32, contiguous (natural-log log-sum-exp)

Implementations:
  * CUDA: registry lookup -> compile cache -> kernel launch, worked out once per request
    signature (`dense_plan`: shapes, strides, dtype, device, flags). Inputs whose strides or
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
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

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
    ONE_WAVE,
    ONE_WAVE_TILE_M,
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
    return run_dense(dense_plan(q, k, v, causal, softmax_scale, causal_top_left), q, k, v)


@dataclass(frozen=True)
class DensePlan:
    """What a dense request of one signature (shapes, strides, dtype, device, flags)
    allocates and launches: worked out once (`dense_plan`), so a repeated request pays
    for a dictionary lookup, two allocations and the launch.

    answer: "launch"; "empty" (an output has no element: return the allocations); or
    "no_keys" (seqlen_k == 0: out 0, lse -inf). `readable` is False when q, k or v has
    strides TMA cannot read (they are copied on each call).
    """

    answer: Literal["launch", "empty", "no_keys"]
    out_shape: tuple[int, int, int, int]
    lse_shape: tuple[int, int, int]
    dtype: torch.dtype
    device: torch.device
    readable: bool = True
    kernel: KernelFn | None = None
    # One query per sequence: the request as KV-cache decode (`_decode_route`), run
    # instead of `kernel` as decode(q, k, v) -> (out, lse).
    decode: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    counted: bool = False  # the kernel takes a zeroed tile counter (`tile_counter`)
    # softmax_scale, causal offset, max_seqlen_q (0: dense), splits, CTAs of a persistent launch
    scalars: tuple[float, int, int, int, int] = (1.0, 0, 0, 1, 1)
    # A view (lse_shape) of the device's LSE scratch for calls that drop the LSE
    # (`run_dense`); None for problems larger than LSE_SCRATCH_FLOATS.
    lse_scratch: Tensor | None = field(default=None, compare=False, repr=False)
    # The outputs' contiguous strides (`torch.empty_strided` allocates faster than `empty`).
    out_stride: tuple[int, ...] = field(init=False)
    lse_stride: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_stride", contiguous_strides(self.out_shape))
        object.__setattr__(self, "lse_stride", contiguous_strides(self.lse_shape))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of `shape` (as `torch.empty(shape).stride()`)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def dense_plan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    softmax_scale: float,
    causal_top_left: bool,
) -> DensePlan:
    """The plan of a dense request (loading its kernel on first use), memoized.

    Raises:
        UnsupportedError: no registered kernel serves the request.
    """
    key = (
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device,
        causal, softmax_scale, causal_top_left,
    )  # fmt: skip
    plan = _DENSE_PLANS.get(key)
    if plan is not None:
        return plan
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    shapes = ((batch, seqlen_q, num_heads, v.shape[-1]), (batch, num_heads, seqlen_q))
    if math.prod(shapes[0]) == 0:
        return remember(_DENSE_PLANS, key, DensePlan("empty", *shapes, q.dtype, q.device))
    if seqlen_k == 0:
        return remember(_DENSE_PLANS, key, DensePlan("no_keys", *shapes, q.dtype, q.device))
    if v.shape[-1] != head_dim:
        raise UnsupportedError(
            "no sparsek kernel for this input",
            [f"value head_dim={v.shape[-1]} must equal query head_dim={head_dim}"],
        )
    offset = causal_offset(seqlen_q, seqlen_k, causal_top_left) if causal else 0
    if seqlen_q == 1:
        visible = min(seqlen_k, offset + 1) if causal else seqlen_k
        decode = _decode_route(q, k, v, visible, softmax_scale)
        if decode is not None:
            return remember(_DENSE_PLANS, key, DensePlan(
                "launch", *shapes, q.dtype, q.device, decode=decode
            ))  # fmt: skip
    sms = num_sms(q.device.index)
    variant = dense_variant(batch, seqlen_q, num_heads, causal, sms)
    kernel = _launcher(q.device, head_dim, q.dtype, causal, variant)
    return remember(_DENSE_PLANS, key, DensePlan(
        "launch", *shapes, q.dtype, q.device,
        readable=all(tma_strides_ok(t) for t in (q, k, v)),
        kernel=kernel,
        counted=takes_tile_counter(q.device, head_dim, q.dtype, causal, variant),
        scalars=(float(softmax_scale), offset, 0, 1, sms),
        lse_scratch=lse_scratch(q.device, shapes[1]),
    ))  # fmt: skip


_DENSE_PLANS: dict[tuple[object, ...], DensePlan] = {}

# Dense calls that drop the LSE (`run_dense(..., lse_wanted=False)`: `sparsek.attention`
# without return_lse, the SDPA drop-in) let the kernel write it into a per-device scratch
# of this many float32 when it fits: on small problems a second allocation is a sixth of
# the host's time per call (perf/NOTES.md #38). Nothing reads the scratch, so kernels
# that overwrite one another's rows in it (other streams, graph replays) do no harm.
LSE_SCRATCH_FLOATS = 1 << 16


def lse_scratch(device: torch.device, shape: tuple[int, ...]) -> Tensor | None:
    """A `shape` view of `device`'s LSE scratch; None when it is too small."""
    size = math.prod(shape)
    if size > LSE_SCRATCH_FLOATS:
        return None
    scratch = _LSE_SCRATCH.get(device)
    if scratch is None:
        scratch = torch.empty(LSE_SCRATCH_FLOATS, dtype=torch.float32, device=device)
        _LSE_SCRATCH[device] = scratch
    return scratch[:size].view(shape)


_LSE_SCRATCH: dict[torch.device, Tensor] = {}


def _decode_route(
    q: Tensor, k: Tensor, v: Tensor, visible: int, softmax_scale: float
) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """A dense request with one query per sequence, which sees its first `visible` keys,
    as decode against a contiguous KV cache (`attention_with_kvcache`): the query heads
    of a KV head share one tile, and split-KV fills the GPU when the batch does not. None
    when no decode kernel serves it (the dense kernels do)."""
    from sparsek import ops_kvcache_cuda  # it imports this module

    seqlens = torch.full((q.shape[0],), visible, dtype=torch.int32, device=q.device)
    meta = (seqlens, None, None, None, False)
    plan = ops_kvcache_cuda.kvcache_plan(q, k, v, *meta, 0)
    if isinstance(plan, str):
        return None
    run = ops_kvcache_cuda.attention_with_kvcache
    return lambda q, k, v: run(q, k, v, *meta, softmax_scale, 0, plan)


def run_dense(
    plan: DensePlan, q: Tensor, k: Tensor, v: Tensor, lse_wanted: bool = True
) -> tuple[Tensor, Tensor]:
    """Run a dense request by its `dense_plan` (no host synchronization: capturable).

    `lse_wanted=False` (the caller drops the LSE): a small problem's kernel writes it into
    the plan's `lse_scratch` instead of a fresh allocation; the returned lse is then that
    scratch, which later calls overwrite."""
    if plan.decode is not None:  # allocates its own outputs
        return plan.decode(q, k, v)
    out = _empty(plan.out_shape, plan.dtype, plan.device, plan.out_stride)
    if lse_wanted or plan.lse_scratch is None:
        lse = _empty(plan.lse_shape, torch.float32, plan.device, plan.lse_stride)
    else:
        lse = plan.lse_scratch
    if plan.answer != "launch":
        if plan.answer == "no_keys":
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse
    if not plan.readable or (q.data_ptr() | k.data_ptr() | v.data_ptr()) % _ALIGN_BYTES:
        q, k, v = tma_compatible(q), tma_compatible(k), tma_compatible(v)
    counter = zeroed_counter(plan.device) if plan.counted else None
    kernel = plan.kernel
    assert kernel is not None
    launch(plan.device, kernel, q, k, v, out, lse, None, None, None, None, counter, *plan.scalars)
    return out, lse


# Memoized plans are dropped all at once when there are this many (a serving engine's
# request shapes vary with each step's token count: the set is bounded only by use).
MAX_PLANS = 4096

_K = TypeVar("_K")
_V = TypeVar("_V")


def remember(memo: dict[_K, _V], key: _K, value: _V) -> _V:
    """`memo[key] = value`, emptying `memo` first when it holds `MAX_PLANS` entries."""
    if len(memo) >= MAX_PLANS:
        memo.clear()
    memo[key] = value
    return value


def dense_variant(batch: int, seqlen_q: int, num_heads: int, causal: bool, sms: int) -> Variant:
    """The registry variant of a dense request: problems whose 64-row query tiles fit in
    one wave of CTAs (`registry.ONE_WAVE`) and long causal queries (`registry.LONG_Q`)
    take other tiles and schedules."""
    if batch * num_heads * -(-seqlen_q // ONE_WAVE_TILE_M) <= sms:
        return ONE_WAVE
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
    if device.index is None or _one_device() or device.index == torch.cuda.current_device():
        kernel(*args)
    else:
        with torch.cuda.device(device):
            kernel(*args)


@functools.cache
def _one_device() -> bool:
    """One CUDA device visible: it is the current one (`launch` skips the ~1.5 us query)."""
    return torch.cuda.device_count() == 1


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
    """A `zeroed_counter` if the kernel `_launcher` loaded for these arguments takes one,
    else None."""
    if takes_tile_counter(device, head_dim, dtype, causal, variant):
        return zeroed_counter(device)
    return None


def zeroed_counter(device: torch.device) -> Tensor:
    """A zeroed int32 work-tile counter, allocated per call so that launches on concurrent
    streams never share one."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def takes_tile_counter(
    device: torch.device, head_dim: int, dtype: torch.dtype, causal: bool, variant: Variant
) -> bool:
    """Whether the kernel `_launcher` loaded for these arguments takes its work tiles from
    a zeroed global counter (`FmhaFwdConfig.dynamic_schedule`). Call it after `_launcher`."""
    return (device.index, head_dim, dtype, causal, variant) in _COUNTED


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


def _empty(
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
