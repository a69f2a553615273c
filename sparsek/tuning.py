"""How each registered kernel is tuned: tile shapes, pipeline depth and schedule.

The registry (`sparsek.registry`) says *which* kernels exist: (arch, head dim, dtype,
mask, layout). This module says *how* each is built, row by row, every row with the
measurement that chose it. A request also carries a `Workload`, the shape class the host
read off its sizes (long causal queries, a problem that fits one wave of CTAs, decode),
which picks among rows of the same kernel identity.

A head dim or an architecture is registered by a row of `BASE` (its (arch, head_dim)
key); the other tables override it for their workload. Benchmarks that compare tunings
swap a row in for a while with `override` (never by writing into the tables).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from cutedsl_kernels.config import DENSE, PACKED, Layout, MaskSpec


@dataclass(frozen=True)
class Tuning:
    """Compile-time tuning of one (arch, head_dim) row; fields are `FmhaFwdConfig`'s."""

    tile_m: int
    tile_n: int
    num_stages: int
    intra_wg_overlap: bool = True
    wg_pingpong: bool = True
    # Dense kernels of the row loop over work units on one CTA per SM.
    persistent: bool = False
    # ... taking work tiles from a global counter (packed queries always do), longest
    # first across the heads whose K/V take up to this many MiB (dense).
    dynamic_schedule: bool = False
    l2_group_mb: int = 0
    # CTAs resident per SM (budgeted shared memory and registers; see `FmhaFwdConfig`).
    ctas_per_sm: int = 1
    # K/V loads hint the L2 to evict their lines first (each byte is read once: decode).
    kv_evict_first: bool = False
    # FP8 rows: O gathers each key tile's PV product in float32 (two-level accumulation).
    pv_two_level: bool = True
    # FP8 caches: K/V tiles converted in 8-element vectors (False: element by element).
    convert_vectorized: bool = True


class Workload(enum.Enum):
    """The shape class of a request, read off its sizes by the host (never its values)."""

    DEFAULT = "default"
    # Dense causal queries, at least LONG_SEQLEN_Q of them: `LONG_CAUSAL` rows.
    LONG_Q = "long_q"
    # Dense queries whose ONE_WAVE_TILE_M-row tiles fit in one wave: `ONE_WAVE` rows.
    ONE_WAVE = "one_wave"
    # One query per sequence against a cache, the query heads of each KV head as a tile's
    # rows (non-causal, batched q): `DECODE` rows.
    DECODE = "decode"
    # Decode with at least one (sequence, KV head) tile per SM, never split:
    # `DECODE_FILLS_GPU` rows.
    DECODE_FILLS_GPU = "decode_fills_gpu"


DENSE_WORKLOADS = (Workload.DEFAULT, Workload.LONG_Q, Workload.ONE_WAVE)
DECODE_WORKLOADS = (Workload.DECODE, Workload.DECODE_FILLS_GPU)

