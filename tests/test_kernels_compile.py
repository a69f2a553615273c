"""Every registered kernel configuration compiles for its architecture without a GPU.

Compared against: nothing numeric — this is the CPU-side guarantee that the DSL accepts
each kernel (fake tensors, symbolic shapes), that the artifact exports as an object file,
and that it loads back (what the disk cache relies on). Numerics run on the GPU
(tests/gpu/).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cutedsl_kernels import build
from cutedsl_kernels.config import (
    NO_MASK,
    CombineConfig,
    ElementTypes,
    FmhaFwdConfig,
    MaskSpec,
)
from sparsek import registry

CONFIGS = [
    cfg for arch in registry.registered_arches() for cfg in registry.registered_kernels(arch)
]


def test_every_registered_arch_has_configs() -> None:
    assert "sm_90a" in registry.registered_arches()
    assert len(registry.registered_configs("sm_90a")) >= 8  # 2 head dims x 2 dtypes x 2 masks


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_registered_config_compiles_exports_and_loads(
    config: FmhaFwdConfig, tmp_path: Path
) -> None:
    assert build.can_implement(config) == []
    start = time.perf_counter()
    compiled = build.compile_kernel(config)
    seconds = time.perf_counter() - start
    # FlashAttention-4 compiles its sm90 forward in 2-3 s per config on a CPU-only machine;
    # 60 s leaves room for a loaded CI box while still catching a pathological compile.
    assert seconds < 60, f"{config.name} took {seconds:.1f} s to compile"
    obj = tmp_path / f"{config.name}.so"
    build.export_kernel(compiled, str(obj), "sparsek_fwd")
    assert obj.stat().st_size > 10_000  # host launcher + embedded cubin
    fn = build.load_kernel(str(obj), "sparsek_fwd")
    assert callable(fn)


def test_kernels_accept_every_base_the_launch_path_passes() -> None:
    """The launch path sends q, k, v and out with 16-byte-aligned bases (`tma.ALIGN_BYTES`,
    TMA's rule); a compiled signature that assumed more would reject such views at launch."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutedsl_kernels.hopper.fmha_fwd import HopperFmhaForward
    from sparsek.launch import tma

    for config in (c for c in CONFIGS if isinstance(c, FmhaFwdConfig)):
        q, k, v, out, lse, *_ = HopperFmhaForward(config).fake_arguments()
        aligns = [t._assumed_align for t in (q, k, v, out)]
        assert aligns == [tma.ALIGN_BYTES] * 4, (config.name, aligns)
        assert lse._assumed_align == 4


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"head_dim": 72}, "head_dim=72"),
        ({"head_dim": 512}, "head_dim=512"),
        ({"dtypes": ElementTypes.uniform("float32")}, "dtypes='float32' are not supported"),
        ({"dtypes": ElementTypes("bfloat16", "float16", "bfloat16")}, "are not supported"),
        ({"tile_m": 96}, "tile_m=96"),
        ({"tile_n": 100}, "tile_n=100"),
        ({"num_stages": 0}, "num_stages=0"),
        ({"head_dim": 256, "num_stages": 4}, "shared memory"),
        ({"arch": "sm_80"}, "sm_80"),
        ({"head_dim_v": 96}, "head_dim_v=96 must equal head_dim=128, or be smaller with both"),
        ({"head_dim_v": 192}, "head_dim_v=192 must equal head_dim=128"),
        ({"mask": MaskSpec(causal=True, window=True)}, "a causal window is the window"),
        (
            {"mask": MaskSpec(sinks=True), "kv_layout": "paged", "page_size": 16, "split_kv": True},
            "the combine adds them",
        ),
        (
            {
                "mask": MaskSpec(causal=True),
                "varlen_q": True,
                "kv_layout": "paged",
                "page_size": 16,
                "single_query": True,
            },
            "no causal mask",
        ),
        ({"single_query": True}, "needs a 'cache' or 'paged' kv_layout"),
    ],
)
def test_can_implement_gives_reasons(changes: dict, fragment: str) -> None:
    base = dict(arch="sm_90a", head_dim=128, dtypes=ElementTypes.uniform("bfloat16"), mask=NO_MASK)
    config = FmhaFwdConfig(**{**base, **changes})
    reasons = build.can_implement(config)
    assert reasons, f"{config} should be rejected"
    assert any(fragment in r for r in reasons), reasons
    with pytest.raises(ValueError, match="cannot compile"):
        build.compile_kernel(config)


