"""Which FMHA forward kernel serves which (architecture, head_dim, dtype, causal) request.

All tuning lives in `_TUNING`: one row per (arch, head_dim). Supporting a new head dim
(32, 96, 256, ...) or a new architecture is a new row here, plus whatever the kernel's
`can_implement` accepts; nothing else in `sparsek` changes.

Architecture detection maps the CUDA compute capability to the DSL's target name
(9.0 -> "sm_90a", 10.0 -> "sm_100a"); the environment variable `SPARSEK_ARCH` overrides it
(useful to compile for a GPU that is not present, or to force a target).
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, replace

import torch

from cutedsl_kernels.config import (
    SUPPORTED_DTYPES,
    CombineConfig,
    FmhaFwdConfig,
    KernelConfig,
    KVStoreConfig,
)
from sparsek.errors import UnsupportedError

ARCH_ENV = "SPARSEK_ARCH"

# Compute capability (major, minor) -> DSL target. The "a" targets enable the
# architecture-specific instructions (wgmma, TMA multicast) the kernels rely on.
ARCH_BY_CAPABILITY: dict[tuple[int, int], str] = {
    (9, 0): "sm_90a",
    (10, 0): "sm_100a",
}


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


# (arch, head_dim) -> tuning, measured on H100 and H200 (perf/NOTES.md). d128: 128x128
# with the overlapped, ping-pong main loop. d64: 192x128 (three MMA warpgroups) is +15% at
# S=8k non-causal; causal keeps 128x128 but for long queries (`_LONG_CAUSAL_TUNING`).
_TUNING: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 64): Tuning(tile_m=192, tile_n=128, num_stages=2, persistent=True),
    ("sm_90a", 128): Tuning(tile_m=128, tile_n=128, num_stages=2, persistent=True),
}
# Causal rows that differ from the table above.
_CAUSAL_TUNING: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 64): Tuning(tile_m=128, tile_n=128, num_stages=2, persistent=True),
}
# Dense causal requests of at least LONG_SEQLEN_Q queries (`Variant.long_q`). d64: 192x128
# against 128x128 (persistent, H200, perf/NOTES.md #17): x0.67 / 0.85 / 0.93 at S = 512 /
# 1k / 2k, x1.03 / 1.07 / 1.12 at 4k / 8k / 16k. Both take their tiles from a counter,
# longest first across groups of heads (#18, #20): with many equal pairs the static
# schedule's last round is part-empty. d64 gained +2-2.5% at 4k-32k with 24 MiB groups;
# d128 lost 1-3% at 8k-16k with them and gains +3-4% at 16k-32k one head at a time (8 MiB).
LONG_SEQLEN_Q = 4096
_LONG_CAUSAL_TUNING: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 64): Tuning(192, 128, 2, persistent=True, dynamic_schedule=True, l2_group_mb=24),
    ("sm_90a", 128): Tuning(128, 128, 2, persistent=True, dynamic_schedule=True, l2_group_mb=8),
}
# Dense problems whose 64-row query tiles all fit in one wave, a CTA per SM (`Variant.one_wave`,
# non-persistent): the latency of a small problem is that of one tile, so halving its
# rows (one MMA warpgroup, twice the CTAs) halves it. CUDA-graph replays on the H200
# (perf/NOTES.md #32): B1 H8 S512 d64 11.2 -> 6.9 us, S128 6.6 -> 4.7, B1 H16 S512 d128
# 11.2 -> 8.9; with more 64-row tiles than SMs the 128-row tiles win (B1 H16 S1k d128
# 17.3 against 22.9).
ONE_WAVE_TILE_M = 64
_ONE_WAVE_TUNING: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 64): Tuning(tile_m=ONE_WAVE_TILE_M, tile_n=128, num_stages=2),
    ("sm_90a", 128): Tuning(tile_m=ONE_WAVE_TILE_M, tile_n=128, num_stages=2),
}
# Packed queries and keys (`attention_varlen`): the persistent CTAs take (query tile, head)
# tiles heads fastest, in groups of heads whose K/V of the longest sequence take up to this
# many MiB (see `FmhaFwdConfig.l2_group_mb`). All heads at once read the whole K/V of a
# long sequence per head in flight: d128 H16 (H200, perf/NOTES.md #34) 16 MiB against all
# heads: 1 x 16k +9% / +4% (non-causal / causal), 2 x 8k +6% / +3%, 4 x 4k +5% / -1%,
# the suite's mixed lengths (<= 4k) +2% / 0%; sequences of <= 1k keep every head in one group.
PACKED_L2_GROUP_MB = 16
# Decode (`Variant.decode`): a tile's rows are the few query heads that share a KV head,
# so a 64-row tile (one MMA warpgroup) does half the tensor-core and softmax work of a
# 128-row one for the same bytes of K/V (perf/NOTES.md #12).
# d128 decode loads K/V evict-first (H200, perf/NOTES.md #45): with a clean L2, B1 16k
# +7% / +1% (16- / 64-token pages), B8 4k +3% / +2%, the rest within +-1%; after a flush
# that leaves the L2 full of dirty lines, +6-10% at 32-128 MiB of K/V, -3-6% from 512 MiB.
_DECODE_TUNING: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 64): Tuning(tile_m=64, tile_n=128, num_stages=2),
    ("sm_90a", 128): Tuning(tile_m=64, tile_n=128, num_stages=2, kv_evict_first=True),
}
# Decode with at least one (sequence, KV head) tile per SM (`Variant.fills_gpu`, never
# split): two CTAs per SM, each one's prologue and epilogue under the other's main loop.
# d128 (H200, perf/NOTES.md #31): 64x64 tiles (83 KiB of shared memory) at 2 CTAs per SM
# against 64x128 at 1: B128 1k +3-7%, B32 1k +5-6%, 4k +0-2%; at B <= 8 (fewer CTAs,
# split) they are even or slower, and 64x64 at 1 CTA per SM is 2-8% slower everywhere.
# d64 (H200, perf/NOTES.md #49): its 64x128 tile (72 KiB of tiles) at 2 CTAs per SM, evict-first,
# against 1 CTA per SM: B32 +2-15%, B128 +5-17% (1k-16k; 0.80-0.95 of cuDNN before,
# 0.94-0.99 after); evict-first alone is within +-1% there, and -4% at B1 1k (split rows).
_DECODE_FILLS_GPU_TUNING: dict[tuple[str, int], Tuning] = {
    ("sm_90a", 64): Tuning(tile_m=64, tile_n=128, num_stages=2, ctas_per_sm=2, kv_evict_first=True),
    ("sm_90a", 128): Tuning(tile_m=64, tile_n=64, num_stages=2, ctas_per_sm=2, kv_evict_first=True),
}


@dataclass(frozen=True)
class Variant:
    """Where a request's sequences live: `FmhaFwdConfig`'s variable-length fields."""

    varlen_q: bool = False
    kv_layout: str = "dense"
    page_size: int = 0
    split_kv: bool = False
    # One query per sequence against a cache, the query heads of each KV head as a tile's
    # rows (non-causal, batched q): tiles from `_DECODE_TUNING`.
    decode: bool = False
    # (decode) at least one tile per SM without splitting: `_DECODE_FILLS_GPU_TUNING`.
    fills_gpu: bool = False
    # Dense queries, at least LONG_SEQLEN_Q of them: causal tiles from `_LONG_CAUSAL_TUNING`
    # where it has a row (otherwise the same kernel as DENSE).
    long_q: bool = False
    # Dense queries whose ONE_WAVE_TILE_M-row tiles fit in one wave: `_ONE_WAVE_TUNING`.
    one_wave: bool = False


DENSE = Variant()
LONG_Q = Variant(long_q=True)
ONE_WAVE = Variant(one_wave=True)
DENSE_VARIANTS = (DENSE, LONG_Q, ONE_WAVE)
PACKED = Variant(varlen_q=True, kv_layout="varlen")  # attention_varlen

# Variants precompiled by `python -m sparsek compile` (and compile-tested in CI) beside
# the dense kernels: attention_varlen, and attention_with_kvcache over a contiguous or a
# paged cache (vLLM's default page of 16 rows, and 64), with and without split-KV. Other
# page sizes (multiples of 16) compile at first use.
_PRECOMPILED_PAGE_SIZES = (16, 64)
_VARIANTS: tuple[Variant, ...] = (
    PACKED,
    *(
        Variant(varlen_q=varlen_q, kv_layout=kv, page_size=page, split_kv=split)
        for varlen_q in (False, True)
        for kv, page in (("cache", 0), *(("paged", p) for p in _PRECOMPILED_PAGE_SIZES))
        for split in (False, True)
    ),
    *(
        Variant(kv_layout=kv, page_size=page, split_kv=split, decode=True)
        for kv, page in (("cache", 0), *(("paged", p) for p in _PRECOMPILED_PAGE_SIZES))
        for split in (False, True)
    ),
    *(
        Variant(kv_layout=kv, page_size=page, decode=True, fills_gpu=True)
        for kv, page in (("cache", 0), *(("paged", p) for p in _PRECOMPILED_PAGE_SIZES))
    ),
    LONG_Q,
    ONE_WAVE,
)

# Dtypes and mask modes every registered row is compiled for.
_DTYPES: tuple[str, ...] = SUPPORTED_DTYPES
_CAUSAL_MODES: tuple[bool, ...] = (False, True)


def registered_arches() -> list[str]:
    """Architectures with at least one registered kernel, sorted."""
    return sorted({arch for arch, _ in _TUNING})


def registered_head_dims(arch: str) -> list[int]:
    """Head dims registered for `arch`, sorted (empty when the arch has none)."""
    return sorted(head_dim for a, head_dim in _TUNING if a == arch)


def registered_configs(arch: str) -> list[FmhaFwdConfig]:
    """Every kernel configuration registered for `arch` (empty for an unknown arch).

    Args:
        arch: DSL target name, e.g. "sm_90a".

    Returns:
        Configs ordered by head_dim, dtype, then non-causal before causal.
    """
    return [
        _make_config(arch, head_dim, dtype, is_causal)
        for head_dim in registered_head_dims(arch)
        for dtype in _DTYPES
        for is_causal in _CAUSAL_MODES
    ]


def registered_kernels(arch: str) -> list[KernelConfig]:
    """Every kernel precompiled for `arch`: dense, variable-length variants, combine, store.

    Returns:
        `registered_configs(arch)`, then each of them in every precompiled `Variant`,
        then the split-KV combine kernel and the paged KV-cache update kernel of each
        (head_dim, dtype).
    """
    dense = registered_configs(arch)
    variants = [
        _make_config(arch, c.head_dim, c.dtype, c.is_causal, variant)
        for c in dense
        for variant in _VARIANTS
        if not (variant.decode and c.is_causal)
    ]
    variants = [c for c in dict.fromkeys(variants) if c not in dense]  # LONG_Q = DENSE rows
    combine = [
        CombineConfig(arch, head_dim, dtype)
        for head_dim in registered_head_dims(arch)
        for dtype in _DTYPES
    ]
    store = [
        KVStoreConfig(arch, head_dim, dtype)
        for head_dim in registered_head_dims(arch)
        for dtype in _DTYPES
    ]
    return [*dense, *variants, *combine, *store]


def dtype_name(dtype: torch.dtype | str) -> str:
    """The registry's dtype name: "float16" for torch.float16 (strings pass through)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return dtype


