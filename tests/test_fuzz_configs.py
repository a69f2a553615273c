"""The GPU fuzz's config generator and harness, on the CPU (`tests/fuzz_configs.py`,
`tests/fuzz_cases.py`), so the GPU run never fails on a malformed config or a broken check.

Compared against: the registry (every dtype, head dim, served mask and precompiled page
size is drawn, and every config's kernel identity is served); the public API's own
validation on meta tensors (each config is a call it accepts) and the value checks the ops
run on CPU metadata (offsets, lengths within the cache, block-table entries in range);
the CUDA launch paths' plans, run on meta tensors with the kernels faked (every kernel a
config launches on a GPU of 78, 114 or 132 SMs is in the precompiled pool); sparsek's CPU
reference path (a sample of configs, one or more per variant and per mask and path, run
through the harness pass its check against the float64 oracle); sparsek's float64
reference (the fuzz's own masked oracle agrees with it to float64 rounding); and planted
errors (the check reports each, a call with another window, softcap or sinks included).
The kernel pool's parallel precompile is run on two kernels.
"""

from __future__ import annotations

import collections
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fuzz_cases import Case, build_case, check, masked_attention, run_config
from fuzz_configs import (
    COUNT_ENV,
    DEFAULT_COUNT,
    DEFAULT_SEED,
    MASKED_SHARE,
    NO_WINDOW,
    ONLY_ENV,
    PATHS,
    SEED_ENV,
    VARIANTS,
    VIEWS,
    FuzzConfig,
    configs_from_env,
    coverage_plan,
    generate,
    is_plain,
    kernel_pool,
    precompile,
    registry_axes,
)

from cutedsl_kernels.config import DENSE, FmhaFwdConfig, KernelConfig, MaskSpec
from sparsek import ops, registry, tuning
from sparsek.errors import UnsupportedError
from sparsek.launch import dense, launcher
from sparsek.masks import make_mask
from sparsek.reference import reference_attention
from sparsek.reference_varlen import check_kvcache_values, check_varlen_values
from sparsek.tuning import Workload

ARCHES = registry.registered_arches()


@pytest.fixture(scope="module", params=ARCHES)
def configs(request: pytest.FixtureRequest) -> list[FuzzConfig]:
    """The default run's configs for each registered architecture."""
    return generate(DEFAULT_SEED, DEFAULT_COUNT, registry_axes(request.param))


def test_generation_is_deterministic_for_a_seed() -> None:
    axes = registry_axes(ARCHES[0])
    first = generate(7, 200, axes)
    assert first == generate(7, 200, axes)
    assert [repr(c) for c in first] == [repr(c) for c in generate(7, 200, axes)]
    assert first != generate(8, 200, axes)
    assert [c.index for c in first] == list(range(200))


