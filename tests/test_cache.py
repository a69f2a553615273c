"""Compile cache semantics, against a fake compiler that counts compiles (no DSL, no GPU),
and the real toolchain's identity (read from the installed packages, nothing compiled).

Compared against: the cache's documented contract (memory -> disk -> compile; one compile
per key across racing processes; corrupt entries detected, warned about and rebuilt;
unfinished builds and orphaned temporary files cleaned silently; a new DSL version, kernel
source, TVM-FFI version, CUDA flavour, DSL checkout or CUTE_DSL_* codegen setting gives a
new entry; list/prune tell stale entries from current ones; clear removes what sparsek wrote
and nothing else; a read-only or full cache directory still yields correct kernels).
Multi-process stress and the real compiler: tests/test_cache_stress.py.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fake_toolchain import FakeCompiler

from cutedsl_kernels import build
from cutedsl_kernels.config import CAUSAL, NO_MASK, ElementTypes, FmhaFwdConfig
from sparsek import cache as cache_mod
from sparsek import cache_store
from sparsek.cache import (
    FORMAT_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    OBJECT_NAME,
    CacheKey,
    CacheStatus,
    CacheWarning,
    KernelCache,
    cache_dir,
    dsl_toolchain,
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
    assert manifest["key"] == key.fields() and manifest["key"]["format"] == FORMAT_VERSION
    assert manifest["key"]["config"]["head_dim"] == 128
    assert manifest["key"]["dsl_version"] == "4.8.1"
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
        pytest.param(
            lambda e: (e / MANIFEST_NAME).write_text(
                (e / MANIFEST_NAME).read_text().replace('"size": ', '"size": 1')
            ),
            id="manifest-size-edited",
        ),
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


# ----------------------------------------------------------------------------- interrupted builds


def test_object_without_manifest_is_an_unfinished_build(
    tmp_path: Path, compiler: FakeCompiler
) -> None:
    """A build killed after storing its object and before its manifest is not corruption:
    the entry is built again without a warning."""
    cache = make_cache(tmp_path, compiler)
    good = cache.get_kernel(CONFIG)()
    entry = cache.entry_dir(cache.key(CONFIG))
    (entry / MANIFEST_NAME).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = make_cache(tmp_path, compiler)
        assert fresh.compile_into_cache(CONFIG) is CacheStatus.COMPILED
        assert fresh.get_kernel(CONFIG)() == good
    assert cache.list_entries()[0].valid
    (entry / MANIFEST_NAME).unlink()
    [listed] = cache.list_entries()
    assert not listed.valid and listed.state == "unfinished"


def test_orphaned_temporary_files_are_removed_under_the_lock(
    tmp_path: Path, compiler: FakeCompiler
) -> None:
    """Temporary files left by killed builds go when the entry's lock is free (the next
    build, or prune for an entry that is complete), never while another process holds it."""
    cache = make_cache(tmp_path, compiler)
    entry = cache.entry_dir(cache.key(CONFIG))
    entry.mkdir(parents=True)
    orphans = [
        entry / ".kernel-x1y2.so",
        entry / ".kernel-x1y2.so.o.tmp",
        entry / ".manifest.json-q",
    ]
    for orphan in orphans:
        orphan.write_bytes(b"half written")
    cache.get_kernel(CONFIG)
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        [LOCK_NAME, MANIFEST_NAME, OBJECT_NAME]
    )

    orphans[0].write_bytes(b"half written")
    with _held(entry / LOCK_NAME):  # a build in progress elsewhere: its file is no orphan
        result = cache.prune()
        assert orphans[0].exists() and result.busy == 1 and result.removed == 0
    assert cache.prune().removed == 0
    assert not orphans[0].exists() and cache.list_entries()[0].valid


# ----------------------------------------------------------------------------- clear, list, prune


def test_clear_deletes_only_what_sparsek_wrote(tmp_path: Path, compiler: FakeCompiler) -> None:
    """`$SPARSEK_CACHE_DIR` may name a shared folder: clear removes sparsek's entries and
    leaves other programs' files, directories that merely look like entries, and whatever
    symlinks point at."""
    cache = make_cache(tmp_path, compiler)
    cache.get_kernel(CONFIG)
    cache.get_kernel(OTHER)
    root = cache.root
    foreign = {
        root / "other-project" / "data.bin": b"theirs",
        root / "sm_90a" / "notes.txt": b"theirs",
        root / "sm_90a" / ("ab" * 12) / "thesis.tex": b"theirs",  # a digest-like name
        root / "sm_90a" / ("cd" * 12) / OBJECT_NAME: b"theirs",  # manifest below: not its key
    }
    outside = tmp_path / "outside"
    (outside / "sm_90a" / ("ef" * 12)).mkdir(parents=True)
    for name in (OBJECT_NAME, MANIFEST_NAME, LOCK_NAME):
        (outside / "sm_90a" / ("ef" * 12) / name).write_text("{}")
    (root / "sm_90a" / ("ef" * 12)).symlink_to(outside / "sm_90a" / ("ef" * 12))
    (root / "sm_100a").symlink_to(outside / "sm_90a")
    for path, data in foreign.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "sm_90a" / ("cd" * 12) / MANIFEST_NAME).write_text('{"key": {"theirs": 1}}')

    assert cache.clear() == 2
    assert all(path.read_bytes() == data for path, data in foreign.items())
    assert sorted(p.name for p in (outside / "sm_90a" / ("ef" * 12)).iterdir()) == sorted(
        [LOCK_NAME, MANIFEST_NAME, OBJECT_NAME]
    )
    assert not cache.entry_dir(cache.key(CONFIG)).exists()
    assert cache.list_entries() == []


def test_clear_takes_each_entry_lock(tmp_path: Path, compiler: FakeCompiler) -> None:
    """An entry whose lock another process holds (a build, a load) is left alone."""
    cache = make_cache(tmp_path, compiler)
    cache.get_kernel(CONFIG)
    cache.get_kernel(OTHER)
    busy = cache.entry_dir(cache.key(CONFIG))
    with _held(busy / LOCK_NAME):
        assert cache.clear() == 1
    assert (busy / OBJECT_NAME).exists()
    assert [e.path for e in cache.list_entries()] == [busy]
    assert cache.clear() == 1 and not busy.exists()


def test_list_and_prune_tell_stale_entries_from_current(tmp_path: Path, source: Path) -> None:
    """Entries of an older kernel source, DSL or format are stale: prune removes them and
    keeps the current ones; prune(everything=True) removes all."""
    old = FakeCompiler(tmp_path / "log", [source], version="4.8.0")
    make_cache(tmp_path, old).get_kernel(CONFIG)
    current = FakeCompiler(tmp_path / "log", [source])
    cache = make_cache(tmp_path, current)
    cache.get_kernel(CONFIG)
    cache.get_kernel(OTHER)
    states = {e.path.name: e.state for e in cache.list_entries()}
    assert sorted(states.values()) == ["current", "current", "stale"]
    assert all(e.disk_bytes > e.size > 0 and e.age_seconds() < 60 for e in cache.list_entries())

    result = cache.prune()
    assert (result.removed, result.busy) == (1, 0) and result.freed_bytes > 0
    assert [e.state for e in cache.list_entries()] == ["current", "current"]
    assert cache.compile_into_cache(CONFIG) is CacheStatus.MEMORY
    assert make_cache(tmp_path, current).compile_into_cache(OTHER) is CacheStatus.DISK
    assert cache.prune(everything=True).removed == 2 and cache.list_entries() == []


# ----------------------------------------------------------------------------- toolchain identity


def test_toolchain_identity_is_part_of_the_key(tmp_path: Path, compiler: FakeCompiler) -> None:
    def with_identity(**parts: str) -> KernelCache:
        toolchain = replace(compiler.toolchain(), identity=lambda: parts)
        return KernelCache(tmp_path / "cache", toolchain)

    cu12 = with_identity(tvm_ffi="0.1.15", dsl_flavour="cu12")
    assert cu12.compile_into_cache(CONFIG) is CacheStatus.COMPILED
    cu13 = with_identity(tvm_ffi="0.1.15", dsl_flavour="cu13")
    assert cu13.compile_into_cache(CONFIG) is CacheStatus.COMPILED
    assert with_identity(tvm_ffi="0.1.15", dsl_flavour="cu12").get_kernel(CONFIG)()
    assert compiler.count() == 2
    assert [e.state for e in cu13.list_entries()].count("stale") == 1


def dsl_key() -> str:
    """The real toolchain's key digest for CONFIG (nothing is compiled)."""
    return KernelCache(Path("/nonexistent"), dsl_toolchain()).key(CONFIG).digest