def lookup(
    arch: str,
    head_dim: int,
    dtype: torch.dtype | str,
    is_causal: bool,
    variant: Variant = DENSE,
) -> FmhaFwdConfig:
    """The registered kernel configuration for a request.

    Args:
        arch: DSL target name, e.g. "sm_90a" (see `detect_arch`).
        head_dim: head dimension of Q, K and V.
        dtype: element type of Q/K/V, a torch dtype or its name ("float16", "bfloat16").
        is_causal: whether the causal mask is applied.
        variant: where the sequences live (packed, cached, paged; split-KV).

    Returns:
        The frozen config naming the kernel to compile and launch.

    Raises:
        UnsupportedError: no registered kernel fits; `reasons` lists why, including the
            kernel's own `can_implement` answer for the closest candidate.
    """
    found = find(arch, head_dim, dtype_name(dtype), bool(is_causal), variant)
    if isinstance(found, FmhaFwdConfig):
        return found
    raise UnsupportedError(
        f"no sparsek kernel for arch={arch}, head_dim={head_dim}, dtype={dtype_name(dtype)}, "
        f"causal={is_causal}" + ("" if variant == DENSE else f", {variant}"),
        found,
    )


def lookup_combine(arch: str, head_dim: int, dtype: torch.dtype | str) -> CombineConfig:
    """The split-KV combine kernel for outputs of `head_dim` and `dtype`.

    Raises:
        UnsupportedError: the combine kernel cannot serve it (reasons attached).
    """
    config = CombineConfig(arch, head_dim, dtype_name(dtype))
    reasons = kernel_can_implement(config)
    if reasons:
        raise UnsupportedError(f"no split-KV combine kernel for {config.name}", reasons)
    return config


