"""Documents, result files and comments speak of the project and its users' machines only.

Compared against: an explicit list of phrases that describe the machines sparsek was developed
and measured on rather than a user's (how GPU time was obtained, the folders dependencies were
staged in, per-command time limits, those machines' absolute paths), searched line by line in
every text file git tracks. Where a word also has a meaning in the product (a kernel's
shared-memory or register budget, the device time of one kernel call), that use is allowed by
a precise pattern, never by skipping a file. A failure lists each offending `file:line`.

CPU only: reads the files as text, imports nothing of sparsek.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()  # it spells the phrases out
# Never tracked (ignored), listed in case one ever is: local environments and scratch work.
SKIPPED_DIRS = (".venv", ".devdeps", ".scratch")


@dataclass(frozen=True)
class Phrase:
    """A development-setup phrase (`pattern`) and the product uses of its words (`allowed`)."""

    name: str
    pattern: str
    allowed: tuple[str, ...] = ()
    case_sensitive: bool = False

    def finds(self, line: str) -> bool:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        for allowed in self.allowed:
            line = re.sub(allowed, " ", line, flags=flags)
        return re.search(self.pattern, line, flags) is not None


PHRASES = (
    Phrase("staging script", r"\bstage\.sh\b"),
    Phrase("staged-dependency folder", r"\.devdeps\b"),
    Phrase(
        "staged toolchain",
        r"\bstaged (dsl|packages?|deps|dependencies|wheels?|toolchain)\b"
        r"|\bat staging\b|\bstaging (folder|dir|directory|area|step|script)\b",
    ),
    Phrase("the two halves (of the development setup)", r"\btwo halves\b"),
    Phrase("lent / loaned / borrowed GPUs", r"\blent\b|\bloan(s|ed)?\b|\bborrow(s|ed|ing)?\b"),
    Phrase("machine leases", r"\blease[sd]?\b"),
    Phrase("device tool / device machine", r"\bdevice (tool|machine)s?\b"),
    Phrase(
        "device time (as GPU time granted)",
        r"\bdevice[- ]time\b",
        # the time a kernel call takes on the GPU (perf/README.md, perf/timing.py)
        allowed=(r"\bdevice time (of one|per) call\b",),
    ),
    Phrase(
        "budget (of GPU time)",
        r"\bbudget",
        allowed=(
            r"\b(shared[- ]memory|smem|register|group|l2|dsl-free) budgets?\b",
            r"\bbudgeted\b",
            r"\w_budget\b",  # identifiers: test_two_ctas_per_sm_budget
        ),
    ),
    Phrase(
        "per-command time limit",
        r"\b\d+ ?(s|sec|seconds?|min|minutes?) (time )?(limit|cap)\b"
        r"|\b\d+-(second|minute) (time )?(limit|cap)\b"
        r"|\bper-(call|command) (time )?(limit|cap)\b|\bhard time limit\b|\blimit_s\b",
    ),
    Phrase("output folder of a remote run", r"\$OUT\b", case_sensitive=True),
    Phrase(
        "absolute path of a development machine",
        r"(?<![\w.~-])/(work|root|home)/|/tmp/sparsek-site\b|/opt/torch\b",
    ),
    Phrase(
        "the CPU box / the GPU machine",
        r"\bcpu box\b|\bthe (cpu|gpu)( test)? machine\b",
    ),
    Phrase("working sessions", r"\b(this|that) session\b|\bmachine sessions?\b"),
    Phrase("helper sessions", r"\bhelper sessions?\b"),
)


def offending_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, phrase name, line) for each line of `text` that uses a phrase."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for phrase in PHRASES:
            if phrase.finds(line):
                found.append((number, phrase.name, line.strip()))
    return found


def tracked_text_files(root: Path) -> list[Path]:
    """The files git tracks under `root` that read as UTF-8 text (no NUL byte)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.decode()
    files = []
    for name in filter(None, listed.split("\0")):
        if name == THIS_FILE or any(part in SKIPPED_DIRS for part in name.split("/")[:-1]):
            continue
        path = root / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_tracked_files_speak_of_users_machines_only() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    offences = []
    for path in tracked_text_files(REPO):
        for number, name, line in offending_lines(path.read_text(encoding="utf-8")):
            offences.append(f"{path.relative_to(REPO)}:{number}: [{name}] {line[:160]}")
    for offence in offences:
        print(offence)
    assert not offences, (
        f"{len(offences)} line(s) describe the development machines, not a user's:\n"
        + "\n".join(offences)
    )


@pytest.mark.parametrize(
    "line",
    [
        "copy the wheels with stage.sh first",
        "PYTHONPATH=.devdeps/site python -m pytest",
        "run it against the staged DSL",
        "the lent GPU is now an H200",
        "another machine lease",
        "run it with the device tool",
        "no device time left to re-run the GPU tests",
        "the budget ran out before the decode rows",
        "each command runs under a 600 s limit",
        "a 10-minute cap per call",
        "results were written to $OUT/results.csv",
        "  /work/main/sparsek/ops.py:151(launch)",
        "python perf/bench_fmha.py --out /root/out/res",
        "PYTHONPATH=/tmp/sparsek-site python perf/sanitize.py",
        "  /opt/torch/.venv/lib/python3.12/site-packages/torch/jit/_script.py:365",
        "compiled on the CPU box",
        "it cannot be installed on the GPU machine",
        "not investigated further in this session",
        "asked a helper session to measure it",
    ],
)
def test_each_phrase_is_found(line: str) -> None:
    assert offending_lines(line), line


@pytest.mark.parametrize(
    "line",
    [
        "Stage counts and register budgets are derived from the shared-memory budget",
        "def test_two_ctas_per_sm_budget() -> None:",
        "of one CTA are budgeted for it",
        "the group budget becomes a tuning field (`l2_group_mb`)",
        "- `kernel`: device time of one call. Warm-up (>= 25 ms)",
        "O is staged in Q's buffer; the staging buffer of the KV path",
        "the one lock held on a file that no longer names the entry",
        "(Triggered internally at /pytorch/aten/src/ATen/native/transformers/sdp_utils.cpp:986.)",
        "  .venv/lib/python3.12/site-packages/torch/jit/_script.py:365",
        "python perf/bench_fmha.py --suites varlen,decode --out perf/results/h200",
        "Every test session compiles into its own cache (never the user's ~/.cache).",
        "a release of the output stage; Please switch to `torch.compile`",
        "Host speed differs between machines (~1.5x seen)",
        "first_call.CHILD_TIMEOUT_S = 300.0 (the child's time out)",
    ],
)
def test_product_meanings_are_allowed(line: str) -> None:
    assert not offending_lines(line), offending_lines(line)
