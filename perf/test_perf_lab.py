"""CPU checks of perf/lab/: every script imports (so every library name it uses at module
level exists) and parses its arguments before touching the GPU (`--help` works without one).

The scripts' GPU paths are not run here; `mypy perf` type-checks them against the library.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parent / "lab"
SCRIPTS = sorted(p.stem for p in LAB.glob("*.py") if p.stem != "__init__")


def test_the_lab_has_scripts() -> None:
    assert "ab_persistent" in SCRIPTS and "latency_probe" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_lab_script_help(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(f"perf.lab.{name}")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_lab_script_runs_as_a_file() -> None:
    """`python perf/lab/<name>.py` finds the `perf` package from any directory."""
    script = LAB / "decode_splits.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=LAB.parents[1].parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
