"""Dense attention on the GPU: `sparsek::attention`'s CUDA implementation.

    q: (batch, seqlen_q, num_heads, head_dim)      k, v: (batch, seqlen_k, num_kv_heads, d)
    out: like q, contiguous;  lse: (batch, num_heads, seqlen_q) float32, contiguous

A request's launch (kernel, workload, outputs' shapes, whether TMA reads the inputs in
place) follows from its signature (shapes, strides, dtype, device, flags) and is worked
out once (`dense_plan`), so a repeated request pays for a dictionary lookup, two
allocations and the launch. Inputs whose strides or alignment break TMA's rules are
copied first; zero-size problems and seqlen_k == 0 are answered without a launch; one
query per sequence runs the KV-cache decode kernels (`decode_route`; with every mask but
a top-left aligned window). Masks (`sparsek.masks.Mask`): causal, sliding window, softcap and sinks
choose the kernel's `MaskSpec`; their sizes are launch arguments. No host
synchronization on this path, so it can be captured in a CUDA graph (after one warm-up
call has compiled/loaded the kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from cutedsl_kernels.abi import call_fmha_fwd
from sparsek import memo
from sparsek.fp8 import output_dtype
from sparsek.launch import fp8, kvcache, launcher
from sparsek.launch.launcher import ForwardKernel, contiguous_strides
from sparsek.launch.tma import ALIGN_BYTES, one_kv_head, tma_compatible, tma_strides_ok
from sparsek.masks import NO_MASK, Mask, make_mask
from sparsek.reference import causal_offset
from sparsek.tuning import LONG_SEQLEN_Q, ONE_WAVE_TILE_M, Workload


@dataclass(frozen=True)
class DensePlan:
    """What a dense request of one signature allocates and launches (`dense_plan`).

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
    kernel: ForwardKernel | None = None
    # One query per sequence: the request as KV-cache decode (`decode_route`), run
    # instead of `kernel` as decode(q, k, v) -> (out, lse).
    decode: Callable[[Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]] | None = None
    softmax_scale: float = 1.0
    causal_offset: int = 0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    sinks: bool = False  # the kernel takes sink logits (passed per call)
    num_ctas: int = 1  # CTAs of a persistent launch (the SM count)
    # A view (lse_shape) of the device's LSE scratch for calls that drop the LSE
    # (`run_dense`); None for problems larger than LSE_SCRATCH_FLOATS.
    lse_scratch: Tensor | None = field(default=None, compare=False, repr=False)
    # The outputs' contiguous strides (`torch.empty_strided` allocates faster than `empty`).
    out_stride: tuple[int, ...] = field(init=False)
    lse_stride: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_stride", contiguous_strides(self.out_shape))
        object.__setattr__(self, "lse_stride", contiguous_strides(self.lse_shape))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    softmax_scale: float,
    causal_top_left: bool,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The CUDA implementation of `sparsek::attention` (see the module docstring; the mask
    arguments as `sparsek.masks` defines them, already checked).

    Raises:
        UnsupportedError: no registered kernel serves the request (callers wanting a
            fallback decide before calling). FP8 inputs (with descales) run on the FP8
            kernels (`sparsek.launch.fp8`).
    """
    if q_descale is not None and k_descale is not None and v_descale is not None:
        mask = make_mask(causal, (window_left, window_right), softcap, sinks is not None)
        descales = (q_descale, k_descale, v_descale)
        out_type = output_dtype(q.dtype, out_dtype)
        return fp8.attention_fp8(
            q, k, v, mask, softmax_scale, causal_top_left, sinks, descales, out_type
        )
    k, v = one_kv_head(k, v)
    mask = make_mask(causal, (window_left, window_right), softcap, sinks is not None)
    plan = dense_plan(q, k, v, mask, softmax_scale, causal_top_left)
    return run_dense(plan, q, k, v, sinks=sinks)


def dense_plan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask,
    softmax_scale: float,
    causal_top_left: bool,
) -> DensePlan:
    """The plan of a dense request (loading its kernel on first use), memoized.

    Raises:
        UnsupportedError: no registered kernel serves the request.
    """
    key = (
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device,
        mask, softmax_scale, causal_top_left,
    )  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        plan = memo.remember(
            _PLANS, key, _build_plan(q, k, v, mask, softmax_scale, causal_top_left)
        )
    return plan


_PLANS: dict[tuple[object, ...], DensePlan] = {}
memo.register(_PLANS.clear)


def _build_plan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask,
    softmax_scale: float,
    causal_top_left: bool,
) -> DensePlan:
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    shapes = ((batch, seqlen_q, num_heads, v.shape[-1]), (batch, num_heads, seqlen_q))
    if math.prod(shapes[0]) == 0:
        return DensePlan("empty", *shapes, q.dtype, q.device)
    if seqlen_k == 0:
        return DensePlan("no_keys", *shapes, q.dtype, q.device)
    causal = mask.causal
    offset = 0
    if causal or mask.window:
        offset = causal_offset(seqlen_q, seqlen_k, causal_top_left)
    # One query: the decode kernels, for every mask aligned as the cache aligns it
    # (bottom-right); a top-left causal query sees its first offset + 1 keys.
    if seqlen_q == 1 and (mask.is_plain or not causal_top_left):
        visible = min(seqlen_k, offset + 1) if causal and causal_top_left else seqlen_k
        decode = decode_route(q, k, v, visible, softmax_scale, mask)
        if decode is not None:
            return DensePlan("launch", *shapes, q.dtype, q.device, decode=decode)
    sms = launcher.num_sms(q.device.index)
    workload = dense_workload(batch, seqlen_q, num_heads, causal, sms)
    kernel = launcher.forward_kernel(
        q.device, head_dim, q.dtype, mask.spec, workload=workload, head_dim_v=v.shape[-1]
    )
    return DensePlan(
        "launch", *shapes, q.dtype, q.device,
        readable=all(tma_strides_ok(t) for t in (q, k, v)),
        kernel=kernel,
        softmax_scale=float(softmax_scale),
        causal_offset=offset,
        window_left=mask.window_left,
        window_right=mask.window_right,
        softcap=mask.softcap,
        sinks=mask.sinks,
        num_ctas=sms,
        lse_scratch=lse_scratch(q.device, shapes[1]),
    )  # fmt: skip


def dense_workload(batch: int, seqlen_q: int, num_heads: int, causal: bool, sms: int) -> Workload:
    """The workload of a dense request: problems whose 64-row query tiles fit in one wave
    of CTAs (`Workload.ONE_WAVE`) and long causal queries (`Workload.LONG_Q`) take other
    tiles and schedules."""
    if batch * num_heads * -(-seqlen_q // ONE_WAVE_TILE_M) <= sms:
        return Workload.ONE_WAVE
    return Workload.LONG_Q if causal and seqlen_q >= LONG_SEQLEN_Q else Workload.DEFAULT


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
        if launcher.capturing(device):  # the graph's pool would own it: not a scratch to keep
            return None
        scratch = torch.empty(LSE_SCRATCH_FLOATS, dtype=torch.float32, device=device)
        _LSE_SCRATCH[device] = scratch
    return scratch[:size].view(shape)


_LSE_SCRATCH: dict[torch.device, Tensor] = {}
memo.register(_LSE_SCRATCH.clear)


def decode_route(
    q: Tensor, k: Tensor, v: Tensor, visible: int, softmax_scale: float, mask: Mask = NO_MASK
) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]] | None:
    """A dense request with one query per sequence, which sees its first `visible` keys
    (through `mask`, aligned bottom-right, if it has a window), as decode against a
    contiguous KV cache (`attention_with_kvcache`): the query heads of a KV head share one
    tile, and split-KV fills the GPU when the batch does not. None when no decode kernel
    serves it (the dense kernels do). The returned function takes the sinks of a mask
    with sinks.

    The cache lengths (`visible` per sequence) are looked up per call, not held by the
    plan: a plan first made during CUDA-graph capture must not keep a tensor whose fill
    only the graph runs (`launcher.filled_int32`)."""
    batch, device = q.shape[0], q.device
    tail = (None, None, None, mask)
    plan = kvcache.kvcache_plan(q, k, v, launcher.filled_int32(device, batch, visible), *tail, 0)
    if isinstance(plan, str):
        return None
    run = kvcache.attention_with_kvcache

    def decode(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
        seqlens = launcher.filled_int32(device, batch, visible)
        return run(q, k, v, seqlens, *tail, softmax_scale, 0, plan, sinks)

    return decode


def run_dense(
    plan: DensePlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse_wanted: bool = True,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a dense request by its `dense_plan` (no host synchronization: capturable).

    `lse_wanted=False` (the caller drops the LSE): a small problem's kernel writes it into
    the plan's `lse_scratch` instead of a fresh allocation; the returned lse is then that
    scratch, which later calls overwrite. `sinks`: the (num_heads,) sink logits of a plan
    made with sinks."""
    if plan.decode is not None:  # allocates its own outputs
        return plan.decode(q, k, v, sinks)
    out = launcher.empty(plan.out_shape, plan.dtype, plan.device, plan.out_stride)
    if lse_wanted or plan.lse_scratch is None:
        lse = launcher.empty(plan.lse_shape, torch.float32, plan.device, plan.lse_stride)
    else:
        lse = plan.lse_scratch
    if plan.answer != "launch":
        if plan.answer == "no_keys":
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse
    if not plan.readable or (q.data_ptr() | k.data_ptr() | v.data_ptr()) % ALIGN_BYTES:
        q, k, v = tma_compatible(q), tma_compatible(k), tma_compatible(v)
    kernel = plan.kernel
    assert kernel is not None
    counter = launcher.zeroed_counter(plan.device) if kernel.takes_tile_counter else None
    with launcher.device_guard(plan.device):
        call_fmha_fwd(
            kernel.fn, q, k, v, out, lse,
            tile_counter=counter,
            sinks=None if sinks is None else sinks.view(1, -1),  # one logit per head
            softmax_scale=plan.softmax_scale,
            causal_offset=plan.causal_offset,
            window_left=plan.window_left,
            window_right=plan.window_right,
            softcap=plan.softcap,
            num_ctas=plan.num_ctas,
        )  # fmt: skip
    return out, lse
