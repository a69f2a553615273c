"""Compile every registered kernel of an architecture into the disk cache (no GPU needed).

`python -m sparsek compile --arch sm_90a` runs this, and so does the CPU demo; a Docker
build can fill the cache ahead of time on a machine without a GPU.
"""

from __future__ import annotations

import time

from sparsek import cache, registry


def precompile(arch: str) -> int:
    """Compile every registered config for `arch`; one line per config; returns 1 on any
    failure (after trying every config), else 0."""
    configs = registry.registered_kernels(arch)
    if not configs:
        print(f"no kernels registered for {arch} (registered: {registry.registered_arches()})")
        return 1
    print(f"compiling {len(configs)} kernels for {arch} into {cache.cache_dir()}")
    failures = 0
    for config in configs:
        start = time.perf_counter()
        try:
            status = cache.compile_into_cache(config).value
        except Exception as exc:  # report every config, then fail
            failures += 1
            status = f"FAILED ({type(exc).__name__}: {_first_line(exc)})"
        print(f"  {config.name:<56} {time.perf_counter() - start:7.2f} s  {status}", flush=True)
    print(f"{len(configs) - failures}/{len(configs)} kernels ready")
    return 1 if failures else 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""