def test_default_run_has_500_configs_or_more(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (SEED_ENV, COUNT_ENV, ONLY_ENV):
        monkeypatch.delenv(name, raising=False)
    seed, configs = configs_from_env(registry_axes(ARCHES[0]))
    assert seed == DEFAULT_SEED and len(configs) == DEFAULT_COUNT >= 500


def test_environment_picks_seed_count_and_indexes(monkeypatch: pytest.MonkeyPatch) -> None:
    axes = registry_axes(ARCHES[0])
    monkeypatch.setenv(SEED_ENV, "0x11")
    monkeypatch.setenv(COUNT_ENV, "40")
    monkeypatch.delenv(ONLY_ENV, raising=False)
    seed, configs = configs_from_env(axes)
    assert seed == 17 and configs == generate(17, 40, axes)
    monkeypatch.setenv(ONLY_ENV, "3, 39")
    assert configs_from_env(axes)[1] == [configs[3], configs[39]]


def test_covers_every_path_dtype_head_dim_mask_and_feature(configs: list[FuzzConfig]) -> None:
    axes = registry_axes(ARCHES[0])
    seen = collections.Counter(tag for config in configs for tag in config.features())
    wanted = {
        *PATHS,
        *(f"dtype:{dtype}" for dtype in axes.dtypes),
        *(f"d{head_dim}" for head_dim in axes.head_dims),
        *(f"mask:{mask.name}" for mask in registry.SERVED_MASKS),
        *(f"variant:{variant}" for variant in VARIANTS),
        *(f"cache:{kind}" for kind in axes.caches),
        *(f"views:{views}" for views in VIEWS),
        "zero_len", "odd_len", "sq!=sk", "mha", "gqa", "mqa", "pad_q", "pad_k",
        "nan_padding", "custom_scale", "packed_q", "batched_q",
        "splits:auto", "splits:none", "splits:n",
        "nan_kv_padding",  # known bug (b): NaN in varlen K/V past cu_seqlens_k[-1]
        "packed_decode_empty_seq",  # known bug (a): packed decode with an empty sequence
        *(f"window:{shape}" for shape in ("causal", "left", "right", "two_sided")),
        "window:0", "window:1", "window:tile", "window:past_seq", "window:rows_without_keys",
        "window:causal_folds_right", "causal_as_window", "causal_folds_right",
        "softcap:strong", "softcap:medium", "softcap:mild",
        "sinks", "sinks:dominant", "sinks:spread",
    }  # fmt: skip
    assert wanted <= set(seen), sorted(wanted - set(seen))
    identities = {(c.path, c.dtype, c.head_dim, c.mask) for c in configs}
    for path in PATHS:
        for dtype in axes.dtypes:
            for head_dim in axes.head_dims:
                for mask in axes.masks:
                    assert (path, dtype, head_dim, mask) in identities
    kv = {(c.cache, c.packed_q, c.num_splits > 1) for c in configs if c.path == "kvcache"}
    assert kv == {(kind, p, s) for kind in axes.caches for p in (0, 1) for s in (0, 1)}
    for bug in ("nan_kv_padding", "packed_decode_empty_seq"):
        assert seen[bug] >= 8, (bug, seen[bug])


def test_every_mask_meets_every_variant_and_cache_kind(configs: list[FuzzConfig]) -> None:
    """Each served mask runs on every variant that takes it (the SDPA drop-in: none and
    causal only) and over every cache kind."""
    axes = registry_axes(ARCHES[0])
    pairs = {(c.variant, c.mask) for c in configs}
    for variant in VARIANTS:
        takes = axes.plain_masks if variant == "dense_sdpa" else axes.masks
        assert {m for v, m in pairs if v == variant} == set(takes), variant
    caches = {(c.cache, c.mask) for c in configs if c.path == "kvcache"}
    assert caches == {(kind, mask) for kind in axes.caches for mask in axes.masks}


def test_masks_share_the_coverage_block_and_half_the_random_draws(
    configs: list[FuzzConfig],
) -> None:
    """The coverage block gives every served mask the same share (each on every path with
    every dtype and head dim); about half of the random draws after it ask for a window,
    softcap or sinks; window sizes reach the edges (0, 1, about a tile), softcaps are
    strong and mild, and some sinks dominate their rows."""
    axes = registry_axes(ARCHES[0])
    plan = coverage_plan(axes)
    per_mask = collections.Counter(entry[4] for entry in plan)
    assert set(per_mask) == set(axes.masks) and len(set(per_mask.values())) == 1, per_mask
    drawn = configs[len(plan) :]
    assert len(drawn) >= 50
    share = sum(not is_plain(c.mask) for c in drawn) / len(drawn)
    assert abs(share - MASKED_SHARE) <= 0.12, share
    masked = [c for c in configs if not is_plain(c.mask)]
    windows = [c.window for c in masked if c.spec.window]
    sizes = {size for window in windows for size in window}
    assert {0, 1, 63, 64, 127, 128, 129} <= sizes, sorted(sizes)
    assert {c.softcap for c in masked if c.spec.softcap} >= {2.0, 5.0, 30.0, 50.0}
    assert any(c.sinks is not None and c.sinks[0] >= 12 for c in masked)


def test_repr_round_trips_and_the_arguments_ask_for_the_mask(configs: list[FuzzConfig]) -> None:
    """A config's repr rebuilds it (what a failure report prints is a complete rerun);
    mask arguments that ask for another kernel mask than the config names are refused."""
    for config in configs:
        assert eval(repr(config), {"FuzzConfig": FuzzConfig}) == config
        spec = config.spec
        sinks = config.sinks is not None
        assert make_mask(config.causal, config.window, config.softcap, sinks).spec == spec
    window = next(c for c in configs if c.mask == "window")
    with pytest.raises(ValueError, match="ask for mask=full, not window"):
        replace(window, causal=False, window=NO_WINDOW)
    with pytest.raises(ValueError, match="ask for mask=causal, not window"):
        replace(window, causal=False, window=(-1, 0))
    sdpa = next(c for c in configs if c.variant == "dense_sdpa")
    with pytest.raises(ValueError, match="the SDPA drop-in has no mask=softcap"):
        replace(sdpa, mask="softcap", causal=False, softcap=3.0)


def test_axes_follow_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head dim registered by a tuning row joins the fuzz, every served mask is drawn;
    a served mask the public API's mask arguments cannot ask for stops it with the
    reason."""
    arch = ARCHES[0]
    row = tuning.BASE[(arch, registry.registered_head_dims(arch)[0])]
    with tuning.override("base", arch, 96, row):
        axes = registry_axes(arch)
        assert 96 in axes.head_dims
        assert any(c.head_dim == 96 for c in generate(1, 300, axes))
    axes = registry_axes(arch)
    assert axes.masks == tuple(m.name for m in registry.SERVED_MASKS)
    assert axes.plain_masks == tuple(m.name for m in registry.SERVED_MASKS if m in registry.MASKS)
    both = MaskSpec(causal=True, window=True)  # no call asks for it: causal folds into a window
    monkeypatch.setattr(registry, "SERVED_MASKS", (*registry.SERVED_MASKS, both))
    with pytest.raises(NotImplementedError, match="mask=causal\\+window"):
        registry_axes(arch)


def test_every_config_is_a_valid_call(
    configs: list[FuzzConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each config, built on the meta device, passes the entry point's validation (which
    then refuses the meta device under SPARSEK_STRICT=1, after every argument check), its
    metadata passes the ops' value checks, and the registry serves its kernel identity."""
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    arch = ARCHES[0]
    masks = registry.MASK_BY_NAME
    for config in configs:
        case = build_case(config, "meta")
        with pytest.raises(UnsupportedError, match="device=meta"):
            case.api(*case.args, **case.kwargs)
        meta = {k: None if v is None else torch.tensor(v) for k, v in case.metadata.items()}
        q, k = case.args[0], case.args[1]
        assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
        if config.path == "varlen":
            check_varlen_values(
                q, k, meta["cu_seqlens_q"], meta["cu_seqlens_k"],
                config.max_seqlen_q, config.max_seqlen_k,
            )  # fmt: skip
        elif config.path == "kvcache":
            check_kvcache_values(
                q, k, meta["cache_seqlens"], meta["block_table"], meta["cu_seqlens_q"],
                config.max_seqlen_q if config.packed_q else None,
            )  # fmt: skip
            table = case.metadata["block_table"]
            if table is not None:  # every used block belongs to one sequence only
                blocks = config.page_size
                used = [row[: -(-n // blocks)] for row, n in zip(table, config.k_lens, strict=True)]
                ids = [i for row in used for i in row]
                assert len(ids) == len(set(ids)), config
        found = registry.find(
            arch, config.head_dim, config.dtype, masks[config.mask], config.layout()
        )
        assert isinstance(found, FmhaFwdConfig), (config, found)


# ---------------------------------------------------------------------------- the kernel pool


def launch_as_on_a_gpu(case: Case) -> None:
    """Run `case`'s call through the CUDA implementation of its entry point (the launch
    paths' planning and kernel choice), whatever the device of its tensors."""
    config, kw = case.config, case.kwargs
    scale = config.scale if config.scale is not None else config.head_dim**-0.5
    sinks = case.sinks
    window = kw.get("window_size", NO_WINDOW)
    assert isinstance(window, tuple)
    mask = make_mask(config.causal, window, config.softcap, sinks is not None)
    extra = (mask.window_left, mask.window_right, mask.softcap, sinks)
    if config.variant == "dense_sdpa":
        q, k, v = (t.transpose(1, 2) for t in case.args)
        dense.attention(q, k, v, mask.causal, scale, True)
    elif config.path == "dense":
        dense.attention(*case.args, mask.causal, scale, False, *extra)
    elif config.path == "varlen":
        ops.attention_varlen_cuda(*case.args, mask.causal, scale, *extra)
    else:
        q, k_cache, v_cache, seqlens, table = case.args
        ops.attention_with_kvcache_cuda(
            q, k_cache, v_cache, seqlens, table, kw["cu_seqlens_q"], kw["max_seqlen_q"],
            mask.causal, scale, config.num_splits, *extra,
        )  # fmt: skip


@pytest.mark.parametrize("sms", [78, 114, 132])
def test_pool_holds_every_kernel_the_plans_launch(
    configs: list[FuzzConfig], sms: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each config's call, planned by the CUDA launch paths on a GPU of `sms` SMs (meta
    tensors; the registry answers, the kernels do nothing), is served by kernels only
    (no reference fallback) and launches only kernels of the pool precompiled for that
    GPU (which holds little else), itself part of the pool for any GPU."""
    arch = ARCHES[0]
    launched: dict[KernelConfig, int] = {}  # kernel -> index of the first config
    index = [0]
    fallbacks: list[int] = []

    def kernel_config(q, v, mask, layout, workload=Workload.DEFAULT):
        dtype = registry.dtype_name(q.dtype)
        found = registry.find(arch, q.shape[-1], dtype, mask, layout, workload)
        return "; ".join(found) if isinstance(found, tuple) else found

    def fallback(*args, **kwargs):
        fallbacks.append(index[0])

    def forward_kernel(
        device, head_dim, dtype, mask, layout=DENSE, workload=Workload.DEFAULT, head_dim_v=None,
        cache_dtype=None,
    ):  # fmt: skip
        config = registry.lookup(
            arch, head_dim, dtype, mask, layout, workload, head_dim_v, cache_dtype=cache_dtype
        )
        launched.setdefault(config, index[0])
        return launcher.ForwardKernel(lambda *args: None, config)

    def combine_kernel(device, head_dim, dtype, sinks=False):
        launched.setdefault(registry.lookup_combine(arch, head_dim, dtype, sinks), index[0])
        return lambda *args: None

    monkeypatch.setattr(launcher, "kernel_config", kernel_config)
    monkeypatch.setattr(launcher, "forward_kernel", forward_kernel)
    monkeypatch.setattr(launcher, "combine_kernel", combine_kernel)
    monkeypatch.setattr(launcher, "num_sms", lambda device_index: sms)
    monkeypatch.setattr(ops, "attention_varlen_reference", fallback)
    monkeypatch.setattr(ops, "attention_with_kvcache_reference", fallback)
    for config in configs:
        index[0] = config.index
        launch_as_on_a_gpu(build_case(config, "meta"))
    assert not fallbacks, fallbacks
    pool = kernel_pool(arch, configs, torch.device("meta"))  # (num_sms answers `sms`)
    missing = {k.name: i for k, i in launched.items() if k not in pool}
    assert not missing, missing
    assert set(pool) <= set(kernel_pool(arch, configs))
    assert len(launched) >= 0.9 * len(pool), (len(launched), len(pool))  # little to spare


def test_pool_takes_the_mask_kernels_of_what_the_configs_draw(configs: list[FuzzConfig]) -> None:
    """The pool is drawn from `registry.mask_kernels` of the configs' masks: the plain
    and causal share is the precompiled set's, and a subset of configs (one mask, one
    head dim and dtype, one path) takes only kernels of those."""
    arch = ARCHES[0]
    pool = kernel_pool(arch, configs)
    served = {k for mask in registry.SERVED_MASKS for k in registry.mask_kernels(arch, mask)}
    assert set(pool) <= served and len(pool) == len(set(pool))
    plain = kernel_pool(arch, [c for c in configs if is_plain(c.mask)])
    assert set(plain) <= set(registry.registered_kernels(arch))
    some = [
        c for c in configs
        if c.mask == "window+sinks" and c.path == "varlen" and c.head_dim == 64
        and c.dtype == "float16"
    ]  # fmt: skip
    assert some
    [kernel] = kernel_pool(arch, some)
    assert (
        isinstance(kernel, FmhaFwdConfig) and kernel.mask == registry.MASK_BY_NAME["window+sinks"]
    )
    assert (kernel.head_dim, kernel.dtypes.qk, kernel.kv_layout) == (64, "float16", "varlen")


# ---------------------------------------------------------------------------- the harness on CPU


def harness_sample(configs: list[FuzzConfig]) -> list[FuzzConfig]:
    """Per variant, its cheapest config (often an empty edge case) and the three cheapest
    of some size (>= 4096 score elements) whose reference fits the CPU."""
    sample = []
    for variant in VARIANTS:
        ranked = sorted((c for c in configs if c.variant == variant), key=lambda c: sum(c.work()))
        sized = [c for c in ranked[1:] if 1 << 12 <= sum(c.work()) <= 1 << 22]
        sample += [c for c in ranked[:1] if sum(c.work()) <= 1 << 22] + sized[:3]
    return sample


def test_harness_passes_sparsek_cpu_reference(configs: list[FuzzConfig]) -> None:
    """The CPU path of each entry point (sparsek's float32 reference; the SDPA drop-in
    falls back to torch) passes the fuzz's check: inputs, layouts, calls, row bookkeeping
    and oracle agree."""
    sample = harness_sample(configs)
    assert {c.variant for c in sample} >= set(VARIANTS) - {"dense_long"}
    failures = {c.index: run_config(c, "cpu") for c in sample}
    assert not any(failures.values()), {i: p for i, p in failures.items() if p}


def masked_sample(configs: list[FuzzConfig]) -> list[FuzzConfig]:
    """Per mask with a window, softcap or sinks and per path, its two cheapest configs of
    some size (>= 4096 score elements) whose reference fits the CPU."""
    sample = []
    for mask in registry.SERVED_MASKS:
        for path in PATHS:
            ranked = sorted(
                (c for c in configs if c.mask == mask.name and c.path == path),
                key=lambda c: sum(c.work()),
            )
            sample += [c for c in ranked if 1 << 12 <= sum(c.work()) <= 1 << 21][:2]
    return [c for c in sample if not is_plain(c.mask)]


def test_harness_passes_masked_configs_on_cpu(configs: list[FuzzConfig]) -> None:
    """Calls with a window, softcap or sinks on the CPU path (sparsek's float32
    reference) pass the fuzz's check against its own float64 oracle."""
    sample = masked_sample(configs)
    assert {(c.mask, c.path) for c in sample} == {
        (m, p) for m in registry_axes(ARCHES[0]).feature_masks for p in PATHS
    }
    failures = {c.index: run_config(c, "cpu") for c in sample}
    assert not any(failures.values()), {i: p for i, p in failures.items() if p}


def test_masked_oracle_agrees_with_sparsek_reference(configs: list[FuzzConfig]) -> None:
    """The fuzz's float64 oracle for windows, softcap and sinks (written from the
    documented semantics) equals `sparsek.reference.reference_attention` in float64 on
    each sequence of a sample, rows without keys included; its same-dtype peer is close
    (its error sets the tolerance, so it must not be vacuous)."""
    worst = 0.0
    for config in masked_sample(configs)[::2]:
        case = build_case(config, "cpu")
        scale = config.scale if config.scale is not None else config.head_dim**-0.5
        for q, k, v in zip(case.q_seqs, case.k_seqs, case.v_seqs, strict=True):
            mask = (config.band, config.softcap, case.sinks)
            out, lse = masked_attention(q, k, v, scale, *mask)
            want, want_lse = reference_attention(
                q[None], k[None], v[None], causal=config.causal, softmax_scale=scale,
                window_size=config.window, softcap=config.softcap, sinks=case.sinks,
                compute_dtype=torch.float64,
            )  # fmt: skip
            torch.testing.assert_close(out, want[0], atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(lse, want_lse[0], atol=1e-10, rtol=1e-10)
            peer, _ = masked_attention(q, k, v, scale, *mask, peer=True)
            assert peer.dtype == q.dtype
            if out.numel():
                worst = max(worst, (peer.double() - out).abs().max().item())
    assert 0 < worst < 0.02, worst


def planted_case() -> FuzzConfig:
    axes = registry_axes(ARCHES[0])
    return FuzzConfig(
        index=0, variant="varlen", dtype=axes.dtypes[-1], head_dim=axes.head_dims[0],
        mask="causal", heads=(4, 2), q_lens=(3, 0, 40, 5), k_lens=(3, 0, 45, 7), seed=5,
        pad_q=2, pad_k=3, nan_padding=True, causal=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("plant", "fragment"),
    [
        ("offset", "sequence 2 (q_len=40, k_len=45): max error"),
        ("nan_row", "NaN output elements"),
        ("padding_nan", "rows 48..49 past the last sequence are not 0"),
        ("padding_lse", "past the last sequence not -inf"),
        ("lse_shift", "lse off by up to"),
        ("lse_finite", "lse is not -inf exactly where the row sees no key"),
        ("swap", "sequence 0 (q_len=3, k_len=3): max error"),
        ("shape", "expected"),
    ],
)
def test_check_reports_planted_errors(plant: str, fragment: str) -> None:
    case = build_case(planted_case(), "cpu")
    out, lse = case.call()
    assert lse is not None and check(case, out, lse) == []
    out, lse = out.clone(), lse.clone()
    if plant == "offset":
        out[10:12] += 0.05
    elif plant == "nan_row":
        out[4, 1] = math.nan
    elif plant == "padding_nan":
        out[-2:] = math.nan
    elif plant == "padding_lse":
        lse[:, -1] = 0.0
    elif plant == "lse_shift":
        lse[:, 3:40] += 0.1
    elif plant == "lse_finite":
        lse[0, 0] = -math.inf  # the first query sees key 0
    elif plant == "swap":  # rows of sequence 0 given to sequence 3 and back (a misroute)
        out[[0, 1, 2, 43, 44, 45]] = out[[43, 44, 45, 0, 1, 2]]
    elif plant == "shape":
        out = out[:-1]
    problems = check(case, out, lse)
    assert any(fragment in p for p in problems), problems


def planted_masked_case() -> FuzzConfig:
    axes = registry_axes(ARCHES[0])
    return FuzzConfig(
        index=0, variant="varlen", dtype="float16", head_dim=axes.head_dims[0],
        mask="window+softcap+sinks", heads=(4, 2), q_lens=(40, 7, 0), k_lens=(60, 5, 9),
        seed=7, pad_q=2, window=(9, 3), softcap=2.0, sinks=(1.0, 1.0),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("plant", "fragment"),
    [
        ("left", "max error"),
        ("right", "max error"),
        ("causal", "max error"),
        ("softcap", "max error"),
        ("no_softcap", "max error"),
        ("no_sinks", "lse off by up to"),
        ("sinks_shift", "lse off by up to"),
        ("sinks_swap", "lse off by up to"),
    ],
)
def test_check_reports_a_call_with_another_mask(plant: str, fragment: str) -> None:
    """A call whose window is one key wider on either side, causal, whose softcap differs
    or is missing, or whose sinks are missing, shifted or given to other heads, fails the
    check of the config it was built for."""
    case = build_case(planted_masked_case(), "cpu")
    out, lse = case.call()
    assert lse is not None and check(case, out, lse) == []
    sinks = case.sinks
    assert sinks is not None
    changes: dict[str, dict[str, object]] = {
        "left": {"window_size": (10, 3)},
        "right": {"window_size": (9, 4)},
        "causal": {"causal": True},
        "softcap": {"softcap": 3.0},
        "no_softcap": {"softcap": 0.0},
        "no_sinks": {"sinks": None},
        "sinks_shift": {"sinks": sinks + 0.5},
        "sinks_swap": {"sinks": sinks.flip(0)},
    }
    case.kwargs.update(changes[plant])
    out, lse = case.call()
    problems = check(case, out, lse)
    assert any(fragment in p for p in problems), problems


def test_precompile_fills_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's parallel build (spawned processes inheriting SPARSEK_CACHE_DIR) leaves a
    committed cache entry per kernel."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    monkeypatch.setenv("SPARSEK_CACHE_DIR", str(tmp_path))
    kernels = kernel_pool(ARCHES[0], generate(1, 20, registry_axes(ARCHES[0])))[:2]
    report = precompile(kernels, jobs=2)
    assert report.failures == () and report.jobs == 2
    assert len(list(tmp_path.rglob("manifest.json"))) == len(kernels)
    assert "2 kernels ready" in report.line()
    assert "not precompiled" in precompile(kernels, jobs=0).line()
