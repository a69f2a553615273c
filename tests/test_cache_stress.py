"""The kernel cache under stress on the host, in separate processes: racing compiles,
`kill -9` at each step of a build, a corrupt entry, `clear` while others load, a read-only
and a full file system; and the real CuTe DSL toolchain compiling sm_90a kernels (racing
processes, relocatable entries, a full file system). CPU only: kernels are compiled and
loaded (dlopen), never launched.

Compared against: the cache's contract (`sparsek/cache.py`): exactly one compile per key
however many processes ask; a killed build leaves nothing that is reported as corrupt and
nothing that stays behind; a corrupt entry is rebuilt once, with one warning; every process
gets the kernel its config names (the fake kernel's bytes, or a loadable real one); the
entry is complete afterwards. Exported kernels name no folder of the environment that
compiled them and load the runtime of the environment that loads them.

This file is also the script its child processes run: `python test_cache_stress.py ROLE
JSON` (see `child_main`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fake_toolchain import FakeCompiler

from cutedsl_kernels.config import CAUSAL, NO_MASK, ElementTypes, FmhaFwdConfig, KVStoreConfig
from sparsek.cache import (
    LOCK_NAME,
    MANIFEST_NAME,
    OBJECT_NAME,
    CacheStatus,
    CacheWarning,
    KernelCache,
    dsl_toolchain,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = FmhaFwdConfig("sm_90a", 128, ElementTypes.uniform("bfloat16"), CAUSAL)
OTHER = FmhaFwdConfig("sm_90a", 64, ElementTypes.uniform("float16"), NO_MASK)
# The quickest real kernel to compile (about a second on top of the DSL import).
REAL_CONFIG = KVStoreConfig("sm_90a", 128, "float16")
CHILD_TIMEOUT_S = 240


# ----------------------------------------------------------------------------- child processes


def child_main(role: str, spec: dict[str, Any]) -> None:
    """One child process. Roles: `fake` / `real` get a kernel through a `KernelCache` at
    spec["root"] (after a barrier of spec["peers"] processes; killing itself at
    spec["kill_at"]; again and again for spec["seconds"]) and print one JSON line: status,
    sha256 of what the kernel returns (fake) or whether it is callable (real), and the
    cache warnings it saw. `clear` clears the cache in a loop for spec["seconds"]. `load`
    loads spec["path"] and prints the DSL runtime library the process mapped."""
    if role == "clear":
        deadline = time.monotonic() + spec["seconds"]
        cleared = 0
        while time.monotonic() < deadline:
            cleared += KernelCache(spec["root"], _fake(spec).toolchain()).clear()
        print(json.dumps({"cleared": cleared}))
        return
    if role == "load":
        from cutedsl_kernels import build

        assert callable(build.load_kernel(spec["path"], "sparsek_test"))
        print(json.dumps({"runtime": _mapped("libcute_dsl_runtime.so")}))
        return
    toolchain = dsl_toolchain() if role == "real" else _fake(spec).toolchain()
    toolchain = _with_kill_point(toolchain, spec.get("kill_at"), spec.get("marker"))
    config = REAL_CONFIG if role == "real" else CONFIG
    report: dict[str, Any] = {}
    if "first" in spec:  # an entry made before the test's condition: still served from disk
        report["first"] = KernelCache(spec["root"], toolchain).compile_into_cache(OTHER).value
    _barrier(spec)
    deadline = time.monotonic() + spec.get("seconds", 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        while True:
            cache = KernelCache(spec["root"], toolchain)
            status = cache.compile_into_cache(config)
            kernel = cache.get_kernel(config)
            result = str(callable(kernel)) if role == "real" else _digest(kernel())
            if result != spec.get("expect", result):
                raise AssertionError(f"wrong kernel: {result}")
            if time.monotonic() >= deadline:
                break
    warned = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    print(json.dumps({**report, "status": status.value, "result": result, "warned": warned}))


def _fake(spec: dict[str, Any]) -> FakeCompiler:
    return FakeCompiler(Path(spec["log"]), [Path(spec["source"])], delay=spec.get("delay", 0.0))


def _with_kill_point(toolchain: Any, kill_at: str | None, marker: str | None) -> Any:
    """The toolchain, dying by SIGKILL at `kill_at`: "export" (half of the object written
    to its temporary file), "object" (the object renamed into place, the manifest not yet
    written); at "compile" it touches `marker` and compiles on, for the parent to kill."""

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "compile":
        compile_ = toolchain.compile

        def announced(config: Any) -> Any:
            Path(str(marker)).touch()
            return compile_(config)

        return replace(toolchain, compile=announced)
    if kill_at == "export":

        def half_export(compiled: Any, path: str, function_name: str) -> None:
            Path(path).write_bytes(b"FAKE half")
            die()

        return replace(toolchain, export=half_export)
    if kill_at == "object":
        rename = os.replace

        def replace_then_die(src: Any, dst: Any) -> None:
            rename(src, dst)
            if Path(dst).name == OBJECT_NAME:
                die()

        os.replace = replace_then_die
    return toolchain


def _barrier(spec: dict[str, Any]) -> None:
    if "barrier" not in spec:
        return
    Path(spec["barrier"], f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(os.listdir(spec["barrier"])) < spec["peers"] and time.monotonic() < deadline:
        time.sleep(0.01)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mapped(library: str) -> list[str]:
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps if line.rstrip().endswith(library)})


# ----------------------------------------------------------------------------- parent side


def spawn(role: str, spec: dict[str, Any], prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    env.pop("CUTE_DSL_LIBS", None)
    cmd = [*prefix, sys.executable, __file__, role, json.dumps(spec)]
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err[-3000:]}"
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


def race(role: str, spec: dict[str, Any], peers: int, tmp_path: Path) -> list[dict[str, Any]]:
    barrier = tmp_path / f"barrier-{time.monotonic_ns()}"
    barrier.mkdir()
    spec = {**spec, "barrier": str(barrier), "peers": peers}
    return [finish(p) for p in [spawn(role, spec) for _ in range(peers)]]


@pytest.fixture
def fake_spec(tmp_path: Path) -> dict[str, Any]:
    source = tmp_path / "src" / "fmha_fwd.py"
    source.parent.mkdir()
    source.write_text("# kernel v1\n")
    return {
        "root": str(tmp_path / "cache"),
        "log": str(tmp_path / "compiles.log"),
        "source": str(source),
    }


def expected_result(spec: dict[str, Any], tmp_path: Path) -> str:
    """What every process must get: the fake kernel, compiled into a cache of its own."""
    reference = KernelCache(tmp_path / "reference", _fake(spec).toolchain())
    return _digest(reference.get_kernel(CONFIG)())


def compiles(spec: dict[str, Any]) -> int:
    log = Path(spec["log"])
    return len(log.read_text().splitlines()) if log.exists() else 0


def assert_entry_complete(spec: dict[str, Any]) -> None:
    cache = KernelCache(spec["root"], _fake(spec).toolchain())
    [entry] = cache.list_entries()
    assert sorted(p.name for p in entry.path.iterdir()) == [LOCK_NAME, OBJECT_NAME, MANIFEST_NAME]
    assert entry.valid, entry


# ----------------------------------------------------------------------------- fake toolchain


def test_eight_processes_compile_one_config_once(fake_spec: dict[str, Any], tmp_path: Path) -> None:
    expect = expected_result(fake_spec, tmp_path)
    reports = race("fake", {**fake_spec, "delay": 1.0, "expect": expect}, 8, tmp_path)
    assert compiles(fake_spec) == 2  # the reference's and one of the eight
    assert sorted(r["status"] for r in reports) == ["compiled"] + ["disk"] * 7
    assert {r["result"] for r in reports} == {expect}
    assert [r["warned"] for r in reports] == [[]] * 8
    assert_entry_complete(fake_spec)


@pytest.mark.parametrize("kill_at", ["compile", "export", "object"])
def test_kill_9_during_a_build_leaves_a_clean_cache(
    kill_at: str, fake_spec: dict[str, Any], tmp_path: Path
) -> None:
    """A process killed while compiling, while writing the object, or between the object
    and the manifest: the next processes build the entry once, silently (no corruption
    warning), and no temporary file stays behind."""
    expect = expected_result(fake_spec, tmp_path)
    marker = tmp_path / "compiling"
    delay = 60.0 if kill_at == "compile" else 0.0  # killed by the parent, or by itself
    spec = {**fake_spec, "kill_at": kill_at, "marker": str(marker), "delay": delay}
    victim = spawn("fake", spec)
    if kill_at == "compile":
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=CHILD_TIMEOUT_S)
    assert victim.returncode == -signal.SIGKILL
    entry = next(Path(fake_spec["root"]).glob("*/*"))
    left = sorted(p.name for p in entry.iterdir())
    if kill_at == "object":
        assert MANIFEST_NAME not in left and OBJECT_NAME in left
    if kill_at == "export":
        assert any(name.startswith(".kernel-") for name in left), left

    reports = race("fake", {**fake_spec, "delay": 0.5, "expect": expect}, 3, tmp_path)
    assert sorted(r["status"] for r in reports) == ["compiled", "disk", "disk"]
    assert [r["warned"] for r in reports] == [[]] * 3
    assert_entry_complete(fake_spec)


def test_corrupt_entry_is_rebuilt_once_among_racing_processes(
    fake_spec: dict[str, Any], tmp_path: Path
) -> None:
    expect = expected_result(fake_spec, tmp_path)
    cache = KernelCache(fake_spec["root"], _fake(fake_spec).toolchain())
    cache.compile_into_cache(CONFIG)
    obj = cache.entry_dir(cache.key(CONFIG)) / OBJECT_NAME
    obj.write_bytes(bytes(b ^ 0xFF for b in obj.read_bytes()))

    reports = race("fake", {**fake_spec, "delay": 0.5, "expect": expect}, 4, tmp_path)
    assert sorted(r["status"] for r in reports) == ["disk"] * 3 + ["rebuilt"]
    warned = [w for r in reports for w in r["warned"]]
    assert len(warned) == 1 and "corrupt kernel cache entry" in warned[0]
    assert compiles(fake_spec) == 3  # reference, first build, rebuild
    assert_entry_complete(fake_spec)


def test_clear_while_processes_build_and_load(fake_spec: dict[str, Any], tmp_path: Path) -> None:
    """One process clears the cache in a loop while four get the kernel from fresh caches
    in a loop: nobody fails, every kernel is right, and the cache ends consistent."""
    expect = expected_result(fake_spec, tmp_path)
    # Each child runs 4 s after its imports (2-3 s on 2 cores), so the loops overlap.
    clearer = spawn("clear", {**fake_spec, "seconds": 4.0})
    loaders = [
        spawn("fake", {**fake_spec, "seconds": 4.0, "delay": 0.02, "expect": expect})
        for _ in range(4)
    ]
    reports = [finish(p) for p in loaders]
    assert finish(clearer)["cleared"] >= 1
    assert {r["result"] for r in reports} == {expect}
    assert [r["warned"] for r in reports] == [[]] * 4
    for entry in KernelCache(fake_spec["root"], _fake(fake_spec).toolchain()).list_entries():
        assert entry.valid or entry.state == "unfinished", entry
        assert not [p for p in entry.path.iterdir() if p.name.startswith(".kernel-")]


# ----------------------------------------------------------------------------- real file systems


def _mount_prefix(script: str, root: Path) -> tuple[str, ...]:
    """A command prefix that runs the child in a mount namespace of its own after `script`
    (given `root` as $1); skips where mounting is not permitted (not root, or a container
    without CAP_SYS_ADMIN). The mount goes away with the child."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and `unshare` to mount a file system for the child")
    probe = subprocess.run([unshare, "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"`unshare --mount` is not permitted here: {probe.stderr.decode()[-200:]}")
    return (unshare, "--mount", "sh", "-c", f'{script} && shift && exec "$@"', "sh", str(root))


def _chmod_dirs(root: Path, mode: int) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(mode)


def test_read_only_mount(fake_spec: dict[str, Any], tmp_path: Path) -> None:
    """A cache on a read-only file system (as root: a bind mount remounted read-only; else
    directories without write permission): the entry already there loads from disk, a
    missing one is compiled in memory with one warning, and nothing is written."""
    expect = expected_result(fake_spec, tmp_path)
    root = Path(fake_spec["root"])
    KernelCache(root, _fake(fake_spec).toolchain()).compile_into_cache(OTHER)
    before = sorted(str(p) for p in root.rglob("*"))
    spec = {**fake_spec, "expect": expect, "first": "other"}
    if os.geteuid() == 0:
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"'
        report = finish(spawn("fake", spec, _mount_prefix(script, root)))
    else:
        _chmod_dirs(root, 0o555)
        try:
            report = finish(spawn("fake", spec))
        finally:
            _chmod_dirs(root, 0o755)
    assert report["first"] == CacheStatus.DISK.value
    assert report["status"] == CacheStatus.UNCACHED.value and report["result"] == expect
    [warned] = report["warned"]
    assert "cannot be written" in warned and "compiling kernels in memory" in warned
    assert sorted(str(p) for p in root.rglob("*")) == before


@pytest.mark.parametrize("role", ["fake", pytest.param("real", marks=pytest.mark.slow)])
def test_full_tmpfs(role: str, fake_spec: dict[str, Any], tmp_path: Path) -> None:
    """A cache on a real full file system (a 64 KiB tmpfs filled up): the kernel is
    compiled in memory with one warning naming ENOSPC, and nothing partial stays."""
    root = Path(fake_spec["root"])
    root.mkdir()
    fill = '{ cat /dev/zero > "$1/filler" 2>/dev/null; true; }'
    prefix = _mount_prefix(f'mount -t tmpfs -o size=64k tmpfs "$1" && {fill}', root)
    spec = dict(fake_spec)
    if role == "fake":
        spec["expect"] = expected_result(fake_spec, tmp_path)
    report = finish(spawn(role, spec, prefix))
    assert report["status"] == CacheStatus.UNCACHED.value
    assert report["result"] == spec.get("expect", "True")
    [warned] = report["warned"]
    assert "No space left on device" in warned and "compiling kernels in memory" in warned


# ----------------------------------------------------------------------------- real toolchain


def elf_dynamic(path: Path) -> dict[int, list[bytes]]:
    """The string-valued entries of an ELF64 little-endian file's dynamic section, by tag
    (DT_NEEDED 1, DT_RPATH 15, DT_RUNPATH 29), read without readelf or pyelftools."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not ELF64 LE"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, offset, vaddr, _, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1:  # PT_LOAD
            loads.append((vaddr, offset, filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (offset, filesz)
    assert dynamic is not None, "no dynamic section"
    entries = [
        struct.unpack_from("<qQ", data, dynamic[0] + 16 * i) for i in range(dynamic[1] // 16)
    ]
    strtab_vaddr = next(value for tag, value in entries if tag == 5)  # DT_STRTAB
    strtab = next(o + strtab_vaddr - v for v, o, size in loads if v <= strtab_vaddr < v + size)
    strings: dict[int, list[bytes]] = {}
    for tag, value in entries:
        if tag in (1, 15, 29):
            start = strtab + value
            strings.setdefault(tag, []).append(data[start : data.index(b"\0", start)])
    return strings


@pytest.mark.slow
def test_real_entries_are_relocatable(tmp_path: Path) -> None:
    """A kernel exported where the DSL runtime lives elsewhere (CUTE_DSL_LIBS at a copy,
    standing in for another venv or container) names no folder of that environment, and
    loads with the runtime of the environment that loads it."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutlass.runtime import find_runtime_libraries

    if not shutil.which(os.environ.get("CC") or "cc") and not shutil.which("gcc"):
        pytest.skip("no C compiler: kernels are exported as object files, loaded by the DSL")
    # This environment's runtime, as the DSL finds it (this process has no CUTE_DSL_LIBS).
    here = Path(find_runtime_libraries(enable_tvm_ffi=False)[0])
    elsewhere = tmp_path / "build-venv" / "site-packages" / "nvidia_cutlass_dsl" / "lib"
    elsewhere.mkdir(parents=True)
    shutil.copy2(here, elsewhere / here.name)
    lib = tmp_path / "kernel.so"
    compile_ = (
        "from cutedsl_kernels import build; from cutedsl_kernels.config import KVStoreConfig; "
        f"c = build.compile_kernel(KVStoreConfig('sm_90a', 128, 'float16')); "
        f"build.export_kernel(c, {str(lib)!r}, 'sparsek_test')"
    )
    env = {**os.environ, "CUTE_DSL_LIBS": str(elsewhere / here.name), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", compile_], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]

    dynamic = elf_dynamic(lib)
    assert sorted(dynamic[1]) == [b"libcute_dsl_runtime.so", b"libtvm_ffi.so"]
    assert 15 not in dynamic and 29 not in dynamic, f"RPATH/RUNPATH: {dynamic}"
    data = lib.read_bytes()
    for folder in (tmp_path, Path(sys.prefix), here.parent):
        assert str(folder).encode() not in data, f"{lib} names {folder}"

    loaded = finish(spawn("load", {"path": str(lib)}))
    assert loaded["runtime"] == [str(here)]


@pytest.mark.slow
def test_real_processes_race_after_a_kill(tmp_path: Path) -> None:
    """The real toolchain: a process killed with SIGKILL while compiling, then three
    processes asking for the same sm_90a kernel at once: one compiles, the others find it
    on disk, all three load it, and the entry is complete and relocatable."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    spec: dict[str, Any] = {"root": str(tmp_path / "cache")}
    marker = tmp_path / "compiling"
    victim = spawn("real", {**spec, "kill_at": "compile", "marker": str(marker)})
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the compile: the DSL's import (seconds), then the kernel's trace
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=CHILD_TIMEOUT_S)
    assert victim.returncode == -signal.SIGKILL

    reports = race("real", spec, 3, tmp_path)
    assert sorted(r["status"] for r in reports) == ["compiled", "disk", "disk"]
    assert {r["result"] for r in reports} == {"True"}
    assert [r["warned"] for r in reports] == [[]] * 3
    cache = KernelCache(spec["root"], dsl_toolchain())
    [entry] = cache.list_entries()
    assert sorted(p.name for p in entry.path.iterdir()) == [LOCK_NAME, OBJECT_NAME, MANIFEST_NAME]
    assert entry.valid, entry
    if (entry.path / OBJECT_NAME).read_bytes()[16] == 3:  # a shared library (a C compiler)
        assert not {15, 29} & set(elf_dynamic(entry.path / OBJECT_NAME))


if __name__ == "__main__":
    child_main(sys.argv[1], json.loads(sys.argv[2]))
