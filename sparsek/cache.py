"""Compile-at-first-use kernel cache: memory, then disk, then the CuTe DSL compiler.

A kernel is identified by a `CacheKey`: its config (`FmhaFwdConfig`, `CombineConfig`,
`KVStoreConfig`), the DSL version, the rest of the toolchain's identity (TVM-FFI version,
the DSL's CUDA flavour and compiler, CUTE_DSL_* codegen settings: `build.toolchain_identity`)
and a hash of every kernel source file, so changing any of them yields a new entry. Entries
that this install no longer produces are "stale": `prune()` (`python -m sparsek cache prune`)
removes them. Lookups go:

    memory dict[CacheKey] --miss--> disk entry (sha256-verified) --miss/corrupt--> compile

The disk layout, locks and upkeep are `sparsek.cache_store`'s. Multi-process safety: the
compiling process holds the entry's exclusive lock, re-checks the entry after acquiring it
(someone else may have finished), writes every file to a temporary name in the entry and
renames it into place (readers see nothing or a complete file), writes the manifest last,
and loads the kernel before letting go. A valid entry is checked and loaded under the
shared lock, so `prune`/`clear` in another process never delete a kernel between its check
and its load. Readers verify the manifest's sha256: a corrupt
entry is reported once (a `CacheWarning` and a log line) and rebuilt; an object without a
manifest (a build killed before its end) and orphaned temporary files are removed and
built again silently. A build that raises (a rejected config, Ctrl-C) removes its entry
before it lets go of the lock.

A cache directory that cannot be written (read-only, full) is reported once per process
(`CacheWarning`); kernels are then compiled into a private temporary directory, loaded and
used as usual, but not kept. `compile_into_cache(..., require_disk=True)` (what
`sparsek compile` calls: filling the cache is its purpose) raises `CacheUnwritableError`
instead.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs

from cutedsl_kernels.config import KernelConfig
from sparsek import cache_store
from sparsek.cache_store import (
    LOCK_NAME,
    MANIFEST_NAME,
    OBJECT_NAME,
    CacheEntry,
    PruneResult,
)

__all__ = [
    "CACHE_ENV",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "OBJECT_NAME",
    "CacheEntry",
    "CacheKey",
    "CacheStatus",
    "CacheUnwritableError",
    "CacheWarning",
    "KernelCache",
    "PruneResult",
    "Toolchain",
    "cache_dir",
    "clear",
    "compile_into_cache",
    "default_cache",
    "dsl_toolchain",
    "get_kernel",
    "list_entries",
    "prune",
    "source_hash",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "SPARSEK_CACHE_DIR"
# Bump when the on-disk layout or manifest fields change: old entries then miss.
FORMAT_VERSION = 3  # 3: toolchain identity in the key, manifest key fields under "key"

KernelFn = Callable[..., None]


class CacheWarning(RuntimeWarning):
    """The disk cache is not used as intended: a corrupt entry is being rebuilt, or the
    cache directory cannot be written and kernels are compiled in memory."""


class CacheUnwritableError(OSError):
    """The cache directory cannot hold a kernel (read-only, full, not a directory) and the
    caller asked for the disk entry itself (`compile_into_cache(..., require_disk=True)`)."""


class CacheStatus(str, enum.Enum):
    """How `compile_into_cache` / `get_kernel` obtained a kernel."""

    MEMORY = "memory"  # already loaded in this process
    DISK = "disk"  # valid entry on disk
    COMPILED = "compiled"  # no entry (or an unfinished one): compiled and stored
    REBUILT = "rebuilt"  # corrupt entry: compiled again
    UNCACHED = "uncached"  # the cache directory cannot be written: compiled, not stored


@dataclass(frozen=True)
class Toolchain:
    """What the cache needs from the kernel layer; injectable so tests need no DSL.

    `identity` returns the toolchain's parts besides the DSL version that change a compiled
    kernel (name -> value); None stands for none.
    """

    compile: Callable[[KernelConfig], Any]
    export: Callable[[Any, str, str], None]
    load: Callable[[str, str], KernelFn]
    dsl_version: Callable[[], str]
    source_files: Callable[[], Sequence[Path]]
    identity: Callable[[], Mapping[str, str]] | None = None


def dsl_toolchain() -> Toolchain:
    """The real toolchain: `cutedsl_kernels.build` (imports the DSL only when compiling)."""
    from cutedsl_kernels import build

    return Toolchain(
        compile=build.compile_kernel,
        export=build.export_kernel,
        load=build.load_kernel,
        dsl_version=build.dsl_version,
        source_files=build.kernel_source_files,
        identity=build.toolchain_identity,
    )


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes a compiled kernel's bytes.

    `toolchain` holds `Toolchain.identity()`'s items, sorted (a tuple keeps the key hashable).
    """

    config: KernelConfig
    dsl_version: str
    source_hash: str
    toolchain: tuple[tuple[str, str], ...] = ()

    def identity_fields(self) -> dict[str, Any]:
        """The key fields every entry of one install shares; an entry whose values differ
        is stale."""
        return _identity_fields(self.dsl_version, self.source_hash, self.toolchain)

    def fields(self) -> dict[str, Any]:
        """JSON-ready key fields (also stored in the manifest)."""
        return {
            **self.identity_fields(),
            "kernel": self.config.name,  # kinds of config may share field values
            "config": asdict(self.config),
        }

    @property
    def digest(self) -> str:
        """Directory name of this key's entry: a short hash of `fields()`."""
        return cache_store.key_digest(self.fields())

    @property
    def function_name(self) -> str:
        """Symbol name of the exported kernel (a C identifier)."""
        return f"sparsek_{self.config.name}"


