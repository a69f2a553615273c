"""CPU checks of perf/sanitize.py: `--list` works without a GPU, from any directory, and
names every case; each name maps to a callable; a bad name is refused with usage; a run
without a GPU says so (exit 2) instead of failing inside a case.

Compared against: the script's own case table (`sanitize.CASES`) and the kernel kinds the
sanitizer run must cover. The cases themselves run on a GPU (docs/sanitizer.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perf import sanitize

SCRIPT = Path(sanitize.__file__).resolve()


def test_every_case_name_maps_to_a_callable() -> None:
    assert sanitize.CASES
    for name, case in sanitize.CASES.items():
        assert case.name == name and callable(case.run) and case.launches


def test_the_cases_cover_every_kernel_kind() -> None:
    wanted = {
        "dense", "dense_persistent", "dense_one_wave", "dense_long_causal", "varlen",
        "kvcache", "kvcache_decode", "paged", "paged_decode", "split_kv", "split_kv_prefill",
        "decode_fills_gpu", "kv_store",
    }  # fmt: skip
    assert wanted <= set(sanitize.CASES)


def test_list_prints_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert sanitize.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(sanitize.CASES)


def test_list_runs_as_a_file_from_another_directory() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--list"],
        cwd=SCRIPT.parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == list(sanitize.CASES)


def test_unknown_case_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        sanitize.main(["--case", "no_such_case"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only run")
def test_without_a_gpu_it_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert sanitize.main(["--case", "varlen"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