# (arch, head_dim) -> tuning, measured on H100 and H200 (perf/NOTES.md). d128: 128x128
# with the overlapped, ping-pong main loop. d64: 192x128 (three MMA warpgroups) is +15% at
# S=8k non-causal; causal keeps 128x128 but for long queries (`LONG_CAUSAL`).
# d32, d96, d192, d256 (issue: head dims): first rows, chosen on the CPU from the compiled
# kernels (no spill, no wgmma serialized by ptxas for want of registers, shared memory that
# fits); GPU measurements replace them row by row. d32 as d64. d96: 192x112, the widest
# 192-row tile whose three MMA warpgroups stay within 160 registers (192x128 and FA3/FA4's
# 192x144 serialize every wgmma). d192 and d256 are not persistent (two Q buffers do not fit
# beside two K/V stages): 128x112 and FlashAttention-3/4's 128x80.
BASE: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 32): Tuning(tile_m=192, tile_n=128, num_stages=2, persistent=True),
    ("sm_90a", 64): Tuning(tile_m=192, tile_n=128, num_stages=2, persistent=True),
    ("sm_90a", 96): Tuning(tile_m=192, tile_n=112, num_stages=2, persistent=True),
    ("sm_90a", 128): Tuning(tile_m=128, tile_n=128, num_stages=2, persistent=True),
    ("sm_90a", 192): Tuning(tile_m=128, tile_n=112, num_stages=2),
    ("sm_90a", 256): Tuning(tile_m=128, tile_n=80, num_stages=2),
}
# Causal rows that differ from the table above.
CAUSAL: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 32): Tuning(tile_m=128, tile_n=128, num_stages=2, persistent=True),
    ("sm_90a", 64): Tuning(tile_m=128, tile_n=128, num_stages=2, persistent=True),
    ("sm_90a", 96): Tuning(tile_m=128, tile_n=128, num_stages=2, persistent=True),
}
# Dense causal requests of at least LONG_SEQLEN_Q queries (`Workload.LONG_Q`). d64: 192x128
# against 128x128 (persistent, H200, perf/NOTES.md #17): x0.67 / 0.85 / 0.93 at S = 512 /
# 1k / 2k, x1.03 / 1.07 / 1.12 at 4k / 8k / 16k. Both take their tiles from a counter,
# longest first across groups of heads (#18, #20): with many equal pairs the static
# schedule's last round is part-empty. d64 gained +2-2.5% at 4k-32k with 24 MiB groups;
# d128 lost 1-3% at 8k-16k with them and gains +3-4% at 16k-32k one head at a time (8 MiB).
LONG_SEQLEN_Q = 4096
LONG_CAUSAL: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 32): Tuning(192, 128, 2, persistent=True, dynamic_schedule=True, l2_group_mb=24),
    ("sm_90a", 64): Tuning(192, 128, 2, persistent=True, dynamic_schedule=True, l2_group_mb=24),
    ("sm_90a", 96): Tuning(128, 128, 2, persistent=True, dynamic_schedule=True, l2_group_mb=8),
    ("sm_90a", 128): Tuning(128, 128, 2, persistent=True, dynamic_schedule=True, l2_group_mb=8),
}
# Dense problems whose 64-row query tiles all fit in one wave, a CTA per SM
# (`Workload.ONE_WAVE`, non-persistent): the latency of a small problem is that of one
# tile, so halving its rows (one MMA warpgroup, twice the CTAs) halves it. CUDA-graph
# replays on the H200 (perf/NOTES.md #32): B1 H8 S512 d64 11.2 -> 6.9 us, S128 6.6 -> 4.7,
# B1 H16 S512 d128 11.2 -> 8.9; with more 64-row tiles than SMs the 128-row tiles win
# (B1 H16 S1k d128 17.3 against 22.9).
ONE_WAVE_TILE_M = 64
ONE_WAVE: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 32): Tuning(tile_m=ONE_WAVE_TILE_M, tile_n=128, num_stages=2),
    ("sm_90a", 64): Tuning(tile_m=ONE_WAVE_TILE_M, tile_n=128, num_stages=2),
    ("sm_90a", 96): Tuning(tile_m=ONE_WAVE_TILE_M, tile_n=128, num_stages=2),
    ("sm_90a", 128): Tuning(tile_m=ONE_WAVE_TILE_M, tile_n=128, num_stages=2),
    ("sm_90a", 192): Tuning(tile_m=ONE_WAVE_TILE_M, tile_n=112, num_stages=2),
    ("sm_90a", 256): Tuning(tile_m=ONE_WAVE_TILE_M, tile_n=80, num_stages=2),
}
# Packed queries and keys (`attention_varlen`): the persistent CTAs take (query tile, head)
# tiles heads fastest, in groups of heads whose K/V of the longest sequence take up to this
# many MiB (see `FmhaFwdConfig.l2_group_mb`). All heads at once read the whole K/V of a
# long sequence per head in flight: d128 H16 (H200, perf/NOTES.md #34) 16 MiB against all
# heads: 1 x 16k +9% / +4% (non-causal / causal), 2 x 8k +6% / +3%, 4 x 4k +5% / -1%,
# the suite's mixed lengths (<= 4k) +2% / 0%; sequences of <= 1k keep every head in one group.
PACKED_L2_GROUP_MB = 16
# Decode (`Workload.DECODE`): a tile's rows are the few query heads that share a KV head,
# so a 64-row tile (one MMA warpgroup) does half the tensor-core and softmax work of a
# 128-row one for the same bytes of K/V (perf/NOTES.md #12).
# d128 decode loads K/V evict-first (H200, perf/NOTES.md #45): with a clean L2, B1 16k
# +7% / +1% (16- / 64-token pages), B8 4k +3% / +2%, the rest within +-1%; after a flush
# that leaves the L2 full of dirty lines, +6-10% at 32-128 MiB of K/V, -3-6% from 512 MiB.
DECODE: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 32): Tuning(tile_m=64, tile_n=128, num_stages=2),
    ("sm_90a", 64): Tuning(tile_m=64, tile_n=128, num_stages=2),
    ("sm_90a", 96): Tuning(tile_m=64, tile_n=128, num_stages=2, kv_evict_first=True),
    ("sm_90a", 128): Tuning(tile_m=64, tile_n=128, num_stages=2, kv_evict_first=True),
    ("sm_90a", 192): Tuning(tile_m=64, tile_n=112, num_stages=2, kv_evict_first=True),
    ("sm_90a", 256): Tuning(tile_m=64, tile_n=80, num_stages=2, kv_evict_first=True),
}
# Decode with at least one (sequence, KV head) tile per SM (`Workload.DECODE_FILLS_GPU`,
# never split): two CTAs per SM, each one's prologue and epilogue under the other's main
# loop. d128 (H200, perf/NOTES.md #31): 64x64 tiles (83 KiB of shared memory) at 2 CTAs per
# SM against 64x128 at 1: B128 1k +3-7%, B32 1k +5-6%, 4k +0-2%; at B <= 8 (fewer CTAs,
# split) they are even or slower, and 64x64 at 1 CTA per SM is 2-8% slower everywhere.
# d64 (H200, perf/NOTES.md #49): its 64x128 tile (72 KiB of tiles) at 2 CTAs per SM,
# evict-first, against 1 CTA per SM: B32 +2-15%, B128 +5-17% (1k-16k; 0.80-0.95 of cuDNN
# before, 0.94-0.99 after); evict-first alone is within +-1% there, and -4% at B1 1k
# (split rows).
DECODE_FILLS_GPU: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 32): Tuning(tile_m=64, tile_n=128, num_stages=2, ctas_per_sm=2, kv_evict_first=True),
    ("sm_90a", 96): Tuning(tile_m=64, tile_n=64, num_stages=2, ctas_per_sm=2, kv_evict_first=True),
    ("sm_90a", 64): Tuning(tile_m=64, tile_n=128, num_stages=2, ctas_per_sm=2, kv_evict_first=True),
    ("sm_90a", 128): Tuning(tile_m=64, tile_n=64, num_stages=2, ctas_per_sm=2, kv_evict_first=True),
}

