"""The GPU fuzz's config generator and harness, on the CPU (`tests/fuzz_configs.py`,
`tests/fuzz_cases.py`), so the GPU run never fails on a malformed config or a broken check.

Compared against: the registry (every dtype, head dim, mask and precompiled page size it
serves is drawn, and every config's kernel identity is served); the public API's own
validation on meta tensors (each config is a call it accepts) and the value checks the ops
run on CPU metadata (offsets, lengths within the cache, block-table entries in range);
sparsek's CPU reference path (a sample of configs, one or more per variant, run through the
harness pass its check against the float64 oracle); and planted errors (the check reports
each). The kernel pool's parallel precompile is run on two kernels.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pytest
import torch
from fuzz_cases import build_case, check, run_config
from fuzz_configs import (
    COUNT_ENV,
    DEFAULT_COUNT,
    DEFAULT_SEED,
    ONLY_ENV,
    PATHS,
    SEED_ENV,
    VARIANTS,
    VIEWS,
    FuzzConfig,
    configs_from_env,
    generate,
    kernel_pool,
    precompile,
    registry_axes,
)

from cutedsl_kernels.config import FmhaFwdConfig, MaskSpec
from sparsek import registry, tuning
from sparsek.errors import UnsupportedError
from sparsek.reference_varlen import check_kvcache_values, check_varlen_values

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
        *(f"mask:{mask}" for mask in axes.masks),
        *(f"variant:{variant}" for variant in VARIANTS),
        *(f"cache:{kind}" for kind in axes.caches),
        *(f"views:{views}" for views in VIEWS),
        "zero_len", "odd_len", "sq!=sk", "mha", "gqa", "mqa", "pad_q", "pad_k",
        "nan_padding", "custom_scale", "packed_q", "batched_q",
        "splits:auto", "splits:none", "splits:n",
        "nan_kv_padding",  # known bug (b): NaN in varlen K/V past cu_seqlens_k[-1]
        "packed_decode_empty_seq",  # known bug (a): packed decode with an empty sequence
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


def test_axes_follow_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head dim registered by a tuning row joins the fuzz; a mask the public API cannot
    express stops it with the reason."""
    arch = ARCHES[0]
    row = tuning.BASE[(arch, registry.registered_head_dims(arch)[0])]
    with tuning.override("base", arch, 96, row):
        axes = registry_axes(arch)
        assert 96 in axes.head_dims
        assert any(c.head_dim == 96 for c in generate(1, 300, axes))
    monkeypatch.setattr(registry, "MASKS", (*registry.MASKS, MaskSpec(window=True)))
    with pytest.raises(NotImplementedError, match="mask=window"):
        registry_axes(arch)


def test_every_config_is_a_valid_call(
    configs: list[FuzzConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each config, built on the meta device, passes the entry point's validation (which
    then refuses the meta device under SPARSEK_STRICT=1, after every argument check), its
    metadata passes the ops' value checks, and the registry serves its kernel identity."""
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    arch = ARCHES[0]
    masks = {mask.name: mask for mask in registry.MASKS}
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


def planted_case() -> FuzzConfig:
    axes = registry_axes(ARCHES[0])
    return FuzzConfig(
        index=0, variant="varlen", dtype=axes.dtypes[-1], head_dim=axes.head_dims[0],
        mask="causal" if "causal" in axes.masks else axes.masks[0], heads=(4, 2),
        q_lens=(3, 0, 40, 5), k_lens=(3, 0, 45, 7), seed=5, pad_q=2, pad_k=3, nan_padding=True,
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


def test_precompile_fills_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's parallel build (spawned processes inheriting SPARSEK_CACHE_DIR) leaves a
    committed cache entry per kernel."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    monkeypatch.setenv("SPARSEK_CACHE_DIR", str(tmp_path))
    kernels = kernel_pool(ARCHES[0])[:2]
    report = precompile(kernels, jobs=2)
    assert report.failures == () and report.jobs == 2
    assert len(list(tmp_path.rglob("manifest.json"))) == len(kernels)
    assert "2 kernels ready" in report.line()
    assert "not precompiled" in precompile(kernels, jobs=0).line()
