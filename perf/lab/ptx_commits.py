"""Compare the PTX of every registered kernel between this checkout and a base commit.

A change that must not change the kernels (a restructure, a rename) proves it here, on a
machine without a GPU: both versions compile each kernel registered for `--arch` (matched
by config name) for that target, and their PTX is compared after the kernel entry names
(which embed the Python module path of the kernel class) are normalized. Identical PTX
compiles to identical machine code.

    python perf/lab/ab_commits.py export <commit> .scratch/base   # the base, renamed
    python perf/lab/ptx_commits.py --base .scratch/base --out ptx.md [--jobs 2]

Compilation takes 2-10 s per kernel and version on a CPU core; `--jobs` compiles in
parallel processes, `--only` keeps the kernels whose name contains a substring.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ENTRY_NAME = re.compile(r"kernel_cutlass_kernel_\w+")
COMMENT = re.compile(r"^//.*$", re.MULTILINE)


def _names(package: str, arch: str) -> list[str]:
    import importlib

    registry = importlib.import_module(f"{package}.registry")
    return [config.name for config in registry.registered_kernels(arch)]


def _worker_setup(base: str, arch: str, dump: str) -> None:
    """Each compiling process: the DSL keeps each kernel's PTX (and writes it to a file in
    a directory of its own under `dump`: the file names, cut short, collide between
    kernels, and the PTX is read back from them), targets `arch`, and finds the base
    packages."""
    own = tempfile.mkdtemp(dir=dump)
    os.environ.update(CUTE_DSL_KEEP="ptx", CUTE_DSL_DUMP_DIR=own, CUTE_DSL_ARCH=arch)
    sys.path.insert(0, base)


def _digest(job: tuple[str, str, str]) -> tuple[str, str]:
    """(name, sha256 of the normalized PTX) of kernel `name` of `package` for `arch`."""
    package, arch, name = job
    import importlib

    registry = importlib.import_module(f"{package}.registry")
    build = importlib.import_module(package.replace("sparsek", "cutedsl_kernels") + ".build")
    config = next(c for c in registry.registered_kernels(arch) if c.name == name)
    ptx = build.compile_kernel(config).__ptx__
    text = ENTRY_NAME.sub("KERNEL", COMMENT.sub("", ptx))
    return name, hashlib.sha256(text.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="an `ab_commits.py export`")
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="keep kernels whose name contains this")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    base = str(args.base.resolve())
    sys.path.insert(0, base)
    new_names = [n for n in _names("sparsek", args.arch) if args.only in n]
    old_names = set(_names("sparsek_base", args.arch))
    jobs = [("sparsek", args.arch, n) for n in new_names]
    jobs += [("sparsek_base", args.arch, n) for n in new_names if n in old_names]
    with tempfile.TemporaryDirectory(prefix="sparsek-ptx-") as dump:
        setup = (base, args.arch, dump)
        with ProcessPoolExecutor(args.jobs, initializer=_worker_setup, initargs=setup) as pool:
            digests = list(pool.map(_digest, jobs))
    new = dict(digests[: len(new_names)])
    old = dict(digests[len(new_names) :])
    commit = (args.base / "COMMIT").read_text().strip()
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    same = [n for n in new_names if old.get(n) == new[n]]
    differ = [n for n in new_names if n in old and old[n] != new[n]]
    missing = [n for n in new_names if n not in old]
    lines = [
        f"PTX of every kernel registered for {args.arch}: this checkout ({head or '?'}) "
        f"against {commit}, entry names normalized.",
        "",
        f"- identical: {len(same)} of {len(new_names)}",
        f"- different: {len(differ)}" + "".join(f"\n  - {n}" for n in differ),
        f"- not registered in {commit}: {len(missing)}" + "".join(f"\n  - {n}" for n in missing),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