def lookup_kv_store(arch: str, head_dim: int, dtype: torch.dtype | str) -> KVStoreConfig:
    """The paged KV-cache update kernel for K/V of `head_dim` and `dtype`.

    Raises:
        UnsupportedError: no registered kernels for `arch`, or the kernel cannot serve it.
    """
    config = KVStoreConfig(arch, head_dim, dtype_name(dtype))
    reasons = [] if arch in registered_arches() else [f"arch={arch} has no registered kernels"]
    reasons += kernel_can_implement(config)
    if reasons:
        raise UnsupportedError(f"no paged KV-cache update kernel for {config.name}", reasons)
    return config


@functools.lru_cache(maxsize=256)
def find(
    arch: str, head_dim: int, dtype: str, is_causal: bool, variant: Variant = DENSE
) -> FmhaFwdConfig | tuple[str, ...]:
    """Like `lookup`, but returns the reasons instead of raising (memoized: hot path)."""
    reasons: list[str] = []
    arches = registered_arches()
    if arch not in arches:
        reasons.append(f"arch={arch} has no registered kernels (supported: {', '.join(arches)})")
    else:
        dims = registered_head_dims(arch)
        if head_dim not in dims:
            supported = ", ".join(str(d) for d in dims)
            reasons.append(
                f"head_dim={head_dim} is not supported on {arch} (supported: {supported})"
            )
    if dtype not in _DTYPES:
        reasons.append(f"dtype={dtype} is not supported (supported: {', '.join(_DTYPES)})")
    if variant.decode and (is_causal or variant.varlen_q or variant.kv_layout == "dense"):
        reasons.append(
            "decode variants are non-causal, with batched queries, over a 'cache' or 'paged' "
            f"kv_layout (got causal={is_causal}, {variant})"
        )
    if variant.fills_gpu and (not variant.decode or variant.split_kv):
        reasons.append(f"fills_gpu is a decode variant without split-KV (got {variant})")
    if (variant.long_q or variant.one_wave) and variant not in DENSE_VARIANTS:
        reasons.append(f"long_q and one_wave are dense variants, one at a time (got {variant})")
    if reasons:
        return tuple(reasons)
    config = _make_config(arch, head_dim, dtype, is_causal, variant)
    kernel_reasons = kernel_can_implement(config)
    if kernel_reasons:
        return tuple(f"{config.name}: {r}" for r in kernel_reasons)
    return config