# One kernel of each mask feature (and all of them) on each kind of key layout: the
# dense persistent kernel, packed varlen with the dynamic schedule, paged split-KV.
MASK_LAYOUTS = (
    {"persistent": True},
    {"varlen_q": True, "kv_layout": "varlen", "persistent": True, "dynamic_schedule": True},
    {"kv_layout": "paged", "page_size": 16, "split_kv": True, "tile_m": 64},
    # decode: a tile's rows are one token's heads (batched and packed queries)
    {"kv_layout": "cache", "single_query": True, "tile_m": 64},
    {"varlen_q": True, "kv_layout": "paged", "page_size": 16, "single_query": True, "tile_m": 64},
)
# A split kernel leaves sinks out (the combine adds them): sinks compile unsplit.
PAGED_UNSPLIT = {"kv_layout": "paged", "page_size": 16, "tile_m": 64}
MASK_FEATURES = (
    MaskSpec(window=True),
    MaskSpec(causal=True, softcap=True),
    MaskSpec(sinks=True),
    MaskSpec(window=True, softcap=True, sinks=True),
)


@pytest.mark.parametrize("layout", MASK_LAYOUTS, ids=lambda d: "-".join(map(str, d.values())))
@pytest.mark.parametrize("mask", MASK_FEATURES, ids=lambda m: m.name)
def test_mask_features_compile(mask: MaskSpec, layout: dict) -> None:
    """Window, softcap and sinks compile into every kind of kernel (numerics: tests/gpu)."""
    if mask.sinks and layout.get("split_kv"):
        layout = PAGED_UNSPLIT
    if mask.causal and layout.get("single_query"):
        mask = dataclasses.replace(mask, causal=False)  # one query: every key is before it
    config = FmhaFwdConfig("sm_90a", 128, ElementTypes.uniform("bfloat16"), mask=mask, **layout)
    assert build.can_implement(config) == []
    assert build.compile_kernel(config) is not None


def test_combine_with_sinks_compiles() -> None:
    """The split-KV combine that adds the rows' sink logits (numerics: tests/gpu)."""
    config = CombineConfig("sm_90a", 128, "bfloat16", sinks=True)
    assert config.name.endswith("_sinks") and build.can_implement(config) == []
    assert build.compile_kernel(config) is not None


def test_config_names_are_unique() -> None:
    names = [c.name for c in CONFIGS]
    assert len(names) == len(set(names))


@pytest.fixture(scope="module")
def compiled_d64() -> object:
    return build.compile_kernel(FmhaFwdConfig("sm_90a", 64, ElementTypes.uniform("float16")))


