"""Command line: `sparsek COMMAND` (console script), or `python -m sparsek COMMAND`.

- compile [--arch sm_90a] [--head-dim D..] [--dtype T..] [--path P..] [--jobs N] [-v]:
  compile the registered kernels (all, or those the filters select) into the cache
  (`sparsek.precompile`); a progress bar; Ctrl-C stops cleanly; a cache directory that
  cannot be written is an error.
- info [--json]: versions, toolchain identity, GPUs, the support matrix (arch x head dim x
  dtype x path x mask) and a summary of the cache.
- cache list: every entry with its arch, size, age and state (current, stale, unfinished,
  corrupt); stale entries were made by another DSL, toolchain or kernel source.
- cache prune [--all]: remove stale, unfinished and corrupt entries (`--all`: every entry).
- cache clear: the same as `cache prune --all`. Only entries sparsek wrote are removed
  (the cache directory may be shared), each under its lock; entries in use are left alone.
- demo: on a GPU, check against the reference and time vs torch SDPA; without one,
  compile the kernels the demo shows for sm_90a and compare the CPU reference path with
  torch SDPA.
- validate: the demo's correctness check alone (no timing, no compiling ahead); exit
  status 0 when it passes, 1 when not.

Start-up imports the standard library and `sparsek.__version__` only: `--help`, `--version`
and argument errors never import torch (2-4 s); each command imports what it uses.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sparsek import __version__

if TYPE_CHECKING:
    from sparsek import cache

DEFAULT_ARCH = "sm_90a"
# The kernels' element types, the paths of `sparsek.precompile.PATHS` and the mask names
# (kept here so that building the parser imports nothing; tests/test_cli.py checks they agree).
DTYPES = ("float16", "bfloat16", "float8_e4m3fn")
PATHS = ("dense", "varlen", "kvcache", "paged")
# The masks the kernels serve beyond the precompiled ones (`sparsek.registry.SERVED_MASKS`).
MASK_NAMES = (
    "full", "sinks", "softcap", "softcap+sinks",
    "causal", "causal+sinks", "causal+softcap", "causal+softcap+sinks",
    "window", "window+sinks", "window+softcap", "window+softcap+sinks",
)  # fmt: skip
# `sparsek.precompile.MAX_DEFAULT_JOBS`, for the help text (tests/test_cli.py checks it).
MAX_DEFAULT_JOBS = 16
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    # torch warns at import where numpy is missing (sparsek never needs it): not this
    # command's business. The filter holds in this process only, never in a user's program.
    warnings.filterwarnings("ignore", "Failed to initialize NumPy", UserWarning)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsek",
        description="sparsek: fused attention kernels for NVIDIA Hopper (CuTe DSL).",
        epilog="`python -m sparsek` takes the same commands.",
    )
    parser.add_argument("--version", action="version", version=f"sparsek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_compile = sub.add_parser(
        "compile",
        help="compile kernels into the cache (all registered ones, or those selected)",
        description="Compile the registered kernels of an architecture into the kernel "
        "cache (no GPU needed). Filters combine: --head-dim 128 --dtype bfloat16 compiles "
        "the bfloat16 d128 kernels of every path.",
    )
    p_compile.add_argument(
        "--arch", help=f"target, e.g. sm_90a (default: this GPU's, else {DEFAULT_ARCH})"
    )
    p_compile.add_argument(
        "--head-dim", type=int, nargs="+", action="extend", metavar="D", help="only these"
    )
    p_compile.add_argument(
        "--dtype",
        nargs="+",
        action="extend",
        choices=DTYPES,
        metavar="T",
        help=f"only these element types ({', '.join(DTYPES)})",
    )
    p_compile.add_argument(
        "--path",
        nargs="+",
        action="extend",
        choices=PATHS,
        metavar="P",
        help="only the kernels of these paths: dense (attention, the SDPA drop-in), varlen "
        "(attention_varlen), kvcache and paged (attention_with_kvcache: contiguous, paged)",
    )
    p_compile.add_argument(
        "--mask",
        nargs="+",
        action="extend",
        choices=MASK_NAMES,
        metavar="M",
        help="the kernels of these masks instead of the registered ones (window, softcap "
        "and sinks compile at first use otherwise): " + ", ".join(MASK_NAMES),
    )
    p_compile.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=0,
        metavar="N",
        help=f"compile in N processes (default, or 0: one per CPU, at most {MAX_DEFAULT_JOBS})",
    )
    p_compile.add_argument("-v", "--verbose", action="store_true", help="one line per kernel")
    p_compile.set_defaults(run=_cmd_compile)

    p_info = sub.add_parser("info", help="versions, GPUs, support matrix, cache summary")
    p_info.add_argument("--json", action="store_true", help="one JSON object, for machines")
    p_info.set_defaults(run=lambda args: cmd_info(as_json=args.json))

    p_cache = sub.add_parser("cache", help="list and remove kernel cache entries")
    actions = p_cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    p_list = actions.add_parser("list", help="every entry: arch, size, age, current or stale")
    p_list.set_defaults(run=lambda args: cmd_cache_list())
    p_prune = actions.add_parser("prune", help="remove stale, unfinished and corrupt entries")
    p_prune.add_argument("--all", action="store_true", help="remove every entry sparsek wrote")
    p_prune.set_defaults(run=lambda args: cmd_cache_prune(everything=args.all))
    p_clear = actions.add_parser("clear", help="remove every entry sparsek wrote (prune --all)")
    p_clear.set_defaults(run=lambda args: cmd_cache_prune(everything=True))

    p_demo = sub.add_parser("demo", help="check and time the kernels (the reference on CPU)")
    p_demo.set_defaults(run=_cmd_demo)
    p_validate = sub.add_parser(
        "validate", help="the demo's correctness check alone; exit status 0 or 1"
    )
    p_validate.set_defaults(run=_cmd_validate)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from sparsek.demo import run_demo

    return run_demo()


def _cmd_validate(args: argparse.Namespace) -> int:
    from sparsek.demo import run_validate

    return run_validate()


def _cmd_compile(args: argparse.Namespace) -> int:
    from sparsek import precompile, registry

    arch = args.arch or registry.detect_arch() or DEFAULT_ARCH
    known = registry.registered_arches()
    if arch not in known:
        print(f"no kernels registered for {arch} (registered: {', '.join(known)})")
        return 1
    configs = precompile.select_kernels(
        arch, head_dims=args.head_dim, dtypes=args.dtype, paths=args.path, masks=args.mask
    )
    if not configs:
        dims = ", ".join(str(d) for d in registry.registered_head_dims(arch))
        print(f"no kernel of {arch} matches the filters (registered head dims: {dims})")
        return 1
    jobs = args.jobs if args.jobs > 0 else precompile.default_jobs()
    return precompile.precompile(arch, configs, jobs=jobs, verbose=args.verbose)


def info_report() -> dict[str, Any]:
    """What `info` prints, as JSON-ready data (`info --json`).

    "support" has one row per (arch, head_dim, head_dim_v, dtype): its kernel count and,
    per path (`sparsek.precompile.PATHS`), the masks its kernels take (head_dim_v: V's and
    O's head dim; the combine and KV-store kernels count with their own head dim's row).
    """
    import platform

    import torch

    from cutedsl_kernels.build import dsl_version, toolchain_identity
    from cutedsl_kernels.config import FmhaFwdConfig
    from sparsek import cache, precompile, registry

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            gpus.append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "capability": f"{cap[0]}.{cap[1]}",
                    "arch": registry.arch_from_capability(cap),
                }
            )
    support: dict[tuple[str, int, int, str], dict[str, Any]] = {}
    registered: dict[str, set[str]] = {}
    for arch in registry.registered_arches():
        configs = registry.registered_kernels(arch)
        registered[arch] = {cache.default_cache().key(c).function_name for c in configs}
        for config in configs:
            dims = precompile.kernel_head_dims(config)
            key = (arch, *dims, precompile.kernel_dtype(config))
            row = support.setdefault(key, {"kernels": 0, "paths": {}})
            row["kernels"] += 1
            for path in precompile.kernel_paths(config):
                masks = row["paths"].setdefault(path, [])
                if isinstance(config, FmhaFwdConfig) and config.mask.name not in masks:
                    masks.append(config.mask.name)
    entries = cache.list_entries()
    current = {e.name for e in entries if e.state == "current"}
    states = [e.state for e in entries]
    return {
        "sparsek": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dsl": dsl_version(),
        "toolchain": toolchain_identity(),
        "gpus": gpus,
        "arch": registry.detect_arch(),
        "paths": precompile.PATHS,
        # Every mask the kernels serve on every path; beyond the precompiled ones in
        # "support", they compile at first use (or with `sparsek compile --mask`).
        "served_masks": [m.name for m in registry.SERVED_MASKS],
        "support": [
            {"arch": a, "head_dim": d, "head_dim_v": v, "dtype": t, **row}
            for (a, d, v, t), row in support.items()
        ],
        "cache": {
            "dir": str(cache.cache_dir()),
            "entries": len(entries),
            "bytes": sum(e.disk_bytes for e in entries),
            "states": {s: states.count(s) for s in sorted(set(states))},
            "compiled": {
                arch: {"current": len(names & current), "registered": len(names)}
                for arch, names in registered.items()
            },
        },
    }


def cmd_info(as_json: bool = False) -> int:
    """Print versions, GPUs, the support matrix and a summary of the cache."""
    report = info_report()
    if as_json:
        import json

        print(json.dumps(report, indent=2))
        return 0
    print(f"sparsek {report['sparsek']}")
    print(f"python {report['python']}, torch {report['torch']}, DSL {report['dsl']}")
    identity = ", ".join(f"{k}={v or '-'}" for k, v in report["toolchain"].items())
    print(f"toolchain (part of every kernel's cache key): {identity}")
    for gpu in report["gpus"]:
        print(f"GPU {gpu['index']}: {gpu['name']} (sm_{gpu['capability']} -> {gpu['arch']})")
    if not report["gpus"]:
        print(f"GPU: none (CUDA not available); kernels can still be compiled for {DEFAULT_ARCH}")
    print(f"selected arch: {report['arch'] or '-'} (override: $SPARSEK_ARCH)")
    _print_support(report["support"], report["paths"], report["served_masks"])
    summary = report["cache"]
    states = ", ".join(f"{n} {s}" for s, n in summary["states"].items())
    counts = f"{summary['entries']} entries, {_size(summary['bytes'])}"
    print(f"\ncache: {summary['dir']} ({counts}{': ' + states if states else ''})")
    for arch, compiled in summary["compiled"].items():
        print(f"  {arch}: {compiled['current']} of {compiled['registered']} kernels compiled")
    print("  (`sparsek cache list` lists the entries, `sparsek cache prune` removes stale ones)")
    return 0


def _print_support(
    rows: list[dict[str, Any]], paths: dict[str, str], served_masks: list[str]
) -> None:
    """The support matrix: a line per (arch, head_dim[/head_dim_v], dtype), the masks of
    each path (precompiled), then every mask served (the others compile at first use)."""
    print("\nsupport matrix (masks per path; anything else falls back to torch SDPA):")
    width = 14
    head = "".join(f" {p:<{width}}" for p in paths)
    print(f"  {'arch':<8} {'head_dim':>8}  {'dtype':<13}{head} {'kernels':>7}")
    for row in rows:
        cells = "".join(f" {', '.join(row['paths'].get(p, [])) or '-':<{width}}" for p in paths)
        dims = str(row["head_dim"])
        if row["head_dim_v"] != row["head_dim"]:
            dims += f"/{row['head_dim_v']}"
        print(f"  {row['arch']:<8} {dims:>8}  {row['dtype']:<13}{cells}", end="")
        print(f" {row['kernels']:>7}")
    print("  paths:")
    for path, entry in paths.items():
        print(f"    {path:<8} {entry}")
    print("  float8_e4m3fn: FP8 q/k/v on dense and varlen; on kvcache and paged, an FP8 cache")
    print("    under float16/bfloat16 queries (docs/guide/fp8.md)")
    print("  masks: full = none; causal = bottom-right aligned (top-left in the SDPA drop-in)")
    later = [m for m in served_masks if m not in ("full", "causal")]
    print("  also served on every path, compiled at first use (or `sparsek compile --mask M`):")
    print(textwrap.fill(", ".join(later), 88, initial_indent="    ", subsequent_indent="    "))
    print("    (window_size, softcap and sinks of sparsek.attention, attention_varlen and")
    print("    attention_with_kvcache; see the masks guide)")


def cmd_cache_list() -> int:
    """Print every entry of the cache: arch, size on disk, age, state, kernel."""
    import time

    from sparsek import cache

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
    from sparsek import cache

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
    from sparsek import cache

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