# (arch, head_dim, head_dim_v) -> tuning of a value head dim below the query's (issue: head
# dims): DeepSeek-style MLA prefill, q/k 192 wide and v/o 128. V's tiles are 128 wide, so
# 128x128 tiles fit beside Q's (d192's own 128x112 leaves room for 192-wide V). Not
# persistent (as d192); one-wave and decode requests take 64-row tiles, decode evict-first.
VALUE_HEAD_DIMS: dict[tuple[str, int, int], Tuning] = {
    ("sm_90a", 192, 128): Tuning(tile_m=128, tile_n=128, num_stages=2),
}

# The tables by name (`override`'s first argument).
# FP8 (E4M3) kernels, (arch, head_dim) -> tuning, every mask and layout (dense, packed):
# one CTA per work tile (the kernels also compile persistent, without spills: unmeasured;
# `perf/lab/ab_fp8.py --variant persistent=1` times it), O written from registers. First
# rows, chosen on the CPU from the compiled kernels: 128x128 tiles and two stages at d64
# and d128 compile without spills (168 registers at d128 with the second output
# accumulator). FlashAttention-3 uses 128x224 at d128 and 192x160 at d64; GPU
# measurements replace these rows.
# FP8 caches under 16-bit queries take the `DECODE` rows (64-row tiles: one MMA warpgroup
# converts the cache's tiles) for decode and longer queries alike (without evict-first
# there: a sequence's query tiles share its K/V tiles), never `DECODE_FILLS_GPU`'s two
# CTAs per SM.
FP8: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 64): Tuning(tile_m=128, tile_n=128, num_stages=2),
    ("sm_90a", 128): Tuning(tile_m=128, tile_n=128, num_stages=2),
}

TABLES: dict[str, dict[tuple[str, int], Tuning]] = {
    "base": BASE,
    "causal": CAUSAL,
    "long_causal": LONG_CAUSAL,
    "one_wave": ONE_WAVE,
    "decode": DECODE,
    "decode_fills_gpu": DECODE_FILLS_GPU,
    "fp8": FP8,
}

