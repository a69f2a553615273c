"""Compile registered kernels into the disk cache ahead of use (no GPU needed).

`sparsek compile` runs this (every registered kernel of an architecture, or those a filter
selects: head dim, dtype, path; or the kernels of masks compiled at first use otherwise:
`--mask window+sinks`), and so does the CPU demo (the few kernels it shows); a
container build can fill the cache on a machine without a GPU.

- `--jobs N` compiles in N processes ("spawn": each imports the DSL afresh, never a fork
  of a process that may have loaded CUDA); every process writes into the same cache,
  whose per-entry locks make that safe.
- A progress bar (tqdm, on a terminal) instead of one line per kernel (`verbose` adds them).
- A cache directory that cannot be written stops the run at the first kernel with one
  message (the library falls back to compiling in memory there; filling the cache is this
  command's purpose, so here it is an error).
- Ctrl-C stops the run: the kernels being compiled finish (a few seconds), no other
  starts, and one line says how far it got; a second Ctrl-C ends the process at once.

Importing this module imports neither torch nor the DSL (the registry, and so torch, is
imported when kernels are selected; the DSL when one is compiled).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from types import FrameType
from typing import Any, cast

from cutedsl_kernels.config import CombineConfig, FmhaFwdConfig, KernelConfig, KVStoreConfig
from sparsek import cache

# The entry points a kernel serves, by where its keys live. Kernels of the paged path also
# serve xFormers' paged biases and vLLM's backend.
PATHS: dict[str, str] = {
    "dense": "attention, scaled_dot_product_attention",
    "varlen": "attention_varlen (packed sequences)",
    "kvcache": "attention_with_kvcache, contiguous cache",
    "paged": "attention_with_kvcache, paged cache (block_table)",
}
_PATH_OF_KV_LAYOUT = {"dense": "dense", "varlen": "varlen", "cache": "kvcache", "paged": "paged"}

# `precompile`'s exit codes: 130 is the shell's for a process ended by Ctrl-C (128 + SIGINT).
OK, FAILED, INTERRUPTED = 0, 1, 130


def kernel_paths(config: KernelConfig) -> tuple[str, ...]:
    """The `PATHS` a kernel serves: its KV layout's for attention kernels; the split-KV
    combine kernel serves both cache paths, the KV-store kernel (new tokens into a paged
    cache) the paged one."""
    if isinstance(config, CombineConfig):
        return ("kvcache", "paged")
    if isinstance(config, KVStoreConfig):
        return ("paged",)
    return (_PATH_OF_KV_LAYOUT[config.kv_layout],)


def kernel_head_dims(config: KernelConfig) -> tuple[int, int]:
    """(head_dim, head_dim_v) of an attention kernel; (head_dim, head_dim) of the combine
    and KV-store kernels."""
    if isinstance(config, FmhaFwdConfig):
        return config.head_dim, config.value_head_dim
    return config.head_dim, config.head_dim


def kernel_dtype(config: KernelConfig) -> str:
    """The element type of a kernel's Q/K (attention; an FP8 cache's type for the kernels
    that convert it) or of its data (combine, KV store; an FP8 cache's type for the KV
    stores that quantize into it)."""
    if isinstance(config, FmhaFwdConfig):
        return config.dtypes.cache or config.dtypes.qk
    if isinstance(config, KVStoreConfig):
        return config.cache_dtype or config.dtype
    return config.dtype


def select_kernels(
    arch: str,
    *,
    head_dims: Iterable[int] | None = None,
    dtypes: Iterable[str] | None = None,
    paths: Iterable[str] | None = None,
    masks: Iterable[str] | None = None,
) -> list[KernelConfig]:
    """The registered kernels of `arch` (`registry.registered_kernels`), or with `masks`
    (names of `registry.SERVED_MASKS`, e.g. "window+sinks") the kernels those masks launch
    (`registry.mask_kernels`), that match every other filter given (None: no filter);
    registry order."""
    from sparsek import registry  # imports torch

    dims = None if head_dims is None else set(head_dims)
    types = None if dtypes is None else set(dtypes)
    wanted = None if paths is None else set(paths)
    if masks is None:
        candidates = registry.registered_kernels(arch)
    else:
        candidates = list(
            dict.fromkeys(
                config
                for name in masks
                for config in registry.mask_kernels(arch, registry.MASK_BY_NAME[name])
            )
        )
    return [
        config
        for config in candidates
        if (dims is None or config.head_dim in dims)
        and (types is None or kernel_dtype(config) in types)
        and (wanted is None or not wanted.isdisjoint(kernel_paths(config)))
    ]


@dataclass(frozen=True)
class Outcome:
    """How one kernel went: a `cache.CacheStatus` value, "failed" (`error` says why) or
    "unwritable" (the cache directory refused it; `error` is the message)."""

    name: str
    status: str
    seconds: float
    error: str = ""


# `default_jobs`' cap: each process imports the DSL (up to ~1.5 GB resident while compiling).
MAX_DEFAULT_JOBS = 16


def default_jobs() -> int:
    """Processes `sparsek compile` uses unless told: one per CPU this process may run on,
    at most `MAX_DEFAULT_JOBS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_JOBS))


def precompile(
    arch: str,
    configs: Sequence[KernelConfig] | None = None,
    *,
    jobs: int = 1,
    verbose: bool = False,
) -> int:
    """Compile `configs` (every registered kernel of `arch` when None) into the disk cache.

    Ctrl-C (SIGINT, when called from the main thread) lets the kernels being compiled
    finish and starts no other; a second Ctrl-C ends the process at once.

    Args:
        arch: target, e.g. "sm_90a".
        configs: the kernels to compile (see `select_kernels`).
        jobs: processes compiling at once (1: this process).
        verbose: one line per kernel besides the progress bar.

    Returns:
        0 when every kernel is in the cache; 1 when one failed (after trying all) or the
        cache cannot be written (at once); 130 when interrupted (Ctrl-C).
    """
    if configs is None:
        configs = select_kernels(arch)
    if not configs:
        print(f"no kernels to compile for {arch}")
        return FAILED
    jobs = max(1, min(jobs, len(configs)))
    where = cache.cache_dir()
    workers = f" in {jobs} processes" if jobs > 1 else ""
    print(f"compiling {len(configs)} kernels for {arch} into {where}{workers}", flush=True)
    start = time.perf_counter()
    run = _Run(len(configs), verbose)
    try:
        with _CtrlC() as ctrl_c:
            if jobs == 1:
                _run_here(configs, run, ctrl_c)
            else:
                _run_in_processes(configs, jobs, run, ctrl_c)
        run.interrupted = ctrl_c.pressed
    finally:
        run.close()
    return run.report(time.perf_counter() - start)


class _CtrlC:
    """SIGINT while kernels compile: the first asks to stop after those in flight, the
    second ends the process (`os._exit`).

    Never an exception in the middle of a compile: the DSL calls back into Python from
    C++ (nanobind), and a KeyboardInterrupt raised in such a callback aborts the process
    ("terminate called after throwing an instance of 'nanobind::python_error'").
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # os.write: a print here could land inside another write to the same stream.
        if self.pressed:
            os.write(2, _STOP_NOW)
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(INTERRUPTED)
        self.pressed = True
        os.write(2, _STOPPING)


_STOPPING = (
    b"\nCtrl-C: finishing the kernels being compiled, starting no other "
    b"(Ctrl-C again to stop at once)\n"
)
_STOP_NOW = (
    b"\ninterrupted again: stopping now (the kernels being compiled are left unfinished; "
    b"the next compile removes them)\n"
)


class _Run:
    """Outcomes so far, the progress bar, and the report at the end."""

    def __init__(self, total: int, verbose: bool) -> None:
        from tqdm import tqdm

        self.total = total
        self.outcomes: list[Outcome] = []
        self.verbose = verbose
        self.interrupted = False
        # disable=None: no bar where stderr is no terminal (logs, CI, pipes).
        self.bar = tqdm(total=total, unit="kernel", disable=None, dynamic_ncols=True)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.status == "unwritable":
            return
        self.bar.update()
        if self.verbose or outcome.status == "failed":
            status = f"FAILED ({outcome.error})" if outcome.status == "failed" else outcome.status
            self.bar.write(f"  {outcome.name:<56} {outcome.seconds:7.2f} s  {status}")

    @property
    def unwritable(self) -> bool:
        """The cache directory cannot be written: nothing more should be started."""
        return any(o.status == "unwritable" for o in self.outcomes)

    def close(self) -> None:
        self.bar.close()

    def report(self, seconds: float) -> int:
        unwritable = [o for o in self.outcomes if o.status == "unwritable"]
        if unwritable:
            print(f"error: {unwritable[0].error}", file=sys.stderr)
            return FAILED
        ready = sum(o.status in ("compiled", "rebuilt", "disk", "memory") for o in self.outcomes)
        if self.interrupted:
            print(
                f"interrupted: {ready}/{self.total} kernels ready after {seconds:.0f} s; "
                "run the same command again to compile the rest",
                file=sys.stderr,
            )
            return INTERRUPTED
        counts = {
            word: sum(o.status in statuses for o in self.outcomes)
            for word, statuses in (
                ("compiled", ("compiled", "rebuilt")),
                ("already cached", ("disk", "memory")),
                ("failed", ("failed",)),
            )
        }
        detail = ", ".join(f"{n} {word}" for word, n in counts.items() if n)
        print(f"{ready}/{self.total} kernels ready in {seconds:.1f} s ({detail})")
        return FAILED if counts["failed"] else OK


def _run_here(configs: Sequence[KernelConfig], run: _Run, ctrl_c: _CtrlC) -> None:
    for config in configs:
        if ctrl_c.pressed or run.unwritable:
            return
        run.add(compile_one(config))


def _run_in_processes(
    configs: Sequence[KernelConfig], jobs: int, run: _Run, ctrl_c: _CtrlC
) -> None:
    """At most `jobs` kernels submitted at a time (the pool would queue more, and a
    queued kernel can no longer be called off)."""
    context = multiprocessing.get_context("spawn")
    todo = iter(configs)
    # Workers warn as this process does, for the standard warning classes (unpickling
    # another class would import its module, torch's among them, before the filters apply).
    filters = [f for f in warnings.filters if f[2].__module__ == "builtins"]
    broken = False
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(filters,)
    ) as pool:
        running = {pool.submit(compile_one, c): c for c in itertools.islice(todo, jobs)}
        while running:
            # A timeout, so that a Ctrl-C is seen while every compile is still running.
            done, _ = concurrent.futures.wait(
                running, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                config = running.pop(future)
                try:
                    run.add(future.result())
                except BrokenProcessPool as exc:  # a worker died (killed, out of memory)
                    broken = True
                    run.add(Outcome(config.name, "failed", 0.0, f"its process died ({exc})"))
            if ctrl_c.pressed or run.unwritable or broken:
                continue  # let the compiles in flight finish
            running |= {pool.submit(compile_one, c): c for c in itertools.islice(todo, len(done))}


def compile_one(config: KernelConfig) -> Outcome:
    """Compile one kernel into the default cache (which must be writable); a failure is an
    outcome, not an exception."""
    start = time.perf_counter()
    try:
        status = cache.compile_into_cache(config, require_disk=True).value
    except cache.CacheUnwritableError as exc:
        return Outcome(config.name, "unwritable", time.perf_counter() - start, str(exc))
    except Exception as exc:  # reported with the others; the run goes on
        error = f"{type(exc).__name__}: {_first_line(exc)}"
        return Outcome(config.name, "failed", time.perf_counter() - start, error)
    return Outcome(config.name, status, time.perf_counter() - start)


def _init_worker(filters: list[Any]) -> None:
    # Workers leave Ctrl-C to the parent (`_CtrlC`): a terminal sends it to them too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A spawned process starts with the default filters. (`filters` is a list at run time;
    # typeshed declares a Sequence.)
    cast("list[Any]", warnings.filters)[:] = filters


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""
