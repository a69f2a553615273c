"""Which kernel serves which request, or why none does.

A request is identified by (arch, head_dim[, head_dim_v], dtype, mask, layout): the
kernel's identity (head_dim_v: V's and O's head dim where it differs from Q's and K's),
what it computes and where the sequences live. Its `tuning.Workload` (a shape class the
host reads off the sizes) picks the tuning row among kernels of one identity. `find`
answers with the `FmhaFwdConfig` to compile and launch, or with every reason it cannot:
the registry's own (unregistered arch, head dim, dtype or mask; a workload that does not
fit the layout) and the kernel's `can_implement` answer.

What is registered: every (arch, head_dim) row of `tuning.BASE` and (arch, head_dim,
head_dim_v) row of `tuning.VALUE_HEAD_DIMS`, for each dtype of `DTYPES` and mask of
`MASKS`; and FP8 (`FP8_DTYPE` Q/K/V, O of `out_dtype`, one of `DTYPES`): every row of
`tuning.FP8`, dense and packed, for each output dtype and mask. Supporting a new head dim
or architecture is a row there (the kernel's `can_implement` must accept it;
`tests/test_registry.py` checks every row).

Architecture detection maps the CUDA compute capability to the DSL's target name
(9.0 -> "sm_90a", 10.0 -> "sm_100a"); the environment variable `SPARSEK_ARCH` overrides it
(useful to compile for a GPU that is not present, or to force a target).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import asdict

import torch

from cutedsl_kernels.config import (
    CAUSAL,
    DENSE,
    FP8_DTYPE,
    NO_MASK,
    PACKED,
    SUPPORTED_DTYPES,
    CombineConfig,
    ElementTypes,
    FmhaFwdConfig,
    KernelConfig,
    KVStoreConfig,
    Layout,
    MaskSpec,
)
from sparsek import memo, tuning
from sparsek.errors import UnsupportedError
from sparsek.tuning import DECODE_WORKLOADS, DENSE_WORKLOADS, Workload

ARCH_ENV = "SPARSEK_ARCH"

# Compute capability (major, minor) -> DSL target. The "a" targets enable the
# architecture-specific instructions (wgmma, TMA multicast) the kernels rely on.
ARCH_BY_CAPABILITY: dict[tuple[int, int], str] = {
    (9, 0): "sm_90a",
    (10, 0): "sm_100a",
}

# Dtypes and masks every registered row is compiled for (and precompiled).
DTYPES: tuple[str, ...] = SUPPORTED_DTYPES
MASKS: tuple[MaskSpec, ...] = (NO_MASK, CAUSAL)

# Every mask the kernels serve, compiled at first use beyond `MASKS`: none, causal or a
# sliding window, each with or without a logit softcap and attention sinks.
SERVED_MASKS: tuple[MaskSpec, ...] = tuple(
    MaskSpec(causal=causal, window=window, softcap=softcap, sinks=sinks)
    for causal, window in ((False, False), (True, False), (False, True))
    for softcap in (False, True)
    for sinks in (False, True)
)
MASK_BY_NAME: dict[str, MaskSpec] = {m.name: m for m in SERVED_MASKS}

# (layout, workload) pairs precompiled by `python -m sparsek compile` (and compile-tested
# in CI) beside the dense kernels: attention_varlen, and attention_with_kvcache over a
# contiguous or a paged cache (vLLM's default page of 16 rows, and 64), with and without
# split-KV. Other page sizes (multiples of 16) compile at first use.
_PRECOMPILED_PAGE_SIZES = (16, 64)
_CACHES = (("cache", 0), *(("paged", p) for p in _PRECOMPILED_PAGE_SIZES))
PRECOMPILED: tuple[tuple[Layout, Workload], ...] = (
    (PACKED, Workload.DEFAULT),
    *(
        (Layout(varlen_q, kv, page, split), Workload.DEFAULT)
        for varlen_q in (False, True)
        for kv, page in _CACHES
        for split in (False, True)
    ),
    *(
        (Layout(packed, kv, page, split, single_query=packed), Workload.DECODE)
        for packed in (False, True)
        for kv, page in _CACHES
        for split in (False, True)
    ),
    *(
        (Layout(packed, kv, page, single_query=packed), Workload.DECODE_FILLS_GPU)
        for packed in (False, True)
        for kv, page in _CACHES
    ),
    (DENSE, Workload.LONG_Q),
    (DENSE, Workload.ONE_WAVE),
)


def mask_of(causal: bool) -> MaskSpec:
    """The registered mask of a causal flag (shared instances: no allocation)."""
    return CAUSAL if causal else NO_MASK


def registered_arches() -> list[str]:
    """Architectures with at least one registered kernel, sorted."""
    return tuning.arches()


def registered_head_dims(arch: str) -> list[int]:
    """Head dims registered for `arch`, sorted (empty when the arch has none)."""
    return tuning.head_dims(arch)


def registered_value_head_dims(arch: str, head_dim: int) -> list[int]:
    """Value head dims registered with query head dim `head_dim` on `arch`: head_dim itself,
    then smaller ones (e.g. 128 with 192), descending."""
    return tuning.value_head_dims(arch, head_dim)


def registered_configs(arch: str) -> list[FmhaFwdConfig]:
    """Every dense kernel configuration registered for `arch` (empty for an unknown arch).

    Args:
        arch: DSL target name, e.g. "sm_90a".

    Returns:
        Configs ordered by head_dim, head_dim_v (descending), dtype, then mask (no mask
        before causal).
    """
    return [
        _make_config(arch, head_dim, dtype, mask, DENSE, Workload.DEFAULT, head_dim_v)
        for head_dim in registered_head_dims(arch)
        for head_dim_v in registered_value_head_dims(arch, head_dim)
        for dtype in DTYPES
        for mask in MASKS
    ]


def registered_fp8_configs(arch: str) -> list[FmhaFwdConfig]:
    """Every FP8 kernel configuration registered for `arch`: each `tuning.FP8` head dim,
    dense then packed, each output dtype of `DTYPES` and mask of `MASKS`."""
    return [
        _make_config(arch, head_dim, FP8_DTYPE, mask, layout, Workload.DEFAULT, None, out)
        for head_dim in tuning.fp8_head_dims(arch)
        for layout in (DENSE, PACKED)
        for out in DTYPES
        for mask in MASKS
    ]


def registered_fp8_cache_configs(arch: str, mask: MaskSpec = NO_MASK) -> list[FmhaFwdConfig]:
    """Every FP8-cache kernel of `mask` (one of `SERVED_MASKS`; no mask's and causal's are
    precompiled) for `arch`: each `tuning.FP8` head dim and dtype of `DTYPES`, a
    contiguous cache and vLLM's 16-row pages, split and not; decode of batched and packed
    queries, and packed queries of any length (a serving engine's mixed batches). Decode
    drops causal (a single query sees every key), a window takes the single-query
    kernels, split kernels leave sinks to the combine. Other page sizes compile at first
    use."""
    decode_mask = dataclasses.replace(mask, causal=False)
    caches = (("cache", 0), ("paged", _PRECOMPILED_PAGE_SIZES[0]))
    kernels = [
        (
            dataclasses.replace(decode_mask, sinks=mask.sinks and not split),
            Layout(packed, kv, page, split, single_query=packed or decode_mask.window),
            Workload.DECODE,
        )
        for packed in (False, True)
        for kv, page in caches
        for split in (False, True)
    ]
    kernels += [
        (
            dataclasses.replace(mask, sinks=mask.sinks and not split),
            Layout(True, kv, page, split),
            Workload.DEFAULT,
        )
        for kv, page in caches
        for split in (False, True)
    ]
    found = [
        find(arch, head_dim, dtype, kernel_mask, layout, workload, cache_dtype=FP8_DTYPE)
        for head_dim in tuning.fp8_head_dims(arch)
        for dtype in DTYPES
        for kernel_mask, layout, workload in kernels
    ]
    return list(dict.fromkeys(c for c in found if isinstance(c, FmhaFwdConfig)))


def registered_kernels(arch: str) -> list[KernelConfig]:
    """Every kernel precompiled for `arch`: dense, the `PRECOMPILED` layouts and
    workloads, combine, store.

    Returns:
        `registered_configs(arch)`, then each of them in every precompiled (layout,
        workload) (decode only without a mask), then the split-KV combine kernel and the
        paged KV-cache update kernel of each (head_dim, dtype) (the combine: of each
        output head dim; and of each FP8-cache head dim, into an FP8 cache), then
        `registered_fp8_configs(arch)` and `registered_fp8_cache_configs` of no mask and
        of causal.
    """
    dense = registered_configs(arch)
    others = [
        _make_config(arch, c.head_dim, c.dtypes.qk, c.mask, layout, workload, c.value_head_dim)
        for c in dense
        for layout, workload in PRECOMPILED
        if not (workload in DECODE_WORKLOADS and c.mask.causal)
    ]
    others = [c for c in dict.fromkeys(others) if c not in dense]  # LONG_Q = DENSE rows
    dims = [(head_dim, dtype) for head_dim in registered_head_dims(arch) for dtype in DTYPES]
    combine = [CombineConfig(arch, head_dim, dtype) for head_dim, dtype in dims]
    store = [KVStoreConfig(arch, head_dim, dtype) for head_dim, dtype in dims]
    store += [
        KVStoreConfig(arch, head_dim, dtype, FP8_DTYPE)
        for head_dim in tuning.fp8_head_dims(arch)
        for dtype in DTYPES
    ]
    fp8_cache = [c for mask in MASKS for c in registered_fp8_cache_configs(arch, mask)]
    fp8 = [*registered_fp8_configs(arch), *dict.fromkeys(fp8_cache)]
    return [*dense, *others, *combine, *store, *fp8]


def mask_kernels(arch: str, mask: MaskSpec) -> list[KernelConfig]:
    """Every kernel the entry points may launch with `mask` (one of `SERVED_MASKS`) on
    `arch`, for each registered head dim and dtype: the dense kernels of every workload, the
    FP8 dense and packed kernels, the `PRECOMPILED` layouts (split kernels without sinks,
    which the combine adds; decode without causal, since a single query sees every key,
    and with single-query rows when the mask has a window), and the combine.
    `registered_kernels` compiles the plain and causal masks' share of these ahead; the
    others compile at first use, or ahead through `sparsek compile --mask`.
    """
    if mask not in SERVED_MASKS:
        return []
    decode_mask = dataclasses.replace(mask, causal=False)
    wanted: list[tuple[MaskSpec, Layout, Workload]] = [
        (mask, DENSE, workload) for workload in DENSE_WORKLOADS
    ]
    for layout, workload in PRECOMPILED:
        kernel_mask = mask
        if workload in DECODE_WORKLOADS:
            kernel_mask = decode_mask
            if mask.window:
                layout = dataclasses.replace(layout, single_query=True)
        if layout.split_kv:
            kernel_mask = dataclasses.replace(kernel_mask, sinks=False)
        wanted.append((kernel_mask, layout, workload))
    found: list[KernelConfig] = []
    for head_dim in registered_head_dims(arch):
        for head_dim_v in registered_value_head_dims(arch, head_dim):
            for dtype in DTYPES:
                for kernel_mask, layout, workload in wanted:
                    config = find(arch, head_dim, dtype, kernel_mask, layout, workload, head_dim_v)
                    if isinstance(config, FmhaFwdConfig):
                        found.append(config)
                found.append(CombineConfig(arch, head_dim_v, dtype, mask.sinks))
    for head_dim in tuning.fp8_head_dims(arch):
        for layout in (DENSE, PACKED):
            for out in DTYPES:
                config = find(arch, head_dim, FP8_DTYPE, mask, layout, out_dtype=out)
                if isinstance(config, FmhaFwdConfig):
                    found.append(config)
    found.extend(registered_fp8_cache_configs(arch, mask))
    return list(dict.fromkeys(found))


def dtype_name(dtype: torch.dtype | str) -> str:
    """The registry's dtype name: "float16" for torch.float16 (strings pass through)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return dtype


def lookup(
    arch: str,
    head_dim: int,
    dtype: torch.dtype | str,
    mask: MaskSpec,
    layout: Layout = DENSE,
    workload: Workload = Workload.DEFAULT,
    head_dim_v: int | None = None,
    out_dtype: torch.dtype | str | None = None,
    cache_dtype: torch.dtype | str | None = None,
) -> FmhaFwdConfig:
    """The registered kernel configuration for a request.

    Args:
        arch: DSL target name, e.g. "sm_90a" (see `detect_arch`).
        head_dim: head dimension of Q and K (and of V and O unless `head_dim_v`).
        dtype: element type of Q/K/V, a torch dtype or its name ("float16", "bfloat16",
            "float8_e4m3fn").
        mask: the mask features (`mask_of(causal)` for the registered ones).
        layout: where the sequences live (dense, packed, cached, paged; split-KV).
        workload: the request's shape class (picks the tuning row).
        head_dim_v: head dimension of V and O; None: head_dim.
        out_dtype: (FP8 only, and required there) O's element type.
        cache_dtype: (KV caches stored in FP8 under 16-bit queries) K's and V's element
            type as stored; None: `dtype`.

    Returns:
        The frozen config naming the kernel to compile and launch.

    Raises:
        UnsupportedError: no registered kernel fits; `reasons` lists why, including the
            kernel's own `can_implement` answer for the closest candidate.
    """
    out = None if out_dtype is None else dtype_name(out_dtype)
    cache = None if cache_dtype is None else dtype_name(cache_dtype)
    found = find(arch, head_dim, dtype_name(dtype), mask, layout, workload, head_dim_v, out, cache)
    if isinstance(found, FmhaFwdConfig):
        return found
    dims = f"head_dim={head_dim}" + (
        f", head_dim_v={head_dim_v}" if head_dim_v not in (None, head_dim) else ""
    )
    request = f"arch={arch}, {dims}, dtype={dtype_name(dtype)}, mask={mask.name}"
    if out is not None:
        request += f", out_dtype={out}"
    if cache is not None:
        request += f", cache dtype={cache}"
    if layout != DENSE or workload is not Workload.DEFAULT:
        request += f", {layout}, workload={workload.value}"
    raise UnsupportedError(f"no sparsek kernel for {request}", found)


def lookup_combine(
    arch: str, head_dim: int, dtype: torch.dtype | str, sinks: bool = False
) -> CombineConfig:
    """The split-KV combine kernel for outputs of `head_dim` and `dtype` (adding the rows'
    sink logits when `sinks`).

    Raises:
        UnsupportedError: the combine kernel cannot serve it (reasons attached).
    """
    config = CombineConfig(arch, head_dim, dtype_name(dtype), sinks)
    reasons = kernel_can_implement(config)
    if reasons:
        raise UnsupportedError(f"no split-KV combine kernel for {config.name}", reasons)
    return config


def lookup_kv_store(
    arch: str,
    head_dim: int,
    dtype: torch.dtype | str,
    cache_dtype: torch.dtype | str | None = None,
) -> KVStoreConfig:
    """The paged KV-cache update kernel for K/V of `head_dim` and `dtype` into a cache of
    `cache_dtype` (None: `dtype`; `FP8_DTYPE`: quantizing with per-tensor scales).

    Raises:
        UnsupportedError: no registered kernels for `arch`, or the kernel cannot serve it.
    """
    cache = None if cache_dtype is None else dtype_name(cache_dtype)
    config = KVStoreConfig(arch, head_dim, dtype_name(dtype), cache)
    reasons = [] if arch in registered_arches() else [f"arch={arch} has no registered kernels"]
    reasons += kernel_can_implement(config)
    if reasons:
        raise UnsupportedError(f"no paged KV-cache update kernel for {config.name}", reasons)
    return config


@functools.lru_cache(maxsize=256)
def find(
    arch: str,
    head_dim: int,
    dtype: str,
    mask: MaskSpec,
    layout: Layout = DENSE,
    workload: Workload = Workload.DEFAULT,
    head_dim_v: int | None = None,
    out_dtype: str | None = None,
    cache_dtype: str | None = None,
) -> FmhaFwdConfig | tuple[str, ...]:
    """Like `lookup`, but returns the reasons instead of raising (memoized: hot path)."""
    if head_dim_v == head_dim:
        head_dim_v = None
    if dtype == FP8_DTYPE:
        return _find_fp8(arch, head_dim, mask, layout, workload, head_dim_v, out_dtype)
    if cache_dtype is not None:
        request = (arch, head_dim, dtype, mask, layout, workload, head_dim_v)
        return _find_fp8_cache(*request, cache_dtype)
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
        elif head_dim_v is not None and head_dim_v not in registered_value_head_dims(
            arch, head_dim
        ):
            values = ", ".join(str(d) for d in registered_value_head_dims(arch, head_dim))
            reasons.append(
                f"head_dim_v={head_dim_v} is not supported with head_dim={head_dim} on "
                f"{arch} (supported: {values})"
            )
    if dtype not in DTYPES:
        reasons.append(f"dtype={dtype} is not supported (supported: {', '.join(DTYPES)})")
    if mask not in SERVED_MASKS:
        supported = ", ".join(m.name for m in SERVED_MASKS)
        reasons.append(f"mask={mask.name} is not supported (supported: {supported})")
    if workload in DECODE_WORKLOADS and (
        mask.causal
        or layout.kv_layout == "dense"
        or (layout.varlen_q and not layout.single_query)
        or (mask.window and not layout.single_query)
    ):
        reasons.append(
            "decode workloads are non-causal over a 'cache' or 'paged' kv_layout, with "
            "batched queries or single-query ones (single-query with a window: its rows "
            f"share one position) (got mask={mask.name}, {layout})"
        )
    if layout.single_query and workload not in DECODE_WORKLOADS:
        reasons.append(f"single_query layouts serve decode workloads only (got {layout})")
    if workload is Workload.DECODE_FILLS_GPU and layout.split_kv:
        reasons.append(f"decode that fills the GPU is never split (got {layout})")
    if workload in (Workload.LONG_Q, Workload.ONE_WAVE) and layout != DENSE:
        reasons.append(f"workload={workload.value} is for dense layouts only (got {layout})")
    if reasons:
        return tuple(reasons)
    config = _make_config(arch, head_dim, dtype, mask, layout, workload, head_dim_v)
    kernel_reasons = kernel_can_implement(config)
    if kernel_reasons:
        return tuple(f"{config.name}: {r}" for r in kernel_reasons)
    return config


def _fp8_reasons(
    what: str, arch: str, head_dim: int, head_dim_v: int | None, mask: MaskSpec
) -> list[str]:
    """The head-dim and mask reasons FP8 requests (`what`) share: a `tuning.FP8` head
    dim of `arch`, V's the same, and one of `SERVED_MASKS`."""
    reasons: list[str] = []
    dims = tuning.fp8_head_dims(arch)
    if not dims:
        reasons.append(f"{what}: no FP8 kernels are registered for arch={arch}")
    elif head_dim not in dims or head_dim_v is not None:
        supported = ", ".join(str(d) for d in dims)
        reasons.append(
            f"{what}: head_dim={head_dim}"
            + ("" if head_dim_v is None else f" with head_dim_v={head_dim_v}")
            + f" is not supported on {arch} (supported: {supported}, V's the same)"
        )
    if mask not in SERVED_MASKS:
        supported = ", ".join(m.name for m in SERVED_MASKS)
        reasons.append(f"mask={mask.name} is not supported (supported: {supported})")
    return reasons


def _find_fp8(
    arch: str,
    head_dim: int,
    mask: MaskSpec,
    layout: Layout,
    workload: Workload,
    head_dim_v: int | None,
    out_dtype: str | None,
) -> FmhaFwdConfig | tuple[str, ...]:
    """`find` for FP8 Q/K/V with O of `out_dtype`."""
    reasons = _fp8_reasons(f"dtype={FP8_DTYPE}", arch, head_dim, head_dim_v, mask)
    if out_dtype not in DTYPES:
        reasons.append(
            f"dtype={FP8_DTYPE}: out_dtype={out_dtype} is not supported (supported: "
            f"{', '.join(DTYPES)})"
        )
    if layout not in (DENSE, PACKED) or workload in DECODE_WORKLOADS:
        reasons.append(
            f"dtype={FP8_DTYPE}: FP8 kernels serve dense and packed (varlen) prefill, not "
            f"{layout}, workload={workload.value} (FP8 KV caches are not supported)"
        )
    if reasons:
        return tuple(reasons)
    config = _make_config(arch, head_dim, FP8_DTYPE, mask, layout, workload, None, out_dtype)
    kernel_reasons = kernel_can_implement(config)
    if kernel_reasons:
        return tuple(f"{config.name}: {r}" for r in kernel_reasons)
    return config


def _find_fp8_cache(
    arch: str,
    head_dim: int,
    dtype: str,
    mask: MaskSpec,
    layout: Layout,
    workload: Workload,
    head_dim_v: int | None,
    cache_dtype: str,
) -> FmhaFwdConfig | tuple[str, ...]:
    """`find` for 16-bit queries over a KV cache stored in `cache_dtype` (FP8), for every
    `tuning.FP8` head dim: decode (`Workload.DECODE`) and other queries
    (`Workload.DEFAULT`: prefill chunks, mixed batches), all on the `tuning.DECODE` rows'
    64-row tiles (one MMA warpgroup converts the cache's tiles)."""
    reasons = _fp8_reasons("FP8 cache", arch, head_dim, head_dim_v, mask)
    if cache_dtype != FP8_DTYPE:
        reasons.append(f"cache dtype={cache_dtype} is not supported (supported: {FP8_DTYPE})")
    if dtype not in DTYPES:
        reasons.append(f"dtype={dtype}: FP8 caches take queries in {', '.join(DTYPES)}")
    served = (Workload.DEFAULT, Workload.DECODE)
    if workload not in served or layout.kv_layout not in ("cache", "paged"):
        reasons.append(
            "FP8-cache kernels serve a 'cache' or 'paged' layout with the workloads "
            f"{', '.join(w.value for w in served)} (got {layout}, workload={workload.value})"
        )
    if reasons:
        return tuple(reasons)
    config = _make_config(
        arch, head_dim, dtype, mask, layout, Workload.DECODE, None, None, cache_dtype
    )
    if workload is not Workload.DECODE:  # a sequence's query tiles share its K/V tiles
        config = dataclasses.replace(config, kv_evict_first=False)
    kernel_reasons = kernel_can_implement(config)
    if kernel_reasons:
        return tuple(f"{config.name}: {r}" for r in kernel_reasons)
    return config


memo.register(find.cache_clear)
tuning.on_change(memo.clear_all)


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
    arch: str,
    head_dim: int,
    dtype: str,
    mask: MaskSpec,
    layout: Layout,
    workload: Workload,
    head_dim_v: int | None = None,
    out_dtype: str | None = None,
    cache_dtype: str | None = None,
) -> FmhaFwdConfig:
    head_dim_v = None if head_dim_v == head_dim else head_dim_v
    if dtype == FP8_DTYPE:  # (FP8 rows serve every mask, layout and workload alike)
        assert out_dtype is not None
        dtypes, tuned = ElementTypes.fp8(out_dtype), tuning.FP8[(arch, head_dim)]
    else:
        dtypes = ElementTypes.uniform(dtype)
        if cache_dtype is not None:  # (the decode rows: 64-row tiles, one MMA warpgroup)
            dtypes = ElementTypes.fp8_cache(dtype)
        tuned = tuning.tuning_for(arch, head_dim, mask, layout, workload, head_dim_v)
    return FmhaFwdConfig(
        arch=arch,
        head_dim=head_dim,
        dtypes=dtypes,
        mask=mask,
        head_dim_v=head_dim_v,
        **asdict(tuned),
        **asdict(layout),
    )
