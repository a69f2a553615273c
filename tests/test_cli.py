"""`python -m sparsek` commands, with the default cache swapped for a fake-compiler cache.

Compared against: the documented command behaviour (one line per config, exit status,
cache listing with sizes, ages and states, pruning stale entries, clearing only what
sparsek wrote).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_toolchain import FakeCompiler

from sparsek import cache, cli, registry
from sparsek.cache import KernelCache


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCompiler:
    src = tmp_path / "k.py"
    src.write_text("# kernel\n")
    compiler = FakeCompiler(tmp_path / "log", [src])
    monkeypatch.setenv("SPARSEK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_default", KernelCache(None, compiler.toolchain()))
    return compiler


# Dense kernels, their variable-length variants and the split-KV combine kernels.
NUM_KERNELS = len(registry.registered_kernels("sm_90a"))


def test_compile_then_info_then_clear(fake_cache: FakeCompiler, capsys) -> None:
    n = NUM_KERNELS
    assert n > 8
    assert cli.main(["compile", "--arch", "sm_90a"]) == 0
    out = capsys.readouterr().out
    assert out.count(" compiled") == n and f"{n}/{n} kernels ready" in out
    assert cli.main(["compile", "--arch", "sm_90a"]) == 0
    assert capsys.readouterr().out.count(" disk") == n
    assert fake_cache.count() == n

    assert cli.main(["info"]) == 0
    info = capsys.readouterr().out
    assert "support matrix" in info and "sm_90a" in info and f"({n} entries, " in info
    assert f"{n} current)" in info and "toolchain (part of every kernel's cache key): dsl=" in info

    assert cli.main(["cache", "clear"]) == 0
    assert f"removed {n} entries" in capsys.readouterr().out


def test_cache_list_then_prune_stale(
    fake_cache: FakeCompiler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    configs = registry.registered_kernels("sm_90a")[:3]
    for config in configs:
        cache.compile_into_cache(config)
    # A new kernel source: the three entries are now stale; one is compiled anew.
    fake_cache.sources[0].write_text("# kernel v2\n")
    monkeypatch.setattr(cache, "_default", KernelCache(None, fake_cache.toolchain()))
    cache.compile_into_cache(configs[0])

    assert cli.main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "(4 entries, " in out and "1 current, 3 stale)" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["sm_90a"] * 4
    assert sorted(row[-2] for row in rows) == ["current", "stale", "stale", "stale"]
    assert all(row[2] == "KiB" or row[2] == "B" for row in rows)  # size, then age ("0 s")

    assert cli.main(["cache", "prune"]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    assert [e.state for e in cache.list_entries()] == ["current"]
    assert cli.main(["cache", "prune", "--all"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert cache.list_entries() == []


def test_cache_clear_in_a_shared_folder_keeps_other_files(
    fake_cache: FakeCompiler, tmp_path: Path, capsys
) -> None:
    """The reported bug: `$SPARSEK_CACHE_DIR` at a shared folder, `cache clear` deleted
    another project's folder."""
    other = tmp_path / "cache" / "other-project" / "results"
    other.mkdir(parents=True)
    (other / "table.csv").write_text("a,b\n")
    cache.compile_into_cache(registry.registered_kernels("sm_90a")[0])
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert (other / "table.csv").read_text() == "a,b\n"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["other-project"]


def test_compile_failure_exits_nonzero(tmp_path: Path, monkeypatch, capsys) -> None:
    failing = FakeCompiler(tmp_path / "log", [Path(__file__)], fail=True)
    monkeypatch.setattr(cache, "_default", KernelCache(tmp_path / "c", failing.toolchain()))
    assert cli.main(["compile", "--arch", "sm_90a"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED (ValueError") == NUM_KERNELS
    assert f"0/{NUM_KERNELS} kernels ready" in out


def test_compile_unknown_arch(capsys) -> None:
    assert cli.main(["compile", "--arch", "sm_80"]) == 1
    assert "no kernels registered for sm_80" in capsys.readouterr().out


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sparsek", "info"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "sparsek 0.1.0" in result.stdout


def test_cache_prune_on_a_read_only_cache_says_so(
    fake_cache: FakeCompiler, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    cache.compile_into_cache(registry.registered_kernels("sm_90a")[0])
    real_open = os.open

    def read_only(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):  # simulated: tests may run as root
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", read_only)
        assert cli.main(["cache", "prune", "--all"]) == 1
    assert "cannot remove entries from" in capsys.readouterr().out
    assert len(cache.list_entries()) == 1