# (DSL version, source hash, toolchain identity items): what every key of one install shares.
_Identity = tuple[str, str, tuple[tuple[str, str], ...]]


def _identity_fields(
    dsl_version: str, sources: str, toolchain: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "dsl_version": dsl_version,
        "toolchain": dict(toolchain),
        "source_hash": sources,
    }


def cache_dir() -> Path:
    """Root of the on-disk cache.

    `$SPARSEK_CACHE_DIR` if set, else the user's cache directory for "sparsek"
    (platformdirs): `$XDG_CACHE_HOME/sparsek`, else `~/.cache/sparsek` on Linux.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(platformdirs.user_cache_dir("sparsek", appauthor=False))


def source_hash(files: Sequence[Path], dsl_version: str) -> str:
    """sha256 over the kernel sources (relative paths and bytes) and the DSL version."""
    h = hashlib.sha256(f"dsl={dsl_version}\n".encode())
    paths = sorted(Path(f).resolve() for f in files)
    root = Path(os.path.commonpath(paths)) if paths else Path()
    if len(paths) == 1:
        root = paths[0].parent
    for path in paths:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


class _StoreFailed(Exception):
    """A kernel compiled, but the cache directory refused it (`cause`)."""

    def __init__(self, compiled: Any, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.compiled = compiled
        self.cause = cause


class KernelCache:
    """Memory + disk cache of compiled kernels; see the module docstring.

    Args:
        root: cache directory; `cache_dir()` (read at each use) when None.
        toolchain: compiler/exporter/loader; the DSL's (`dsl_toolchain()`) when None.
    """

    def __init__(self, root: Path | str | None = None, toolchain: Toolchain | None = None) -> None:
        self._root = Path(root) if root is not None else None
        self._toolchain = toolchain
        self._kernels: dict[CacheKey, KernelFn] = {}
        self._identity: _Identity | None = None
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        """Directory holding this cache's entries."""
        return self._root if self._root is not None else cache_dir()

    @property
    def toolchain(self) -> Toolchain:
        """The toolchain in use (created on first use)."""
        if self._toolchain is None:
            self._toolchain = dsl_toolchain()
        return self._toolchain

    def key(self, config: KernelConfig) -> CacheKey:
        """The cache key of `config` (the toolchain's identity computed once)."""
        return CacheKey(config, *self._toolchain_identity())

    def current_fields(self) -> dict[str, Any]:
        """The key fields this install writes into every entry (`CacheKey.identity_fields`)."""
        return _identity_fields(*self._toolchain_identity())

    def _toolchain_identity(self) -> _Identity:
        if self._identity is None:
            toolchain = self.toolchain
            version = toolchain.dsl_version()
            parts = toolchain.identity() if toolchain.identity is not None else {}
            self._identity = (
                version,
                source_hash(toolchain.source_files(), version),
                tuple(sorted((str(k), str(v)) for k, v in parts.items())),
            )
        return self._identity

    def entry_dir(self, key: CacheKey) -> Path:
        """Directory of `key`'s entry (it may not exist)."""
        return self.root / key.config.arch / key.digest

    def get_kernel(self, config: KernelConfig) -> KernelFn:
        """The loaded kernel for `config`, compiling it on first use (in memory, with one
        `CacheWarning`, where the cache directory cannot be written).

        Raises:
            ValueError: the kernel layer rejects `config`.
            RuntimeError: neither the cache directory nor a temporary directory can hold
                the compiled kernel.
        """
        key = self.key(config)
        fn = self._kernels.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._kernels.get(key)
            if fn is None:
                fn, _ = self._obtain(key, load=True)
                assert fn is not None
                self._kernels[key] = fn
        return fn

    def compile_into_cache(
        self, config: KernelConfig, *, require_disk: bool = False
    ) -> CacheStatus:
        """Make sure `config` has a valid disk entry, without loading it (no GPU needed).

        Returns `CacheStatus.UNCACHED` (after compiling) where the cache cannot be written,
        unless `require_disk`.

        Raises:
            CacheUnwritableError: `require_disk` and the cache cannot be written (raised
                before compiling where the entry's directory cannot be made).
        """
        key = self.key(config)
        if key in self._kernels and not require_disk:
            return CacheStatus.MEMORY
        with self._lock:
            _, status = self._obtain(key, load=False, in_memory=not require_disk)
        return status

    def list_entries(self) -> list[CacheEntry]:
        """Every entry sparsek wrote under `root`, verified, with its staleness."""
        return cache_store.list_entries(self.root, self.current_fields())

    def prune(self, *, everything: bool = False) -> PruneResult:
        """Remove stale, unfinished and corrupt entries (`everything`: every entry sparsek
        wrote), each under its lock; entries in use by another process are left alone."""
        return cache_store.prune(self.root, self.current_fields(), everything=everything)

    def clear(self) -> int:
        """Remove every entry sparsek wrote (nothing else under `root`) and forget loaded
        kernels; returns the entries removed."""
        with self._lock:
            self._kernels.clear()
            return self.prune(everything=True).removed

    def _obtain(
        self, key: CacheKey, load: bool, in_memory: bool = True
    ) -> tuple[KernelFn | None, CacheStatus]:
        """The kernel of `key` (loaded if `load`) and how it was obtained. A valid entry is
        checked and loaded under its shared lock, a missing or broken one built and loaded
        under its exclusive lock: nobody removes it in between. Where the cache cannot be
        written, the kernel is compiled in memory, or (not `in_memory`) that is raised."""
        entry = self.entry_dir(key)
        expected = key.fields()
        try:
            with cache_store.locked(entry, shared=True):
                if cache_store.verify(entry, expected) is None:
                    return self._load(key, entry, load), CacheStatus.DISK
            with cache_store.locked(entry):
                try:
                    status = self._build_unless_valid(key, entry, expected)
                except BaseException:  # a rejected config, Ctrl-C: leave no unfinished entry
                    if cache_store.verify(entry, expected) is not None:
                        _remove_unfinished(entry)
                    raise
                return self._load(key, entry, load), status
        except _StoreFailed as failed:
            if not in_memory:
                raise self._unwritable(failed.cause) from failed.cause
            return self._in_memory(key, failed.compiled, load, failed.cause)
        except cache_store.CacheDirError as exc:  # no entry directory or lock file
            if not in_memory:
                raise self._unwritable(exc) from exc
            return self._in_memory(key, None, load, exc)

    def _unwritable(self, cause: BaseException) -> CacheUnwritableError:
        return CacheUnwritableError(
            f"the kernel cache {self.root} cannot be written ({cause}); make it writable, "
            f"or set ${CACHE_ENV} to a writable directory"
        )

    def _load(self, key: CacheKey, entry: Path, load: bool) -> KernelFn | None:
        return self.toolchain.load(str(entry / OBJECT_NAME), key.function_name) if load else None

    def _build_unless_valid(
        self, key: CacheKey, entry: Path, expected: Mapping[str, Any]
    ) -> CacheStatus:
        """Under the entry's exclusive lock: build it unless another process just did."""
        problem = cache_store.verify(entry, expected)
        if problem is None:
            return CacheStatus.DISK
        status = CacheStatus.COMPILED
        if problem not in (cache_store.MISSING, cache_store.UNFINISHED):
            _warn_once(str(entry), f"corrupt kernel cache entry {entry} ({problem}); rebuilding it")
            status = CacheStatus.REBUILT
        # Whatever is left is a killed or damaged build's: nobody else holds the lock.
        for name in (MANIFEST_NAME, OBJECT_NAME):
            (entry / name).unlink(missing_ok=True)
        cache_store.remove_temp_files(entry)
        self._build(key, entry)
        return status

    def _build(self, key: CacheKey, entry: Path) -> None:
        start = time.perf_counter()
        compiled = self.toolchain.compile(key.config)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".kernel-", suffix=".so", dir=entry)
            os.close(fd)
            try:
                self.toolchain.export(compiled, tmp, key.function_name)
                sha, size = cache_store.sha256_file(Path(tmp))
                os.replace(tmp, entry / OBJECT_NAME)
            finally:
                Path(tmp).unlink(missing_ok=True)
            cache_store.write_manifest(
                entry,
                key.fields(),
                function_name=key.function_name,
                object=OBJECT_NAME,
                sha256=sha,
                size=size,
                compile_seconds=round(time.perf_counter() - start, 3),
                created_unix=int(time.time()),
            )
        except Exception as exc:  # a full disk fails in the exporter's own words too
            (entry / OBJECT_NAME).unlink(missing_ok=True)
            cache_store.remove_temp_files(entry)
            raise _StoreFailed(compiled, exc) from exc
        logger.info("sparsek: compiled %s into %s", key.config.name, entry)

    def _in_memory(
        self, key: CacheKey, compiled: Any, load: bool, cause: BaseException
    ) -> tuple[KernelFn | None, CacheStatus]:
        """Compile (unless done) and load `key` from a private temporary directory."""
        _warn_once(
            f"root:{self.root}",
            f"kernel cache {self.root} cannot be written ({cause}); compiling kernels in "
            f"memory, again in every process (set ${CACHE_ENV} to a writable directory)",
        )
        if compiled is None:
            compiled = self.toolchain.compile(key.config)
        if not load:
            return None, CacheStatus.UNCACHED
        try:
            private = tempfile.TemporaryDirectory(prefix="sparsek-kernel-")
        except OSError as exc:
            raise self._unstorable(key, cause, exc) from exc
        with private as tmp:
            path = os.path.join(tmp, OBJECT_NAME)
            try:
                self.toolchain.export(compiled, path, key.function_name)
            except OSError as exc:
                raise self._unstorable(key, cause, exc) from exc
            fn = self.toolchain.load(path, key.function_name)  # mapped: removing it is fine
        return fn, CacheStatus.UNCACHED

    def _unstorable(self, key: CacheKey, cause: BaseException, exc: OSError) -> RuntimeError:
        return RuntimeError(
            f"sparsek: cannot store kernel {key.config.name}: the cache {self.root} failed "
            f"({cause}) and so did a temporary directory ({exc}); free space, or set "
            f"${CACHE_ENV} or $TMPDIR to a writable directory"
        )


