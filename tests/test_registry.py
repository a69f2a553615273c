"""Registry answers: which config serves which request, and why a request is refused.

Compared against: the registry's table (sm_90a: head_dim 64/128 x float16/bfloat16 x
causal/non-causal, 128x128 tiles, 2 stages) and the kernels' own `can_implement`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cutedsl_kernels import build
from cutedsl_kernels.config import (
    CAUSAL,
    DENSE,
    NO_MASK,
    PACKED,
    ElementTypes,
    FmhaFwdConfig,
    Layout,
    MaskSpec,
)
from sparsek import memo, registry, tuning
from sparsek.errors import UnsupportedError
from sparsek.tuning import Tuning, Workload


def fwd_config(
    arch: str = "sm_90a",
    head_dim: int = 128,
    dtype: str = "bfloat16",
    is_causal: bool = False,
    **fields: object,
) -> FmhaFwdConfig:
    """`FmhaFwdConfig` by (arch, head_dim, dtype, causal) and any other fields by name."""
    return FmhaFwdConfig(
        arch, head_dim, ElementTypes.uniform(dtype), MaskSpec(causal=is_causal), **fields
    )


@pytest.fixture
def kernels_accept_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "can_implement", lambda config: [])


def test_sm90_table() -> None:
    configs = registry.registered_configs("sm_90a")
    assert len(configs) == 28
    assert {(c.head_dim, c.value_head_dim, c.dtypes.qk, c.mask.causal) for c in configs} == {
        (d, v, t, c)
        for d, v in ((32, 32), (64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256))
        for t in ("float16", "bfloat16")
        for c in (False, True)
    }
    assert all(c.dtypes == ElementTypes.uniform(c.dtypes.qk) for c in configs)
    assert all(c.mask in registry.MASKS for c in configs)
    tiles = {
        (c.head_dim, c.mask.causal): (c.tile_m, c.tile_n, c.num_stages)
        for c in configs
        if c.head_dim_v is None
    }
    assert tiles == {
        (32, False): (192, 128, 2),
        (32, True): (128, 128, 2),
        (64, False): (192, 128, 2),  # three MMA warpgroups: +15% at S=8k (perf/NOTES.md)
        (64, True): (128, 128, 2),  # 192x128 for long queries (Workload.LONG_Q)
        (96, False): (192, 112, 2),  # the widest 192-row tile within 160 registers
        (96, True): (128, 128, 2),
        (128, False): (128, 128, 2),
        (128, True): (128, 128, 2),
        (192, False): (128, 112, 2),
        (192, True): (128, 112, 2),
        (256, False): (128, 80, 2),  # FlashAttention-3/4's tile; fits by 1 KiB
        (256, True): (128, 80, 2),
    }
    assert len({c.name for c in configs}) == 28
    # (192, 128), DeepSeek-style MLA prefill: V 128 wide leaves room for 128x128 tiles.
    mla = {(c.tile_m, c.tile_n, c.persistent) for c in configs if c.head_dim_v == 128}
    assert mla == {(128, 128, False)}
    assert registry.registered_value_head_dims("sm_90a", 192) == [192, 128]
    assert registry.registered_value_head_dims("sm_90a", 128) == [128]
    assert registry.registered_arches() == ["sm_90a"]
    assert registry.registered_configs("sm_80") == []


@pytest.mark.usefixtures("kernels_accept_all")
@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_lookup_returns_registered_config(dtype: torch.dtype | str) -> None:
    config = registry.lookup("sm_90a", 128, dtype, CAUSAL)
    expected = fwd_config(
        "sm_90a", 128, "bfloat16", True, tile_m=128, tile_n=128, num_stages=2, persistent=True
    )
    assert config == expected
    assert registry.lookup("sm_90a", 128, dtype, registry.mask_of(True)) == config


@pytest.mark.usefixtures("kernels_accept_all")
@pytest.mark.parametrize(
    ("arch", "head_dim", "dtype", "fragments"),
    [
        (
            "sm_90a",
            80,
            torch.float16,
            ["head_dim=80 is not supported on sm_90a", "32, 64, 96, 128, 192, 256"],
        ),
        ("sm_90a", 64, torch.float32, ["dtype=float32 is not supported", "float16, bfloat16"]),
        ("sm_80", 64, torch.float16, ["arch=sm_80 has no registered kernels", "sm_90a"]),
        ("sm_90a", 80, torch.float64, ["head_dim=80", "dtype=float64"]),
    ],
)
def test_lookup_refusals_carry_every_reason(
    arch: str, head_dim: int, dtype: torch.dtype, fragments: list[str]
) -> None:
    with pytest.raises(UnsupportedError) as info:
        registry.lookup(arch, head_dim, dtype, NO_MASK)
    assert isinstance(info.value, ValueError)
    text = " | ".join(info.value.reasons)
    for fragment in fragments:
        assert fragment in text
        assert fragment in str(info.value)


def test_lookup_reports_kernel_can_implement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "can_implement", lambda c: ["smem budget exceeded", "too wide"])
    with pytest.raises(UnsupportedError) as info:
        registry.lookup("sm_90a", 64, torch.float16, NO_MASK)
    assert len(info.value.reasons) == 2
    assert "smem budget exceeded" in info.value.reasons[0]
    assert "fmha_fwd_sm_90a_d64_float16_full" in info.value.reasons[0]


def test_kernel_import_failure_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(config: FmhaFwdConfig) -> list[str]:
        raise ModuleNotFoundError("No module named 'cutlass'")

    monkeypatch.setattr(build, "can_implement", broken)
    with pytest.raises(UnsupportedError, match="kernel module cannot be imported"):
        registry.lookup("sm_90a", 128, torch.float16, CAUSAL)


def test_every_registered_config_is_implementable() -> None:
    """The real kernels accept every row of the table (imports the DSL, compiles nothing)."""
    for config in registry.registered_configs("sm_90a"):
        assert build.can_implement(config) == [], config.name
        dims = (config.head_dim, config.dtypes.qk, config.mask)
        assert registry.lookup("sm_90a", *dims, head_dim_v=config.head_dim_v) == config


def test_arch_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.arch_from_capability((9, 0)) == "sm_90a"
    assert registry.arch_from_capability((10, 0)) == "sm_100a"
    assert registry.arch_from_capability((8, 0)) == "sm_80"
    monkeypatch.setenv("SPARSEK_ARCH", "sm_100a")
    assert registry.detect_arch() == "sm_100a"
    monkeypatch.delenv("SPARSEK_ARCH")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert registry.detect_arch() is None


def test_unsupported_error_keeps_reasons() -> None:
    err = UnsupportedError("no kernel", ["a", "b"])
    assert err.reasons == ["a", "b"] and str(err) == "no kernel: a; b"
    assert str(UnsupportedError("plain")) == "plain"


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("layout", [("cache", 0), ("paged", 16)])
def test_decode_workloads_take_64_row_tiles(head_dim: int, layout: tuple[str, int]) -> None:
    kv_layout, page_size = layout
    cache = Layout(kv_layout=kv_layout, page_size=page_size)
    config = registry.lookup("sm_90a", head_dim, "bfloat16", NO_MASK, cache, Workload.DECODE)
    assert config.tile_m == 64 and config.kv_layout == kv_layout and not config.varlen_q
    assert registry.lookup("sm_90a", head_dim, "bfloat16", NO_MASK, cache).tile_m > 64
    assert config in registry.registered_kernels("sm_90a")


def test_only_decode_kernels_load_kv_evict_first() -> None:
    """Decode reads each K/V byte once (evict-first, perf/NOTES.md #45, #49): every decode
    kernel from d96 up (d128 measured) and the two-CTAs-per-SM ones of d32 / d64 / d96 (d64's
    split rows lose at B1: not there); every other kernel may read a key tile again from
    the L2 (another query tile or head)."""
    kernels = [c for c in registry.registered_kernels("sm_90a") if isinstance(c, FmhaFwdConfig)]
    evict_first = {c for c in kernels if c.kv_evict_first}
    decode = {
        c
        for c in kernels
        if c.tile_m == 64 and c.kv_layout != "dense" and (c.single_query or not c.varlen_q)
    }
    assert evict_first == {c for c in decode if c.head_dim >= 96 or c.ctas_per_sm == 2}
    one_cta = [(d, split, 1) for d in (96, 128, 192, 256) for split in (False, True)]
    two_ctas = [(d, False, 2) for d in (32, 64, 96, 128)]
    assert {(c.head_dim, c.kv_layout, c.split_kv, c.ctas_per_sm) for c in evict_first} == {
        (d, layout, split, ctas)
        for layout in ("cache", "paged")
        for d, split, ctas in one_cta + two_ctas
    }
    assert all(c.name.endswith("_ef") for c in evict_first)


@pytest.mark.parametrize(
    ("mask", "layout", "workload"),
    [
        (CAUSAL, Layout(kv_layout="cache"), Workload.DECODE),
        (NO_MASK, Layout(varlen_q=True, kv_layout="cache"), Workload.DECODE),
        (NO_MASK, DENSE, Workload.DECODE),
        (CAUSAL, Layout(kv_layout="paged", page_size=16), Workload.DECODE_FILLS_GPU),
        # A window reads the query's position: batched decode needs the single_query rows.
        (MaskSpec(window=True), Layout(kv_layout="cache"), Workload.DECODE),
    ],
)
def test_decode_workloads_refuse_what_decode_is_not(
    mask: MaskSpec, layout: Layout, workload: Workload
) -> None:
    with pytest.raises(UnsupportedError, match="decode workloads are non-causal") as info:
        registry.lookup("sm_90a", 128, "bfloat16", mask, layout, workload)
    assert len(info.value.reasons) == 1


def test_windowed_decode_takes_single_query_rows() -> None:
    """Batched or packed, a windowed decode is served by single_query kernels."""
    window = MaskSpec(window=True, sinks=True)
    for varlen_q in (False, True):
        layout = Layout(varlen_q=varlen_q, kv_layout="paged", page_size=16, single_query=True)
        config = registry.lookup("sm_90a", 128, "bfloat16", window, layout, Workload.DECODE)
        assert config.single_query and config.mask == window


def test_decode_filling_the_gpu_is_never_split() -> None:
    split = Layout(kv_layout="cache", split_kv=True)
    with pytest.raises(UnsupportedError, match="never split") as info:
        registry.lookup("sm_90a", 128, "bfloat16", NO_MASK, split, Workload.DECODE_FILLS_GPU)
    assert len(info.value.reasons) == 1
    assert registry.lookup("sm_90a", 128, "bfloat16", NO_MASK, split, Workload.DECODE).split_kv


def test_persistent_for_dense_and_packed() -> None:
    kernels = [c for c in registry.registered_kernels("sm_90a") if isinstance(c, FmhaFwdConfig)]
    persistent = {
        (c.head_dim, c.dtypes.qk, c.mask.causal, c.varlen_q) for c in kernels if c.persistent
    }
    # Two Q buffers do not fit beside d192's and d256's K/V stages: not persistent.
    persistent_dims = (32, 64, 96, 128)
    assert persistent == {
        (d, t, c, v)
        for d in persistent_dims
        for t in ("float16", "bfloat16")
        for c in (False, True)
        for v in (False, True)
    }
    one_wave = {
        registry.lookup("sm_90a", d, t, m, DENSE, Workload.ONE_WAVE)
        for d in registry.registered_head_dims("sm_90a")
        for t in ("float16", "bfloat16")
        for m in registry.MASKS
    }
    assert one_wave <= set(kernels)
    for config in kernels:
        scheduled = config.kv_layout in ("dense", "varlen") and not config.split_kv
        expected = scheduled and config not in one_wave and config.head_dim in persistent_dims
        expected = expected and not config.dtypes.is_fp8  # FP8: one CTA per work tile
        assert config.persistent == expected, config.name


@pytest.mark.parametrize(
    "fields",
    [
        dict(varlen_q=True, kv_layout="cache"),
        dict(kv_layout="cache"),
        dict(kv_layout="paged", page_size=16, is_causal=True),
        dict(kv_layout="cache", split_kv=True),
    ],
    ids=["packed-cache", "cache", "paged-causal", "split"],
)
def test_kernel_refuses_persistent_with_unequal_tiles(fields: dict) -> None:
    base = dict(arch="sm_90a", head_dim=128, dtype="bfloat16", is_causal=False)
    config = fwd_config(**{**base, **fields, "persistent": True})
    reasons = build.can_implement(config)
    assert any("persistent kernels serve dense problems" in r for r in reasons)
    assert build.can_implement(fwd_config(**{**base, **fields})) == []
    dense = fwd_config(**{**base, "is_causal": True, "persistent": True})
    packed = dict(varlen_q=True, kv_layout="varlen", persistent=True, dynamic_schedule=True)
    assert build.can_implement(dense) == build.can_implement(fwd_config(**base, **packed)) == []


def test_dynamic_schedule_needs_persistent_and_packed_needs_it() -> None:
    base = dict(arch="sm_90a", head_dim=128, dtype="bfloat16", is_causal=True)
    reasons = build.can_implement(fwd_config(**base, dynamic_schedule=True))
    assert any("dynamic_schedule needs persistent=True" in r for r in reasons)
    static_packed = fwd_config(**base, varlen_q=True, kv_layout="varlen", persistent=True)
    assert any("need dynamic_schedule=True" in r for r in build.can_implement(static_packed))
    dynamic_dense = fwd_config(**base, persistent=True, dynamic_schedule=True, l2_group_mb=8)
    assert build.can_implement(dynamic_dense) == []
    assert dynamic_dense.name.endswith("_ps_dyn_g8")
    for group_mb, dynamic in ((0, True), (8, False), (-8, True)):
        config = replace(dynamic_dense, dynamic_schedule=dynamic, l2_group_mb=group_mb)
        assert any("l2_group_mb" in r for r in build.can_implement(config)), config
    # Packed tiles: groups of heads (>= 0 MiB, 0 = one group); other layouts have none.
    dynamic_packed = replace(static_packed, dynamic_schedule=True)
    for group_mb in (0, 16):
        assert build.can_implement(replace(dynamic_packed, l2_group_mb=group_mb)) == []
    for config in (
        replace(dynamic_packed, l2_group_mb=-1),
        fwd_config(**base, varlen_q=True, kv_layout="cache", l2_group_mb=16),
    ):
        assert any("l2_group_mb" in r for r in build.can_implement(config)), config
    for head_dim in (64, 128):
        packed = registry.lookup("sm_90a", head_dim, "bfloat16", NO_MASK, PACKED)
        assert packed.l2_group_mb == tuning.PACKED_L2_GROUP_MB > 0


def test_long_causal_queries_take_their_own_tiles() -> None:
    long_d64 = registry.lookup("sm_90a", 64, "bfloat16", CAUSAL, DENSE, Workload.LONG_Q)
    assert (long_d64.tile_m, long_d64.tile_n, long_d64.persistent) == (192, 128, True)
    assert registry.lookup("sm_90a", 64, "bfloat16", CAUSAL).tile_m == 128
    # Long causal problems count their tiles out (longest first); the others are DEFAULT's.
    long_d128 = registry.lookup("sm_90a", 128, "bfloat16", CAUSAL, DENSE, Workload.LONG_Q)
    dense_d128 = registry.lookup("sm_90a", 128, "bfloat16", CAUSAL)
    assert long_d64.dynamic_schedule and long_d128.dynamic_schedule
    assert not dense_d128.dynamic_schedule
    assert long_d128 == replace(dense_d128, dynamic_schedule=True, l2_group_mb=8)
    for head_dim in (64, 128):
        args = ("sm_90a", head_dim, "bfloat16", NO_MASK)
        assert registry.lookup(*args, DENSE, Workload.LONG_Q) == registry.lookup(*args)
    kernels = registry.registered_kernels("sm_90a")
    assert len(kernels) == len(set(kernels)) and long_d64 in kernels
    for workload in (Workload.LONG_Q, Workload.ONE_WAVE):
        with pytest.raises(UnsupportedError, match="is for dense layouts only"):
            registry.lookup("sm_90a", 64, "bfloat16", CAUSAL, PACKED, workload)


def test_two_ctas_per_sm_budget() -> None:
    """ctas_per_sm=2: one MMA warpgroup only (registers), half the SM's shared memory."""
    base = dict(arch="sm_90a", head_dim=128, dtype="bfloat16", is_causal=False, tile_m=64)
    fits = fwd_config(**base, tile_n=64, ctas_per_sm=2)
    assert build.can_implement(fits) == [] and fits.name.endswith("_c2")
    too_big = fwd_config(**base, tile_n=128, ctas_per_sm=2)  # 144 KiB each
    assert any("for 2 CTA(s) per SM" in r for r in build.can_implement(too_big))
    assert build.can_implement(replace(too_big, ctas_per_sm=1)) == []
    two_warpgroups = fwd_config(**{**base, "tile_m": 128}, tile_n=64, ctas_per_sm=2)
    assert any("ctas_per_sm=2 must be 1" in r for r in build.can_implement(two_warpgroups))


def test_register_split_fits_the_register_file() -> None:
    """Each (MMA warpgroups, CTAs per SM) register split fits the SM's register file, and
    `setmaxnreg` takes per-thread counts that are multiples of 8 in [24, 256]."""
    from cutedsl_kernels.hopper import limits

    for (mma_warpgroups, ctas), (producer, mma) in limits.REGS_BY_MMA_WARPGROUPS.items():
        per_cta = limits.THREADS_PER_WARPGROUP * (producer + mma_warpgroups * mma)
        assert ctas * per_cta <= limits.REGISTER_FILE, (mma_warpgroups, ctas)
        for regs in (producer, mma):
            assert regs % 8 == 0 and 24 <= regs <= 256, (mma_warpgroups, ctas, regs)


def test_override_swaps_a_row_within_the_block_and_restores_it() -> None:
    """`tuning.override` changes what the registry answers inside the block only (the memos
    of earlier answers are dropped on entry and exit), also when the block raises; None
    removes the row, so the table below it applies."""
    cache = Layout(kv_layout="cache")
    args = ("sm_90a", 128, "bfloat16", NO_MASK, cache, Workload.DECODE)
    row = tuning.DECODE[("sm_90a", 128)]
    before = registry.lookup(*args)
    assert (before.tile_m, before.tile_n, before.kv_evict_first) == (64, 128, True)
    trial = Tuning(tile_m=64, tile_n=64, num_stages=3)
    with tuning.override("decode", "sm_90a", 128, trial):
        assert registry.find.cache_info().currsize == 0  # memoized answers dropped
        assert tuning.DECODE[("sm_90a", 128)] == trial
        inside = registry.lookup(*args)
        assert (inside.tile_m, inside.tile_n, inside.num_stages) == (64, 64, 3)
        assert not inside.kv_evict_first and inside.kv_layout == "cache"
    assert registry.find.cache_info().currsize == 0
    assert tuning.DECODE[("sm_90a", 128)] is row
    assert registry.lookup(*args) == before
    with tuning.override("decode", "sm_90a", 128, None):
        assert ("sm_90a", 128) not in tuning.DECODE
        base = tuning.BASE[("sm_90a", 128)]  # no decode row: the base row, not persistent
        assert registry.lookup(*args) == registry.lookup(*args[:-1])
        assert registry.lookup(*args).tile_m == base.tile_m > 64
    assert tuning.DECODE[("sm_90a", 128)] is row
    with (
        pytest.raises(RuntimeError, match="inside"),
        tuning.override("base", "sm_90a", 64, Tuning(64, 64, 1)),
    ):
        assert registry.lookup("sm_90a", 64, "float16", NO_MASK).tile_m == 64
        raise RuntimeError("inside")
    assert registry.lookup("sm_90a", 64, "float16", NO_MASK).tile_m == 192
    tables = {"base", "causal", "long_causal", "one_wave", "decode", "decode_fills_gpu", "fp8"}
    assert set(tuning.TABLES) == tables
    with pytest.raises(KeyError), tuning.override("no_such_table", "sm_90a", 128, trial):
        pass  # pragma: no cover


def test_clear_all_empties_registered_memos(monkeypatch: pytest.MonkeyPatch) -> None:
    """`memo.clear_all` empties every registered memo: the registry's, and one registered
    here (on a copy of the list, so that it is forgotten after the test)."""
    monkeypatch.setattr(memo, "_CLEARERS", list(memo._CLEARERS))
    registry.lookup("sm_90a", 64, "bfloat16", CAUSAL)
    assert registry.find.cache_info().currsize > 0
    mine: dict[str, int] = {}
    memo.register(mine.clear)
    memo.remember(mine, "answer", 42)
    memo.clear_all()
    assert registry.find.cache_info().currsize == 0 and mine == {}


def test_mask_kernels_of_the_precompiled_masks_are_the_registered_kernels() -> None:
    """`mask_kernels` of no mask and of causal are exactly what `registered_kernels`
    precompiles (the KV-cache store aside): the two share one account of what the entry
    points launch."""
    registered = set(registry.registered_kernels("sm_90a"))
    plain = {c for mask in (NO_MASK, CAUSAL) for c in registry.mask_kernels("sm_90a", mask)}
    assert {c for c in registered if not c.name.startswith("kv_store")} == plain


def test_mask_kernels_of_every_served_mask_are_implementable() -> None:
    for mask in registry.SERVED_MASKS:
        kernels = registry.mask_kernels("sm_90a", mask)
        forward = [c for c in kernels if isinstance(c, FmhaFwdConfig)]
        assert forward and all(c.mask.window == mask.window for c in forward)
        assert all(c.mask.softcap == mask.softcap for c in forward)
    assert registry.mask_kernels("sm_90a", MaskSpec(causal=True, window=True)) == []
