"""What the sm90 FMHA forward kernel accepts, answerable without importing the DSL.

The registry asks `can_implement` on the launch path of a fresh process; keeping it free
of the DSL keeps a warm start (kernel loaded from the disk cache) from importing it.
"""

from __future__ import annotations

from cutedsl_kernels.config import FP8_DTYPE, KV_LAYOUTS, SUPPORTED_DTYPES, FmhaFwdConfig

SMEM_CAPACITY_BYTES = 227 * 1024  # H100 opt-in shared memory per CTA
SM_SMEM_BYTES = 228 * 1024  # per SM, of which 1 KiB per resident CTA is reserved
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM
THREADS_PER_WARPGROUP = 128
ROWS_PER_MMA_WARPGROUP = 64  # one wgmma atom is 64 rows tall
# (MMA warpgroups, CTAs per SM) -> register split (per thread) between the producer
# warpgroup and the MMA warpgroups: ctas * 128 * (producer + W * mma) <= REGISTER_FILE.
REGS_BY_MMA_WARPGROUPS = {
    (1, 1): (56, 256),
    (2, 1): (24, 240),
    (3, 1): (32, 160),
    (1, 2): (32, 224),
}
BARRIER_BYTES = 8
SMEM_ALIGN = 1024  # each tile buffer's alignment, and so the struct's
ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, FP8_DTYPE: 1}  # Q/K/V element types
# FP8 kernels: the first GEMM's K step and the second's (keys) are 32 elements.
FP8_MMA_K = 32
# FP8 kernels keep a second output accumulator (two-level accumulation, see
# `hopper/fmha_fwd.py`), which the registers hold for these head dims.
FP8_HEAD_DIMS = (64, 128)
# Dynamic schedule: work tiles in flight from the producer warp to the consumers, each as
# SCHED_WORDS int32 (`common/tile_scheduler.WorkTile.NUM_WORDS`, which imports the DSL;
# tests/test_kernels_compile.py checks that the two agree).
SCHED_STAGES = 2
SCHED_WORDS = 12


def q_stages(config: FmhaFwdConfig) -> int:
    """Q buffers: a persistent CTA loads its next tile's Q while this tile's is in use."""
    return 2 if config.persistent else 1