def _remove_unfinished(entry: Path) -> None:
    """Remove what a build that did not finish left in `entry` (object, manifest, temporary
    files), then its lock file and directory; the caller holds the exclusive lock. Best
    effort: a read-only directory keeps them (the next build removes them)."""
    with contextlib.suppress(OSError):
        for name in (MANIFEST_NAME, OBJECT_NAME):
            (entry / name).unlink(missing_ok=True)
        cache_store.remove_temp_files(entry)
        # A process waiting for this lock finds its file gone and makes a new one
        # (`cache_store.locked`), as after `prune`.
        (entry / LOCK_NAME).unlink(missing_ok=True)
        entry.rmdir()


_warned: set[str] = set()


def _warn_once(what: str, message: str) -> None:
    if what in _warned:
        return
    _warned.add(what)
    logger.warning("sparsek: %s", message)
    warnings.warn(f"sparsek: {message}", CacheWarning, stacklevel=5)


_default = KernelCache()


def default_cache() -> KernelCache:
    """The process-wide cache used by the torch op and the CLI."""
    return _default


def get_kernel(config: KernelConfig) -> KernelFn:
    """Loaded kernel for `config` from the default cache (compiled on first use)."""
    return _default.get_kernel(config)


def compile_into_cache(config: KernelConfig, *, require_disk: bool = False) -> CacheStatus:
    """Compile `config` into the default disk cache if needed (no GPU needed).

    Raises:
        CacheUnwritableError: `require_disk` and the cache cannot be written.
    """
    return _default.compile_into_cache(config, require_disk=require_disk)


def list_entries() -> list[CacheEntry]:
    """Entries of the default cache (only those sparsek wrote)."""
    return _default.list_entries()


def prune(*, everything: bool = False) -> PruneResult:
    """Remove the default cache's stale, unfinished and corrupt entries (`everything`:
    every entry sparsek wrote)."""
    return _default.prune(everything=everything)


def clear() -> int:
    """Remove every entry sparsek wrote in the default cache; returns how many."""
    return _default.clear()
