"""What a result row must name: GPU, git sha, DSL / torch / CUDA versions, the command."""

from __future__ import annotations

import importlib.metadata
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunInfo:
    gpu: str
    git_sha: str
    dsl_version: str
    torch_version: str
    cuda_version: str
    command: str


def gpu_name(dry_run: bool) -> str:
    import torch

    if dry_run:
        return "cpu-dry-run (fake providers)"
    if not torch.cuda.is_available():
        return "no-cuda"
    return torch.cuda.get_device_name()


def git_sha(root: Path = REPO_ROOT) -> str:
    """HEAD's sha (with "-dirty" when git reports changes); read from .git if git is missing."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        return sha + ("-dirty" if status else "")
    except (OSError, subprocess.SubprocessError):
        return _sha_from_git_dir(root / ".git")


def _sha_from_git_dir(git_dir: Path) -> str:
    try:
        if git_dir.is_file():  # a worktree: ".git" holds "gitdir: <path>"
            git_dir = (git_dir.parent / git_dir.read_text().split(":", 1)[1].strip()).resolve()
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[len("ref: ") :]
        ref_file = git_dir / ref
        if ref_file.is_file():
            return ref_file.read_text().strip()
        packed = git_dir / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    except OSError:
        pass
    return "unknown"


def dsl_version() -> str:
    """nvidia-cutlass-dsl's version (from `cutlass` itself when the DSL is on PYTHONPATH
    rather than installed)."""
    try:
        return importlib.metadata.version("nvidia-cutlass-dsl")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        import cutlass

        return str(cutlass.__version__)
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def command_line() -> str:
    """The command as typed (python + script + arguments), for the results to name."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def collect(*, dry_run: bool, sha_override: str | None) -> RunInfo:
    import torch

    return RunInfo(
        gpu=gpu_name(dry_run),
        git_sha=sha_override or git_sha(),
        dsl_version="n/a (dry run)" if dry_run else dsl_version(),
        torch_version=torch.__version__,
        cuda_version=str(torch.version.cuda or "none"),
        command=command_line(),
    )
