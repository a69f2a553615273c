"""Command line: `python -m sparsek {compile,info,cache,demo}`.

- compile [--arch sm_90a]: compile every registered config for the arch into the cache
  (`sparsek.precompile`).
- info: GPU, versions, toolchain identity, support matrix, cache directory and size.
- cache list: every entry with its arch, size, age and state (current, stale, unfinished,
  corrupt); stale entries were made by another DSL, toolchain or kernel source.
- cache prune [--all]: remove stale, unfinished and corrupt entries (`--all`: every entry).
- cache clear: the same as `cache prune --all`. Only entries sparsek wrote are removed
  (the cache directory may be shared), each under its lock; entries in use are left alone.
- demo: on a GPU, check against the reference and time vs torch SDPA; without one,
  compile the kernels for sm_90a and run the CPU reference path.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence

import torch

from sparsek import __version__, cache, registry
from sparsek.precompile import precompile

DEFAULT_ARCH = "sm_90a"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "compile":
        return precompile(args.arch or registry.detect_arch() or DEFAULT_ARCH)
    if args.command == "info":
        return cmd_info()
    if args.command == "cache":
        if args.action == "list":
            return cmd_cache_list()
        return cmd_cache_prune(everything=args.action == "clear" or args.all)
    if args.command == "demo":
        from sparsek.demo import run_demo

        return run_demo()
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparsek", description="sparsek command line")
    sub = parser.add_subparsers(dest="command")
    p_compile = sub.add_parser("compile", help="compile every registered kernel for an arch")
    p_compile.add_argument(
        "--arch", help=f"target, e.g. sm_90a (default: this GPU, else {DEFAULT_ARCH})"
    )
    sub.add_parser("info", help="GPU, versions, support matrix and cache")
    p_cache = sub.add_parser("cache", help="list and remove kernel cache entries")
    actions = p_cache.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every entry: arch, size, age, current or stale")
    p_prune = actions.add_parser("prune", help="remove stale, unfinished and corrupt entries")
    p_prune.add_argument("--all", action="store_true", help="remove every entry sparsek wrote")
    actions.add_parser("clear", help="remove every entry sparsek wrote (prune --all)")
    sub.add_parser("demo", help="check and time the kernels (or the reference without a GPU)")
    return parser


def cmd_info() -> int:
    """Print GPU, versions, the support matrix and the cache's size."""
    from cutedsl_kernels.build import dsl_version, toolchain_identity

    print(f"sparsek {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, DSL {dsl_version()}")
    identity = ", ".join(f"{k}={v or '-'}" for k, v in toolchain_identity().items())
    print(f"toolchain (part of every kernel's cache key): {identity}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            arch = registry.arch_from_capability(cap)
            print(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]} -> {arch})")
    else:
        print("GPU: none (CUDA not available); kernels can still be compiled for sm_90a")
    print(f"selected arch: {registry.detect_arch() or '-'} (override: ${registry.ARCH_ENV})")
    print("\nsupport matrix (dtype: float16, bfloat16; causal and non-causal):")
    print(f"  {'arch':<9} {'head_dim':<9} {'tile_m':>6} {'tile_n':>6} {'stages':>6}")
    for arch in registry.registered_arches():
        for config in registry.registered_configs(arch):
            if config.dtypes.qk == "float16" and not config.mask.causal:
                print(
                    f"  {arch:<9} {config.head_dim:<9} {config.tile_m:>6} {config.tile_n:>6}"
                    f" {config.num_stages:>6}"
                )
    print(f"\ncache: {_cache_summary(cache.list_entries())}")
    print("  (`python -m sparsek cache list` lists the entries, `cache prune` removes stale ones)")
    return 0


def cmd_cache_list() -> int:
    """Print every entry of the cache: arch, size on disk, age, state, kernel."""
    entries = cache.list_entries()
    print(f"cache: {_cache_summary(entries)}")
    if entries:
        print(f"  {'arch':<8} {'size':>10} {'age':>7}  {'state':<10} kernel")
    now = time.time()
    for entry in entries:
        size, age = _size(entry.disk_bytes), _age(entry.age_seconds(now))
        label = entry.name if entry.valid else f"{entry.path.name}: {entry.problem}"
        print(f"  {entry.arch:<8} {size:>10} {age:>7}  {entry.state:<10} {label}")
    return 0


def cmd_cache_prune(everything: bool) -> int:
    """Remove stale, unfinished and corrupt entries (every entry with `everything`)."""
    root = cache.default_cache().root
    try:
        result = cache.prune(everything=everything)
    except OSError as exc:  # a read-only cache directory, say
        print(f"cannot remove entries from {root}: {exc}")
        return 1
    print(f"removed {result.removed} entries ({_size(result.freed_bytes)}) from {root}")
    if result.busy:
        print(f"left {result.busy} entries alone: another process is building or loading them")
    return 0


def _cache_summary(entries: Sequence[cache.CacheEntry]) -> str:
    total = _size(sum(e.disk_bytes for e in entries))
    states = [e.state for e in entries]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(sorted(states)))
    root = cache.default_cache().root
    return f"{root} ({len(entries)} entries, {total}{': ' if counts else ''}{counts})"


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