def test_warm_start_path_never_imports_the_dsl(compiled_d64: object, tmp_path: Path) -> None:
    lib = tmp_path / "kernel.so"
    build.export_kernel(compiled_d64, str(lib), "sparsek_fwd")
    assert lib.read_bytes()[16] == 3  # ELF e_type ET_DYN: a shared library
    probe = (
        "import sys; from cutedsl_kernels import build; "
        f"fn = build.load_kernel({str(lib)!r}, 'sparsek_fwd'); "
        "from sparsek import registry; "
        "registry.lookup('sm_90a', 128, 'bfloat16', registry.mask_of(True)); "
        "assert callable(fn); assert 'cutlass' not in sys.modules, 'DSL imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_export_without_a_c_compiler_falls_back_to_the_object_file(
    compiled_d64: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    path = tmp_path / "kernel.so"  # the cache's file name, whatever the content
    build.export_kernel(compiled_d64, str(path), "sparsek_fwd")
    assert path.read_bytes()[16] == 1  # ELF e_type ET_REL: a relocatable object
    assert callable(build.load_kernel(str(path), "sparsek_fwd"))


def test_scheduler_words_agree_with_the_shared_memory_budget() -> None:
    """The DSL-free budget (`hopper.limits.SCHED_WORDS`, per work tile in flight) is the
    kernel's own `WorkTile.NUM_WORDS` (`common/tile_scheduler.py`)."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutedsl_kernels.common.tile_scheduler import WorkTile
    from cutedsl_kernels.hopper import limits

    assert limits.SCHED_WORDS == WorkTile.NUM_WORDS


def _registered(predicate: Callable[[FmhaFwdConfig], bool]) -> FmhaFwdConfig:
    return next(c for c in CONFIGS if isinstance(c, FmhaFwdConfig) and predicate(c))


def _d256_128x80() -> FmhaFwdConfig:
    """FlashAttention-3/4's d256 tile: 128x80, 2 stages, which fits by ~1 KiB."""
    config = _registered(lambda c: c.head_dim == 128 and c.kv_layout == "dense")
    return dataclasses.replace(
        config, head_dim=256, tile_m=128, tile_n=80, num_stages=2,
        persistent=False, dynamic_schedule=False, l2_group_mb=0,
    )  # fmt: skip


def _d192_v128() -> FmhaFwdConfig:
    """DeepSeek-style MLA prefill: q/k 192 wide, v/o 128 wide, 128x128 tiles."""
    config = _registered(lambda c: c.head_dim == 128 and c.kv_layout == "dense")
    return dataclasses.replace(
        config, head_dim=192, head_dim_v=128, tile_m=128, tile_n=128, num_stages=2,
        persistent=False, dynamic_schedule=False, l2_group_mb=0,
    )  # fmt: skip


SMEM_CASES: dict[str, Callable[[], FmhaFwdConfig]] = {
    "d128-dynamic": lambda: _registered(
        lambda c: c.head_dim == 128 and c.dynamic_schedule and not c.is_varlen
    ),
    "d64-2ctas": lambda: _registered(lambda c: c.head_dim == 64 and c.ctas_per_sm == 2),
    "d64-192rows": lambda: _registered(lambda c: c.tile_m == 192 and c.persistent),
    "d256-128x80": _d256_128x80,
    "d192v128-128x128": _d192_v128,
    "fp8-d128": lambda: _registered(lambda c: c.dtypes.is_fp8 and c.head_dim == 128),
    "fp8-cache-d128": lambda: _registered(
        lambda c: c.dtypes.converts_kv and c.head_dim == 128 and c.kv_layout == "paged"
    ),
}


@pytest.mark.parametrize("case", SMEM_CASES)
def test_shared_memory_estimate_is_the_compiled_struct(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`limits.smem_bytes` (what `can_implement` admits by) is the size of the kernel's
    `SharedStorage` as compiled, byte for byte: an over-estimate refuses tiles that fit
    (d256 128x80), an under-estimate admits kernels that fail at launch."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutedsl_kernels.hopper import fmha_fwd, limits

    config = SMEM_CASES[case]()
    sizes: list[int] = []

    class Recording(fmha_fwd.SmemAllocator):  # type: ignore[misc, name-defined]
        def allocate(self, size_or_type, *args, **kwargs):  # type: ignore[no-untyped-def]
            if not isinstance(size_or_type, int):
                sizes.append(size_or_type.__sizeof__())
            return super().allocate(size_or_type, *args, **kwargs)

    monkeypatch.setattr(fmha_fwd, "SmemAllocator", Recording)
    assert build.can_implement(config) == []
    build.compile_kernel(config)
    assert sizes == [limits.smem_bytes(config)], config.name