def kernel_can_implement(config: KernelConfig) -> list[str]:
    """The kernel's own `can_implement` answer; an import failure is reported as a reason.

    Importing the kernel module imports the CuTe DSL, so this is only called once a
    config has passed the registry's own (cheap) checks.
    """
    from cutedsl_kernels import build

    try:
        return list(build.can_implement(config))
    except ImportError as exc:
        return [f"kernel module cannot be imported ({type(exc).__name__}: {exc})"]


def detect_arch(device: torch.device | int | None = None) -> str | None:
    """DSL target of a CUDA device, or None when there is none.

    `SPARSEK_ARCH` in the environment wins over the device's capability.

    Args:
        device: CUDA device (index or torch.device); the current device when None.

    Returns:
        e.g. "sm_90a"; for an unmapped capability "sm_XY" (no kernels registered for it);
        None when no CUDA device is available and `SPARSEK_ARCH` is unset.
    """
    override = os.environ.get(ARCH_ENV)
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    index = None if device is None else torch.device(device).index
    return _arch_of_device(torch.cuda.current_device() if index is None else index)


@functools.cache
def _arch_of_device(index: int) -> str:
    capability = torch.cuda.get_device_capability(index)
    return arch_from_capability(capability)


def arch_from_capability(capability: tuple[int, int]) -> str:
    """DSL target for a compute capability: (9, 0) -> "sm_90a"; unmapped -> "sm_XY"."""
    return ARCH_BY_CAPABILITY.get(capability, f"sm_{capability[0]}{capability[1]}")


def _make_config(
    arch: str, head_dim: int, dtype: str, is_causal: bool, variant: Variant = DENSE
) -> FmhaFwdConfig:
    tuning = _TUNING[(arch, head_dim)]
    if is_causal:
        tuning = _CAUSAL_TUNING.get((arch, head_dim), tuning)
        if variant.long_q:
            tuning = _LONG_CAUSAL_TUNING.get((arch, head_dim), tuning)
    if variant.one_wave:
        tuning = _ONE_WAVE_TUNING.get((arch, head_dim), tuning)
    if variant not in (DENSE, LONG_Q, PACKED):
        # Only dense and packed problems have a persistent schedule (see
        # `FmhaFwdConfig.persistent`); one wave has nothing to loop over.
        tuning = replace(tuning, persistent=False, dynamic_schedule=False)
    elif variant == PACKED:
        # Packed tiles are unequal: a persistent kernel counts them out on the device,
        # heads fastest within groups of heads (`PACKED_L2_GROUP_MB`).
        group_mb = PACKED_L2_GROUP_MB if tuning.persistent else 0
        tuning = replace(tuning, dynamic_schedule=tuning.persistent, l2_group_mb=group_mb)
    fields = asdict(variant)
    del fields["long_q"], fields["one_wave"]
    if fields.pop("decode"):
        tuning = _DECODE_TUNING.get((arch, head_dim), tuning)
    if fields.pop("fills_gpu"):
        tuning = _DECODE_FILLS_GPU_TUNING.get((arch, head_dim), tuning)
    return FmhaFwdConfig(
        arch=arch,
        head_dim=head_dim,
        dtype=dtype,
        is_causal=is_causal,
        **asdict(tuning),
        **fields,
    )
