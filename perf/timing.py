"""Timers: device time per call (CUDA events, cold L2), eager wall time, CUDA-graph replay,
and the copy bandwidth the decode suite's rows are compared with.

The timers return the median in milliseconds. `time_kernel` also works on CPU (perf_counter)
so the dry run exercises the same loop.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# Larger than H100's 50 MiB L2: streaming it through the L2 before each timed call evicts
# the inputs, so every provider starts from DRAM as in a real model step.
_L2_FLUSH_BYTES = 256 * 1024 * 1024
# How `time_kernel` empties the L2 before each timed call (`l2_flush`):
# "read" sums the buffer: the L2 then holds clean lines, as after a model step's weight
#   reads (the default since perf/NOTES.md #46);
# "write" zeroes it (triton's do_bench; this suite's results before #45): the L2 is then
#   full of dirty lines, whose write-back to DRAM the timed call pays for as its own
#   traffic evicts them (on the H200, a 128 MiB copy reads 3.93 TB/s after it against
#   4.15 after a read flush).
L2_FLUSHES = ("read", "write")
L2_FLUSH = "read"


class NotMeasurable(RuntimeError):
    """This kind of measurement cannot be taken here (e.g. CUDA graphs on a CPU dry run)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timing_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def _estimate_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return max((time.perf_counter() - start) * 1e3, 1e-3)


def time_kernel(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 10,
    max_reps: int = 1000,
    graph: bool = False,
    l2_flush: str | None = None,
) -> float:
    """Median time of one call: warm-up, then `rep_ms` worth of individually timed calls.

    On CUDA each call sits between two events with a fresh L2 flush before it (`l2_flush`,
    one of `L2_FLUSHES`; None: `L2_FLUSH`); on CPU each call is timed with perf_counter.
    `graph` (CUDA): the call is captured once in a CUDA graph and its replays are timed, so
    a call of several kernels is timed without the host's gaps between their launches
    (raises if `fn` cannot be captured).
    """
    l2_flush = L2_FLUSH if l2_flush is None else l2_flush
    if l2_flush not in L2_FLUSHES:
        raise ValueError(f"l2_flush={l2_flush!r}: expected one of {L2_FLUSHES}")
    if graph and device.type == "cuda":
        fn = _captured(fn, device, warmup=3)
    est = _estimate_ms(fn, device)
    for _ in range(max(3, int(warmup_ms / est))):
        fn()
    reps = min(max_reps, max(min_reps, int(rep_ms / est)))
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    flush = torch.zeros(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    empty_l2 = flush.zero_ if l2_flush == "write" else lambda: flush.sum(dtype=torch.int32)
    starts = [_timing_event() for _ in range(reps)]
    ends = [_timing_event() for _ in range(reps)]
    _sync(device)
    for start_event, end_event in zip(starts, ends, strict=True):
        empty_l2()
        start_event.record()
        fn()
        end_event.record()
    _sync(device)
    return float(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)))


def time_eager(
    fn: Callable[[], object],
    device: torch.device,
    *,
    calls: int = 50,
    reps: int = 30,
    warmup: int = 10,
) -> float:
    """Median wall time per call of `calls` back-to-back calls (host overhead included, hot L2)."""
    for _ in range(warmup):
        fn()
    per_call = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        per_call.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(per_call)


def time_graph(
    fn: Callable[[], object],
    device: torch.device,
    *,
    calls: int = 50,
    reps: int = 30,
    warmup: int = 3,
) -> float:
    """Capture one call in a CUDA graph (after warm-up on a side stream); time its replays."""
    if device.type != "cuda":
        raise NotMeasurable("CUDA graphs need a CUDA device")
    replay = _captured(fn, device, warmup=warmup)
    return time_eager(replay, device, calls=calls, reps=reps, warmup=warmup)


def _captured(fn: Callable[[], object], device: torch.device, *, warmup: int) -> Callable[[], None]:
    """The replay of a CUDA graph holding one call of `fn` (warmed up on a side stream)."""
    side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    _sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    replay: Callable[[], None] = graph.replay
    return replay


def copy_bandwidth_gbps(
    device: torch.device,
    nbytes: int,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    l2_flush: str | None = None,
) -> float:
    """GB/s (1e9 bytes/s) of a device-to-device copy of `nbytes`, counting bytes read + written.

    The practical ceiling a memory-bound kernel (decode attention) is measured against; timed
    like a kernel row (median, each call after an L2 flush; `nbytes` should dwarf the L2).
    """
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_kernel(
        lambda: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms, l2_flush=l2_flush
    )
    return 2 * nbytes / (ms * 1e-3) / 1e9
