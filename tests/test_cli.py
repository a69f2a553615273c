"""`python -m sparsek` commands, with the default cache swapped for a fake-compiler cache.

Compared against: the documented command behaviour (one line per config, exit status,
cache listing and clearing).
"""

from __future__ import annotations

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
    assert "support matrix" in info and "sm_90a" in info and f"({n} entries)" in info

    assert cli.main(["cache", "clear"]) == 0
    assert f"removed {n} entries" in capsys.readouterr().out


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
