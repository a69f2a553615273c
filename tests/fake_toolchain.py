"""A stand-in for the CuTe DSL toolchain, so cache semantics are tested without compiling.

`compile` appends one line per call to a log file (so tests count compiles across
processes), `export` writes a small deterministic object file, `load` returns a callable
that reports the object's bytes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cutedsl_kernels.config import CAUSAL, ElementTypes, FmhaFwdConfig
from sparsek.cache import KernelCache, Toolchain


class FakeCompiler:
    """Counts compiles in `log`; `fail=True` makes compile raise like a kernel rejection."""

    def __init__(
        self,
        log: Path,
        sources: list[Path],
        version: str = "4.8.1",
        delay: float = 0.0,
        fail: bool = False,
    ) -> None:
        self.log, self.sources, self.version = log, sources, version
        self.delay, self.fail = delay, fail

    def compile(self, config: FmhaFwdConfig) -> dict[str, Any]:
        with self.log.open("a") as f:
            f.write(f"{os.getpid()} {config.name}\n")
        time.sleep(self.delay)
        if self.fail:
            raise ValueError(f"cannot compile {config.name}: fake failure")
        return {"name": config.name}

    def export(self, compiled: dict[str, Any], path: str, function_name: str) -> None:
        Path(path).write_bytes(f"FAKE {function_name} {compiled['name']}\n".encode() * 64)

    def load(self, path: str, function_name: str) -> Callable[..., bytes]:
        data = Path(path).read_bytes()
        assert function_name.encode() in data
        return lambda *args: data

    def toolchain(self) -> Toolchain:
        return Toolchain(
            compile=self.compile,
            export=self.export,
            load=self.load,
            dsl_version=lambda: self.version,
            source_files=lambda: list(self.sources),
        )

    def count(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0


def race_main(root: str, log: str, source: str, barrier: str, peers: int) -> None:
    """One racing process: wait for `peers` processes at the barrier, then compile."""
    compiler = FakeCompiler(Path(log), [Path(source)], delay=1.0)
    cache = KernelCache(root, compiler.toolchain())
    config = FmhaFwdConfig("sm_90a", 128, ElementTypes.uniform("bfloat16"), CAUSAL)
    Path(barrier, f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while len(list(Path(barrier).iterdir())) < peers and time.monotonic() < deadline:
        time.sleep(0.01)
    status = cache.compile_into_cache(config)
    kernel = cache.get_kernel(config)
    sys.stdout.write(f"{status.value} {len(kernel())}\n")


if __name__ == "__main__":
    race_main(*sys.argv[1:5], peers=int(sys.argv[5]))
