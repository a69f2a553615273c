"""Load every kernel of sparsek's disk cache as a warm process's first call does, and time it.

The prod image runs this at build time, in its compiler-free final stage (no GPU needed:
loading a kernel opens its shared library, launching is what needs the GPU):

    python /opt/sparsek/check_cache.py [--arch sm_90a] [--object-entry]

It checks that the cache holds a current entry for every registered kernel of the arch,
that each entry is a shared library (linked where the cache was compiled, so it loads
with TVM-FFI alone) readable by every user, and that loading all of them leaves the CuTe
DSL (`cutlass`) unimported. It prints the time to import sparsek, to load the first kernel
(what a warm first call adds to the import) and to load every kernel.

`--object-entry` also measures the other kind of entry, a relocatable object (what a
compile without a C compiler writes, which loads through the DSL): it compiles the first
kernel into a temporary cache and loads it in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from stat import S_IROTH

START = time.perf_counter()
import sparsek  # noqa: E402, F401  (timed: the import is part of a first call)

IMPORTED = time.perf_counter()

from sparsek import cache, registry  # noqa: E402
from sparsek.cache_store import OBJECT_NAME  # noqa: E402

ELF_SHARED, ELF_RELOCATABLE = 3, 1


def elf_type(path: Path) -> int:
    """ELF e_type of `path`: 3 a shared library, 1 a relocatable object."""
    header = path.read_bytes()[:18]
    return int.from_bytes(header[16:18], "little") if header[:4] == b"\x7fELF" else -1


def load_first_in_fresh_process(cache_dir: str, arch: str) -> str:
    """Load the first registered kernel of `arch` from `cache_dir` in a new interpreter."""
    probe = (
        "import sys, time; t0 = time.perf_counter(); import sparsek; t1 = time.perf_counter(); "
        "from sparsek import cache, registry; "
        f"cache.get_kernel(registry.registered_kernels({arch!r})[0]); t2 = time.perf_counter(); "
        "print(f'import sparsek {t1 - t0:.2f} s, first kernel load {(t2 - t1) * 1e3:.0f} ms, "
        "DSL imported: ' + str('cutlass' in sys.modules))"
    )
    env = {**os.environ, "SPARSEK_CACHE_DIR": cache_dir}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument(
        "--object-entry",
        action="store_true",
        help="also time a relocatable-object entry (compiled into a temporary cache)",
    )
    args = parser.parse_args()
    configs = registry.registered_kernels(args.arch)
    entries = [e for e in cache.list_entries() if e.arch == args.arch]
    current = [e for e in entries if e.valid and not e.stale]
    kinds = [elf_type(e.path / OBJECT_NAME) for e in current]
    print(
        f"cache {cache.cache_dir()}: {len(current)} current entries for {args.arch} "
        f"({len(configs)} registered kernels); shared libraries: "
        f"{kinds.count(ELF_SHARED)}, relocatable objects: {kinds.count(ELF_RELOCATABLE)}"
    )
    problems = []
    if len(current) < len(configs):
        problems.append(f"{len(configs) - len(current)} registered kernels have no current entry")
    if kinds.count(ELF_SHARED) != len(kinds):
        problems.append("some entries are not shared libraries (compiled without a C compiler?)")
    private = [p for e in current for p in e.path.iterdir() if not p.stat().st_mode & S_IROTH]
    if private:
        problems.append(f"{len(private)} cache files only their owner can read, e.g. {private[0]}")

    before = time.perf_counter()
    cache.get_kernel(configs[0])
    first = time.perf_counter()
    for config in configs[1:]:
        cache.get_kernel(config)
    done = time.perf_counter()
    dsl = "cutlass" in sys.modules
    print(
        f"import sparsek {IMPORTED - START:.2f} s; first kernel load {(first - before) * 1e3:.0f} "
        f"ms; all {len(configs)} kernels {done - before:.2f} s; DSL imported: {dsl}"
    )
    if dsl:
        problems.append("loading the cache imported the CuTe DSL")

    if args.object_entry:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "SPARSEK_CACHE_DIR": tmp}
            compile_one = (  # as without a C compiler, wherever this runs
                "from sparsek import cache, registry; "
                "from cutedsl_kernels import build; build.shutil.which = lambda name: None; "
                f"cache.compile_into_cache(registry.registered_kernels({args.arch!r})[0])"
            )
            subprocess.run([sys.executable, "-c", compile_one], env=env, check=True)
            obj = next(Path(tmp).rglob(OBJECT_NAME))
            kind = {ELF_SHARED: "shared library", ELF_RELOCATABLE: "relocatable object"}
            print(f"object entry ({kind.get(elf_type(obj), 'unknown')}):")
            print("  " + load_first_in_fresh_process(tmp, args.arch))
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