def _align(size: int, alignment: int = SMEM_ALIGN) -> int:
    return -(-size // alignment) * alignment


def smem_bytes(config: FmhaFwdConfig) -> int:
    """Shared memory one CTA needs: `SharedStorage` of `hopper/fmha_fwd.py`, byte for byte.

    Its fields in order: the Q, K and V barriers; the Q stages (reused for O, except by
    FP8 kernels, which store O from registers), K stages and V stages (as stored: FP8
    caches' bytes), then, with a converted cache, one K and one V tile in Q's type, each
    1024-B aligned (the 128-B swizzle's atom); the scheduler's barriers and work tiles
    (always allocated). The struct's size is a multiple of its 1024-B alignment.
    tests/test_kernels_compile.py checks this against the compiled struct.
    """
    dtypes = config.dtypes
    qk_bytes = ELEMENT_BYTES.get(dtypes.qk, 2)
    v_bytes = ELEMENT_BYTES.get(dtypes.v, 2)
    k_stored = v_stored = ELEMENT_BYTES.get(dtypes.cache or "", 0)
    barriers = (2 * q_stages(config) + 4 * config.num_stages) * BARRIER_BYTES
    q = q_stages(config) * config.tile_m * config.head_dim * qk_bytes
    k = config.num_stages * config.tile_n * config.head_dim * (k_stored or qk_bytes)
    v = config.num_stages * config.tile_n * config.value_head_dim * (v_stored or v_bytes)
    tiles = [q, k, v]
    if dtypes.converts_kv:  # the converted K and V tiles the GEMMs read
        tiles += [config.tile_n * config.head_dim * qk_bytes]
        tiles += [config.tile_n * config.value_head_dim * v_bytes]
    offset = barriers
    for tile in tiles:
        offset = _align(offset) + tile
    scheduler = SCHED_STAGES * (2 * BARRIER_BYTES + 4 * SCHED_WORDS)
    return _align(offset + scheduler)


def fp8_head_dim_reasons(config: FmhaFwdConfig, what: str) -> list[str]:
    """Why `what` (an FP8 variant) cannot serve `config`'s head dims: one of
    `FP8_HEAD_DIMS`, V's the same."""
    if config.head_dim in FP8_HEAD_DIMS and config.value_head_dim == config.head_dim:
        return []
    dims = ", ".join(str(d) for d in FP8_HEAD_DIMS)
    return [
        f"head_dim={config.head_dim}, head_dim_v={config.value_head_dim}: {what} serve "
        f"head_dim in ({dims}) with head_dim_v equal"
    ]


def fp8_reasons(config: FmhaFwdConfig) -> list[str]:
    """Why the FP8 variant cannot serve `config` (Q/K in FP8), beyond the common rules.

    FP8 kernels take Q, K and V in float8_e4m3fn with O in float16 or bfloat16 and
    float32 accumulators; head_dim in `FP8_HEAD_DIMS` (V's the same); tile_n a multiple
    of 32 (the second GEMM's K step); dense or packed layouts, not split-KV.
    """
    reasons = []
    dtypes = config.dtypes
    if dtypes.v != FP8_DTYPE or dtypes.out not in SUPPORTED_DTYPES or dtypes.acc != "float32":
        reasons.append(
            f"dtypes={dtypes.name!r}: FP8 kernels take Q, K and V in {FP8_DTYPE} with O in "
            f"{' or '.join(SUPPORTED_DTYPES)} and float32 accumulators"
        )
    reasons.extend(fp8_head_dim_reasons(config, "FP8 kernels"))
    if config.tile_n % FP8_MMA_K:
        reasons.append(f"tile_n={config.tile_n}: FP8 kernels need a multiple of {FP8_MMA_K}")
    if config.kv_layout not in ("dense", "varlen") or config.split_kv:
        reasons.append("FP8 kernels serve dense and packed (varlen) layouts, not split-KV")
    return reasons


def fp8_cache_reasons(config: FmhaFwdConfig) -> list[str]:
    """Why the FP8-cache variant cannot serve `config` (K and V stored in FP8, converted
    to Q's 16-bit type in shared memory by the one MMA warpgroup), beyond the common rules.

    It takes Q, K, V (as converted) and O of one 16-bit type with float32 accumulators,
    the cache in float8_e4m3fn; head_dim in `FP8_HEAD_DIMS` (V's the same); a 'cache' or
    'paged' layout; tile_m 64 (one MMA warpgroup converts and computes).
    """
    reasons = []
    dtypes = config.dtypes
    if (
        dtypes.cache != FP8_DTYPE
        or not dtypes.is_uniform
        or dtypes.qk not in SUPPORTED_DTYPES
        or dtypes.acc != "float32"
    ):
        reasons.append(
            f"dtypes={dtypes.name!r}: FP8-cache kernels take Q, O in one of "
            f"{', '.join(SUPPORTED_DTYPES)} with K and V stored in {FP8_DTYPE}"
        )
    reasons.extend(fp8_head_dim_reasons(config, "FP8-cache kernels"))
    if config.kv_layout not in ("cache", "paged") or config.tile_m != ROWS_PER_MMA_WARPGROUP:
        reasons.append(
            f"FP8-cache kernels serve 'cache' and 'paged' layouts with tile_m="
            f"{ROWS_PER_MMA_WARPGROUP} (got kv_layout={config.kv_layout!r}, "
            f"tile_m={config.tile_m})"
        )
    return reasons


def can_implement(config: FmhaFwdConfig) -> list[str]:
    """Reasons the sm90 kernel cannot serve `config` (empty when it can)."""
    reasons = []
    if not config.arch.startswith("sm_90"):
        reasons.append(f"arch={config.arch!r}: this kernel targets sm_90a")
    dtypes = config.dtypes
    if dtypes.is_fp8:
        reasons.extend(fp8_reasons(config))
    elif dtypes.converts_kv:
        reasons.extend(fp8_cache_reasons(config))
    elif not dtypes.is_uniform or dtypes.qk not in SUPPORTED_DTYPES or dtypes.acc != "float32":
        reasons.append(
            f"dtypes={dtypes.name!r} are not supported: Q, K, V and O of one type "
            f"(supported: {', '.join(SUPPORTED_DTYPES)}) with float32 accumulators, or "
            f"Q, K, V in {FP8_DTYPE} with O in one of them"
        )
    if not config.pv_two_level and not dtypes.is_fp8:
        reasons.append("pv_two_level=False applies to FP8 kernels only")
    if not config.convert_vectorized and not dtypes.converts_kv:
        reasons.append("convert_vectorized=False applies to FP8-cache kernels only")
    if config.head_dim % 16 != 0 or not 16 <= config.head_dim <= 256:
        reasons.append(f"head_dim={config.head_dim} must be a multiple of 16 in [16, 256]")
    dv = config.value_head_dim
    if dv != config.head_dim and not (
        dv < config.head_dim and dv % 64 == config.head_dim % 64 == 0
    ):
        reasons.append(
            f"head_dim_v={dv} must equal head_dim={config.head_dim}, or be smaller with both "
            "multiples of 64 (O is staged in Q's buffer under one swizzle)"
        )
    if config.mask.causal and config.mask.window:
        reasons.append(
            f"mask={config.mask.name!r}: a causal window is the window with right size 0 "
            "(compile mask=window and pass window_right=0)"
        )
    if config.mask.sinks and config.split_kv:
        reasons.append(
            "mask with sinks and split_kv: a split's partial result leaves the sink out "
            "(compile the split kernel without sinks; the combine adds them)"
        )
    mma_warpgroups = config.tile_m // ROWS_PER_MMA_WARPGROUP
    if config.tile_m % ROWS_PER_MMA_WARPGROUP or (mma_warpgroups, 1) not in REGS_BY_MMA_WARPGROUPS:
        reasons.append(f"tile_m={config.tile_m} must be 64, 128 or 192")
    elif (mma_warpgroups, config.ctas_per_sm) not in REGS_BY_MMA_WARPGROUPS:
        reasons.append(
            f"ctas_per_sm={config.ctas_per_sm} must be 1 (or 2 with tile_m=64): the registers "
            "of one CTA are budgeted for it"
        )
    if config.tile_n % 16 != 0 or not 16 <= config.tile_n <= 256:
        reasons.append(f"tile_n={config.tile_n} must be a multiple of 16 in [16, 256]")
    if config.num_stages < 1:
        reasons.append(f"num_stages={config.num_stages} must be >= 1")
    if config.kv_layout not in KV_LAYOUTS:
        reasons.append(f"kv_layout={config.kv_layout!r} is not one of {KV_LAYOUTS}")
    if config.kv_layout == "paged":
        if config.page_size <= 0 or config.page_size % 16:
            reasons.append(f"page_size={config.page_size} must be a positive multiple of 16")
    elif config.page_size != 0:
        reasons.append(f"page_size={config.page_size} needs kv_layout='paged'")
    packed_kv = config.kv_layout == "varlen"
    if config.kv_layout in ("dense", "varlen") and config.varlen_q != packed_kv:
        reasons.append(
            "varlen_q and kv_layout='varlen' go together (packed queries need per-sequence "
            "key lengths; 'cache' and 'paged' serve either query layout)"
        )
    if config.single_query and not (
        config.kv_layout in ("cache", "paged") and not config.mask.causal and not config.persistent
    ):
        reasons.append(
            "single_query (decode: a tile's rows are the heads of one query token, the "
            "sequence's last) needs a 'cache' or 'paged' kv_layout, no causal mask (that "
            "query sees every key; a window is allowed) and a non-persistent launch"
        )
    packed = config.varlen_q and config.kv_layout == "varlen"
    if config.persistent and (config.split_kv or (config.is_varlen and not packed)):
        reasons.append(
            "persistent kernels serve dense problems and packed queries with packed keys, "
            "without split-KV"
        )
    if config.dynamic_schedule and not config.persistent:
        reasons.append("dynamic_schedule needs persistent=True (it schedules persistent CTAs)")
    dense_dynamic = config.dynamic_schedule and not config.is_varlen
    packed_dynamic = config.dynamic_schedule and packed
    if config.l2_group_mb < 0 or (bool(config.l2_group_mb) != dense_dynamic and not packed_dynamic):
        reasons.append(
            f"l2_group_mb={config.l2_group_mb}: a positive MiB count for dense kernels "
            "with dynamic_schedule=True, >= 0 for packed ones (0: one group), else 0"
        )
    if config.persistent and packed and not config.dynamic_schedule:
        reasons.append(
            "persistent packed queries need dynamic_schedule=True (their tiles are unequal "
            "and counted on the device)"
        )
    capacity = min(SMEM_CAPACITY_BYTES, SM_SMEM_BYTES // max(config.ctas_per_sm, 1) - 1024)
    if not reasons and smem_bytes(config) > capacity:
        reasons.append(
            f"tiles need {smem_bytes(config)} B of shared memory "
            f"(> {capacity} B for {config.ctas_per_sm} CTA(s) per SM): lower tile_n or "
            "num_stages"
        )
    return reasons
