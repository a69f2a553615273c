"""Command line: `python -m sparsek {compile,info,cache,demo}`.

- compile [--arch sm_90a]: compile every registered config for the arch into the cache
  (`sparsek.precompile`).
- info: GPU, versions, support matrix, cache directory and entries.
- cache clear: delete every cache entry.
- demo: on a GPU, check against the reference and time vs torch SDPA; without one,
  compile the kernels for sm_90a and run the CPU reference path.
"""

from __future__ import annotations

import argparse
import platform
import sys
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
        return cmd_cache_clear()
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
    p_cache = sub.add_parser("cache", help="manage the kernel cache")
    p_cache.add_argument("action", choices=["clear"])
    sub.add_parser("demo", help="check and time the kernels (or the reference without a GPU)")
    return parser


def cmd_info() -> int:
    """Print GPU, versions, the support matrix and the cache contents."""
    from cutedsl_kernels.build import dsl_version

    print(f"sparsek {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, DSL {dsl_version()}")
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
    entries = cache.list_entries()
    print(f"\ncache: {cache.cache_dir()} ({len(entries)} entries)")
    for entry in entries:
        state = "ok" if entry.valid else f"BAD: {entry.problem}"
        print(f"  {entry.arch}/{entry.path.name}  {entry.name}  {entry.size} B  {state}")
    return 0


def cmd_cache_clear() -> int:
    """Delete every entry of the cache."""
    removed = cache.clear()
    print(f"removed {removed} entries from {cache.cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