def test_codegen_settings_change_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUTE_DSL_* settings that change code (line info, assertions, compiler options) miss
    the cache; logging, dump and cache locations, and ARCH (the config's) do not."""
    for name in [n for n in os.environ if n.startswith("CUTE_DSL_")]:
        monkeypatch.delenv(name)
    base = dsl_key()
    for name, value in (("CUTE_DSL_LOG_LEVEL", "20"), ("CUTE_DSL_ARCH", "sm_90a")):
        monkeypatch.setenv(name, value)
        assert dsl_key() == base, name
    for name, value in (
        ("CUTE_DSL_LINEINFO", "1"),
        ("CUTE_DSL_ENABLE_ASSERTIONS", "1"),
        ("CUTE_DSL_COMPILER_OPT", "remarks{ptx}"),
        ("CUTE_DSL_SOMETHING_NEW", "1"),  # unknown settings count, to be safe
    ):
        monkeypatch.setenv(name, value)
        assert dsl_key() != base, name
        monkeypatch.delenv(name)
    assert dsl_key() == base


def test_tvm_ffi_version_changes_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    base = dsl_key()
    installed = importlib.metadata.distribution

    class Renumbered:
        def __init__(self, dist: importlib.metadata.Distribution) -> None:
            self.dist = dist
            self.version = dist.version + ".dev1"

        def locate_file(self, path: str) -> object:
            return self.dist.locate_file(path)

    def distribution(name: str) -> object:
        dist = installed(name)
        return Renumbered(dist) if name == "apache-tvm-ffi" else dist

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert dsl_key() != base
    assert build.toolchain_identity()["tvm_ffi"].endswith(".dev1")


@pytest.fixture
def dsl_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in DSL imported from a folder on sys.path (no installed distribution), with
    a cu12 compiler library: what a DSL source checkout or a build tree looks like."""
    package = tmp_path / "checkout" / "cutlass"
    libs = package / "_mlir" / "_mlir_libs"
    libs.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "4.8.1"\n')
    (libs / "_cutlass_ir.cu12.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (libs / "_cutlass_ir_version_cu12.py").write_text('DSO_SHA256 = {"cu12": "a"}\n')
    for name in [m for m in sys.modules if m == "cutlass" or m.startswith("cutlass.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(package.parent))
    return package


def test_a_dsl_imported_from_a_folder_is_keyed_by_its_sources(dsl_checkout: Path) -> None:
    base = dsl_key()
    (dsl_checkout / "__init__.py").write_text('__version__ = "4.8.1"  # patched\n')
    assert dsl_key() != base
    identity = build.toolchain_identity()
    assert identity["dsl"].startswith("source-") and identity["dsl_flavour"] == "cu12"


def test_cuda_flavour_and_compiler_change_the_key(dsl_checkout: Path) -> None:
    """Installing the cu13 flavour beside cu12 switches the DSL to it where the driver
    allows (no driver: the newest); a rebuilt compiler library changes its fingerprint."""
    libs = dsl_checkout / "_mlir" / "_mlir_libs"
    base = dsl_key()
    (libs / "_cutlass_ir_version_cu12.py").write_text('DSO_SHA256 = {"cu12": "b"}\n')
    rebuilt = dsl_key()
    assert rebuilt != base
    (libs / "_cutlass_ir.cu13.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (libs / "_cutlass_ir_version_cu13.py").write_text('DSO_SHA256 = {"cu13": "c"}\n')
    flavour = build.dsl_flavour()  # cu12 only under a CUDA 12 driver
    assert flavour in ("cu12", "cu13")
    assert (dsl_key() != rebuilt) == (flavour == "cu13")


def test_settings_left_out_of_the_key_are_the_dsls_non_codegen_ones() -> None:
    """`build.CUTE_DSL_ENV_NOT_IN_KEY` against the DSL's own declaration of which settings
    affect compilation (`affects_compile`): a DSL upgrade that moves one fails here."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutlass.cutlass_dsl.cutlass import CuTeDSLEnvironmentManager

    declared = {
        e.source: e.affects_compile
        for e in CuTeDSLEnvironmentManager._ENV_VAR_SPEC
        if isinstance(e.source, str)
    }
    not_in_key = build.CUTE_DSL_ENV_NOT_IN_KEY - {"ARCH"}  # ARCH: the config's arch
    assert {name for name, affects in declared.items() if affects} & not_in_key == set()
    assert {name for name, affects in declared.items() if not affects} <= not_in_key


# ----------------------------------------------------------------------------- unwritable caches


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Paths appended to the yielded list behave as on a read-only file system (EROFS) for
    creating directories and opening files for writing. Simulated: tests run as root in
    some CI containers, where chmod does not stop writes (the real read-only mount is in
    tests/test_cache_stress.py)."""
    roots: list[Path] = []
    real_mkdir, real_open = os.mkdir, os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def refused(path: object) -> bool:
        return any(Path(str(path)).is_relative_to(r) for r in roots)

    def mkdir(path: object, *args: object, **kwargs: object) -> None:
        if refused(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

    def open_(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & writes and refused(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    yield roots


def test_read_only_cache_dir_compiles_in_memory(
    tmp_path: Path, compiler: FakeCompiler, read_only: list[Path]
) -> None:
    cache = make_cache(tmp_path, compiler)
    cache.get_kernel(OTHER)  # an entry from before the directory became read-only
    read_only.append(cache.root)
    fresh = make_cache(tmp_path, compiler)
    with pytest.warns(CacheWarning, match="cannot be written.*compiling kernels in memory"):
        kernel = fresh.get_kernel(CONFIG)
    assert kernel() == make_cache(tmp_path / "other", compiler).get_kernel(CONFIG)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per directory
        assert make_cache(tmp_path, compiler).compile_into_cache(CONFIG) is CacheStatus.UNCACHED
        assert make_cache(tmp_path, compiler).compile_into_cache(OTHER) is CacheStatus.DISK
    assert [e.name for e in fresh.list_entries()] == [fresh.key(OTHER).function_name]


def test_full_cache_dir_compiles_in_memory(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated ENOSPC (the kernel's write raises it inside the cache directory); the real
    full file system (a tiny tmpfs) is in tests/test_cache_stress.py."""
    compiler = FakeCompiler(tmp_path / "log", [source])
    root = tmp_path / "cache"

    def export(compiled: dict[str, object], path: str, function_name: str) -> None:
        if Path(path).is_relative_to(root):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        compiler.export(compiled, path, function_name)  # type: ignore[arg-type]

    cache = KernelCache(root, replace(compiler.toolchain(), export=export))
    with pytest.warns(CacheWarning, match="No space left on device"):
        kernel = cache.get_kernel(CONFIG)
    assert kernel() == make_cache(tmp_path / "other", compiler).get_kernel(CONFIG)()
    assert compiler.count() == 2  # one compile here, one for the reference
    entry = cache.entry_dir(cache.key(CONFIG))
    assert not entry.exists() and cache.list_entries() == []  # nothing partial left


def test_require_disk_raises_before_compiling_on_a_read_only_cache(
    tmp_path: Path, compiler: FakeCompiler, read_only: list[Path]
) -> None:
    """What `sparsek compile` asks for: the entry on disk, or an error (no in-memory
    compile, no warning)."""
    cache = make_cache(tmp_path, compiler)
    read_only.append(cache.root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(cache_mod.CacheUnwritableError, match=r"cannot be written.*Read-only"):
            cache.compile_into_cache(CONFIG, require_disk=True)
    assert compiler.count() == 0


def test_require_disk_raises_on_a_full_cache(tmp_path: Path, source: Path) -> None:
    compiler = FakeCompiler(tmp_path / "log", [source])

    def export(compiled: dict[str, object], path: str, function_name: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    cache = KernelCache(tmp_path / "cache", replace(compiler.toolchain(), export=export))
    with pytest.raises(cache_mod.CacheUnwritableError, match="No space left on device"):
        cache.compile_into_cache(CONFIG, require_disk=True)
    assert cache.list_entries() == []


def test_interrupted_build_leaves_no_entry(tmp_path: Path, compiler: FakeCompiler) -> None:
    """Ctrl-C during a compile: the entry directory and its lock file go too (no
    "unfinished" entry in `cache list`), and the next build starts clean."""
    interrupted = replace(compiler.toolchain(), compile=_interrupt)
    cache = KernelCache(tmp_path / "cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.compile_into_cache(CONFIG)
    assert cache.list_entries() == [] and not cache.entry_dir(cache.key(CONFIG)).exists()
    assert make_cache(tmp_path, compiler).compile_into_cache(CONFIG) is CacheStatus.COMPILED


def _interrupt(config: object) -> object:
    raise KeyboardInterrupt


def test_no_writable_directory_at_all_is_a_clear_error(
    tmp_path: Path, compiler: FakeCompiler, read_only: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    cache = make_cache(tmp_path, compiler)
    read_only.extend([cache.root, private])
    with (
        pytest.warns(CacheWarning),
        pytest.raises(RuntimeError, match=r"and so did a temporary directory"),
    ):
        cache.get_kernel(CONFIG)


class _held:
    """Hold a lock file's flock through a separate open file (as another process would)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def test_lock_survives_entry_removed_under_mkdir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another process makes the entry and a third (`cache clear`) removes it between
    mkdir's attempt and its check, so `Path.mkdir(exist_ok=True)` raises FileExistsError:
    taking the lock tries again instead of calling the cache unwritable."""
    entry = tmp_path / "sm_90a" / "entry"
    real_mkdir = Path.mkdir
    raced: list[Path] = []

    def racing_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == entry and not raced:
            raced.append(self)
            raise FileExistsError(errno.EEXIST, "File exists", str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    with cache_store.locked(entry) as held:
        assert held
    assert raced == [entry]