_ON_CHANGE: list[Callable[[], None]] = []


def head_dims(arch: str) -> list[int]:
    """Head dims with a `BASE` row for `arch`, sorted (empty when the arch has none)."""
    return sorted(head_dim for a, head_dim in BASE if a == arch)


def value_head_dims(arch: str, head_dim: int) -> list[int]:
    """Value head dims served with `head_dim` on `arch`: head_dim itself (when it has a
    `BASE` row), then those of `VALUE_HEAD_DIMS` rows, descending."""
    own = [head_dim] if (arch, head_dim) in BASE else []
    return own + sorted(
        (v for a, d, v in VALUE_HEAD_DIMS if (a, d) == (arch, head_dim)), reverse=True
    )


def fp8_head_dims(arch: str) -> list[int]:
    """Head dims with an `FP8` row for `arch`, sorted."""
    return sorted(head_dim for a, head_dim in FP8 if a == arch)


def arches() -> list[str]:
    """Architectures with at least one `BASE` row, sorted."""
    return sorted({arch for arch, _ in BASE})


def tuning_for(
    arch: str,
    head_dim: int,
    mask: MaskSpec,
    layout: Layout,
    workload: Workload,
    head_dim_v: int | None = None,
) -> Tuning:
    """The tuning of a registered (arch, head_dim[, head_dim_v]) for a request's mask,
    layout and workload (the registry has checked that they go together).

    Raises:
        KeyError: (arch, head_dim) has no `BASE` row, or (arch, head_dim, head_dim_v) no
            `VALUE_HEAD_DIMS` row.
    """
    if head_dim_v is not None and head_dim_v != head_dim:
        tuning = VALUE_HEAD_DIMS[(arch, head_dim, head_dim_v)]
        if workload is Workload.ONE_WAVE or workload in DECODE_WORKLOADS:
            tuning = replace(tuning, tile_m=ONE_WAVE_TILE_M)
        if workload in DECODE_WORKLOADS:
            tuning = replace(tuning, kv_evict_first=True)
        return tuning
    key = (arch, head_dim)
    tuning = BASE[key]
    if mask.causal:
        tuning = CAUSAL.get(key, tuning)
        if workload is Workload.LONG_Q:
            tuning = LONG_CAUSAL.get(key, tuning)
    if workload is Workload.ONE_WAVE:
        tuning = ONE_WAVE.get(key, tuning)
    if layout == PACKED:
        # Packed tiles are unequal: a persistent kernel counts them out on the device,
        # heads fastest within groups of heads (`PACKED_L2_GROUP_MB`).
        group_mb = PACKED_L2_GROUP_MB if tuning.persistent else 0
        tuning = replace(tuning, dynamic_schedule=tuning.persistent, l2_group_mb=group_mb)
    elif layout != DENSE or workload is Workload.ONE_WAVE:
        # Only dense and packed problems have a persistent schedule (see
        # `FmhaFwdConfig.persistent`); one wave has nothing to loop over.
        tuning = replace(tuning, persistent=False, dynamic_schedule=False)
    if workload in DECODE_WORKLOADS:
        tuning = DECODE.get(key, tuning)
    if workload is Workload.DECODE_FILLS_GPU:
        tuning = DECODE_FILLS_GPU.get(key, tuning)
    return tuning


def on_change(callback: Callable[[], None]) -> None:
    """Call `callback` whenever `override` changes a table (memos of its answers)."""
    _ON_CHANGE.append(callback)


@contextmanager
def override(table: str, arch: str, head_dim: int, tuning: Tuning | None) -> Iterator[None]:
    """Within the block, row (arch, head_dim) of table `table` (a key of `TABLES`) is
    `tuning` (None: no row, so the row below it applies); restored afterwards. For
    benchmarks comparing tunings; kernels loaded inside the block are forgotten on exit.

    Raises:
        KeyError: `table` is not a table name.
    """
    rows = TABLES[table]
    key = (arch, head_dim)
    saved = rows.get(key)
    _set_row(rows, key, tuning)
    try:
        yield
    finally:
        _set_row(rows, key, saved)


def _set_row(
    rows: dict[tuple[str, int], Tuning], key: tuple[str, int], tuning: Tuning | None
) -> None:
    if tuning is None:
        rows.pop(key, None)
    else:
        rows[key] = tuning
    for callback in _ON_CHANGE:
        callback()
