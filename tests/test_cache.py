"""Compile cache semantics, against a fake compiler that counts compiles (no DSL, no GPU).

Compared against: the cache's documented contract (memory -> disk -> compile; one compile
per key across racing processes; corrupt entries detected, warned about and rebuilt; a new
DSL version or kernel source gives a new entry; clear removes everything).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from fake_toolchain import FakeCompiler

from cutedsl_kernels.config import CAUSAL, NO_MASK, ElementTypes, FmhaFwdConfig
from sparsek import cache as cache_mod
from sparsek.cache import (
    MANIFEST_NAME,
    OBJECT_NAME,
    CacheKey,
    CacheStatus,
    CacheWarning,
    KernelCache,
    cache_dir,
    source_hash,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = FmhaFwdConfig("sm_90a", 128, ElementTypes.uniform("bfloat16"), CAUSAL)
OTHER = FmhaFwdConfig("sm_90a", 64, ElementTypes.uniform("float16"), NO_MASK)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "_warned", set())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "fmha_fwd.py"
    path.parent.mkdir()
    path.write_text("# kernel v1\n")
    return path


@pytest.fixture
def compiler(tmp_path: Path, source: Path) -> FakeCompiler:
    return FakeCompiler(tmp_path / "compiles.log", [source])


def make_cache(tmp_path: Path, compiler: FakeCompiler) -> KernelCache:
    return KernelCache(tmp_path / "cache", compiler.toolchain())


def test_compile_once_then_memory_then_disk(tmp_path: Path, compiler: FakeCompiler) -> None:
    cache = make_cache(tmp_path, compiler)
    assert cache.compile_into_cache(CONFIG) is CacheStatus.COMPILED
    first = cache.get_kernel(CONFIG)
    assert cache.get_kernel(CONFIG) is first
    assert cache.compile_into_cache(CONFIG) is CacheStatus.MEMORY
    # A new process (fresh memory) finds the entry on disk.
    again = make_cache(tmp_path, compiler)
    assert again.compile_into_cache(CONFIG) is CacheStatus.DISK
    assert again.get_kernel(CONFIG)() == first()
    assert compiler.count() == 1


def test_entry_layout_and_manifest(tmp_path: Path, compiler: FakeCompiler) -> None:
    cache = make_cache(tmp_path, compiler)
    cache.get_kernel(CONFIG)
    key = cache.key(CONFIG)
    entry = cache.entry_dir(key)
    assert entry.parent.name == "sm_90a" and entry.name == key.digest
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    obj = (entry / OBJECT_NAME).read_bytes()
    assert manifest["size"] == len(obj)
    assert manifest["function_name"] == key.function_name
    assert manifest["config"]["head_dim"] == 128 and manifest["dsl_version"] == "4.8.1"
    assert not [p for p in entry.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".k")]
    [listed] = cache.list_entries()
    assert listed.valid and listed.size == len(obj) and listed.name == key.function_name


def test_distinct_configs_get_distinct_entries(tmp_path: Path, compiler: FakeCompiler) -> None:
    cache = make_cache(tmp_path, compiler)
    cache.get_kernel(CONFIG)
    cache.get_kernel(OTHER)
    assert cache.key(CONFIG).digest != cache.key(OTHER).digest
    assert compiler.count() == 2 and len(cache.list_entries()) == 2


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda e: (e / OBJECT_NAME).write_bytes(b"trunc"), id="truncated-object"),
        pytest.param(
            lambda e: (e / OBJECT_NAME).write_bytes(
                bytes(b ^ 1 for b in (e / OBJECT_NAME).read_bytes())
            ),
            id="flipped-bits-same-size",
        ),
        pytest.param(lambda e: (e / OBJECT_NAME).unlink(), id="object-missing"),
        pytest.param(lambda e: (e / MANIFEST_NAME).write_text("{not json"), id="manifest-garbage"),
        pytest.param(lambda e: (e / MANIFEST_NAME).unlink(), id="manifest-missing"),
    ],
)
def test_corrupt_entry_is_detected_warned_and_rebuilt(
    tmp_path: Path, compiler: FakeCompiler, damage
) -> None:
    cache = make_cache(tmp_path, compiler)
    good = cache.get_kernel(CONFIG)()
    entry = cache.entry_dir(cache.key(CONFIG))
    damage(entry)
    assert not cache.list_entries()[0].valid
    fresh = make_cache(tmp_path, compiler)
    with pytest.warns(CacheWarning, match="corrupt kernel cache entry"):
        assert fresh.compile_into_cache(CONFIG) is CacheStatus.REBUILT
    assert fresh.get_kernel(CONFIG)() == good
    assert compiler.count() == 2
    assert cache.list_entries()[0].valid


def test_corruption_is_warned_once_per_entry(tmp_path: Path, compiler: FakeCompiler) -> None:
    make_cache(tmp_path, compiler).get_kernel(CONFIG)
    entry = KernelCache(tmp_path / "cache", compiler.toolchain()).entry_dir(
        make_cache(tmp_path, compiler).key(CONFIG)
    )
    (entry / OBJECT_NAME).write_bytes(b"x")
    with pytest.warns(CacheWarning):
        make_cache(tmp_path, compiler).compile_into_cache(CONFIG)
    (entry / OBJECT_NAME).write_bytes(b"y")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_cache(tmp_path, compiler).compile_into_cache(CONFIG) is CacheStatus.REBUILT
    assert compiler.count() == 3


def test_dsl_version_change_gives_new_entry(tmp_path: Path, source: Path) -> None:
    old = FakeCompiler(tmp_path / "log", [source], version="4.8.1")
    new = FakeCompiler(tmp_path / "log", [source], version="4.9.0")
    make_cache(tmp_path, old).get_kernel(CONFIG)
    cache = make_cache(tmp_path, new)
    assert cache.compile_into_cache(CONFIG) is CacheStatus.COMPILED
    assert len(cache.list_entries()) == 2
    assert old.count() == 2


def test_source_change_gives_new_entry(tmp_path: Path, source: Path) -> None:
    compiler = FakeCompiler(tmp_path / "log", [source])
    key_v1 = make_cache(tmp_path, compiler).key(CONFIG)
    make_cache(tmp_path, compiler).get_kernel(CONFIG)
    source.write_text("# kernel v2\n")
    cache = make_cache(tmp_path, compiler)
    assert cache.key(CONFIG) != key_v1
    assert cache.compile_into_cache(CONFIG) is CacheStatus.COMPILED
    assert compiler.count() == 2


def test_source_hash_ignores_checkout_location(tmp_path: Path) -> None:
    for root in ("a", "b"):
        (tmp_path / root / "hopper").mkdir(parents=True)
        (tmp_path / root / "build.py").write_text("x = 1\n")
        (tmp_path / root / "hopper" / "fmha.py").write_text("y = 2\n")
    files = {r: sorted((tmp_path / r).rglob("*.py")) for r in ("a", "b")}
    assert source_hash(files["a"], "4.8.1") == source_hash(files["b"], "4.8.1")
    assert source_hash(files["a"], "4.8.1") != source_hash(files["a"], "4.8.2")
    (tmp_path / "b" / "hopper" / "fmha.py").write_text("y = 3\n")
    assert source_hash(files["a"], "4.8.1") != source_hash(files["b"], "4.8.1")


def test_clear_removes_entries_and_memory(tmp_path: Path, compiler: FakeCompiler) -> None:
    cache = make_cache(tmp_path, compiler)
    cache.get_kernel(CONFIG)
    cache.get_kernel(OTHER)
    assert cache.clear() == 2
    assert cache.list_entries() == []
    assert cache.compile_into_cache(CONFIG) is CacheStatus.COMPILED
    assert compiler.count() == 3
    assert make_cache(tmp_path / "empty", compiler).clear() == 0


def test_failed_compile_leaves_no_entry(tmp_path: Path, source: Path) -> None:
    failing = FakeCompiler(tmp_path / "log", [source], fail=True)
    cache = make_cache(tmp_path, failing)
    with pytest.raises(ValueError, match="fake failure"):
        cache.get_kernel(CONFIG)
    assert all(not e.valid for e in cache.list_entries())
    working = FakeCompiler(tmp_path / "log", [source])
    assert make_cache(tmp_path, working).compile_into_cache(CONFIG) is CacheStatus.COMPILED


def test_cache_key_is_frozen_and_hashable() -> None:
    key = CacheKey(CONFIG, "4.8.1", "abc")
    assert key == CacheKey(CONFIG, "4.8.1", "abc") and hash(key) == hash(
        CacheKey(CONFIG, "4.8.1", "abc")
    )
    with pytest.raises(AttributeError):
        key.dsl_version = "x"  # type: ignore[misc]
    assert key.function_name.isidentifier()


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARSEK_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SPARSEK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sparsek"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "sparsek"


def test_default_cache_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARSEK_CACHE_DIR", str(tmp_path))
    assert cache_mod.default_cache().root == tmp_path


def test_racing_processes_compile_once(tmp_path: Path, source: Path) -> None:
    """Several processes ask for the same key at the same moment: exactly one compiles."""
    peers = 3
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    log = tmp_path / "compiles.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    args = [str(tmp_path / "cache"), str(log), str(source), str(barrier), str(peers)]
    script = str(REPO / "tests" / "fake_toolchain.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, *args], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(peers)
    ]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(log.read_text().splitlines()) == 1
    statuses = sorted(o[0] for o in outputs)
    assert statuses == ["compiled"] + ["disk"] * (peers - 1)
    assert len({o[1] for o in outputs}) == 1


def test_kinds_of_kernel_with_equal_fields_get_distinct_entries(
    tmp_path: Path, compiler: FakeCompiler
) -> None:
    from cutedsl_kernels.config import CombineConfig, KVStoreConfig

    cache = make_cache(tmp_path, compiler)
    combine = CombineConfig("sm_90a", 128, "float16")
    store = KVStoreConfig("sm_90a", 128, "float16")
    assert cache.key(combine).digest != cache.key(store).digest
