"""Compile-at-first-use kernel cache: memory, then disk, then the CuTe DSL compiler.

A kernel is identified by a `CacheKey`: its config (`FmhaFwdConfig`, `CombineConfig`,
`KVStoreConfig`), the DSL version and a hash of every kernel source file (so editing a
kernel or upgrading the DSL yields a new entry; old entries stay until `clear()`).
Lookups go:

    memory dict[CacheKey] --miss--> disk entry (sha256-verified) --miss/corrupt--> compile

Disk layout, under `cache_dir()`:

    <arch>/<key digest>/
        kernel.so       exported kernel (host launcher + cubin), loaded with TVM-FFI: a
                        shared library, or the DSL's object file where no C compiler exists
        manifest.json   key fields, sha256 and size of kernel.so; written last (commit marker)
        .lock           flock'ed while one process compiles this entry

Multi-process safety: the compiling process holds an exclusive `fcntl.flock` on the entry's
`.lock`, re-checks the entry after acquiring it (someone else may have finished), writes
every file to a temporary name in the same directory and `os.replace`s it into place, so
readers see either nothing or a complete file. Readers verify the manifest's sha256; a
corrupt or truncated entry is reported once (a `CacheWarning` and a log line) and rebuilt.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cutedsl_kernels.config import KernelConfig

logger = logging.getLogger(__name__)

CACHE_ENV = "SPARSEK_CACHE_DIR"
OBJECT_NAME = "kernel.so"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
# Bump when the on-disk layout or manifest fields change: old entries then miss.
FORMAT_VERSION = 2  # 2: configs with ElementTypes / MaskSpec parts

KernelFn = Callable[..., None]


class CacheWarning(RuntimeWarning):
    """A cache entry was found corrupt or incomplete and is being rebuilt."""


class CacheStatus(str, enum.Enum):
    """How `compile_into_cache` / `get_kernel` obtained a kernel."""

    MEMORY = "memory"  # already loaded in this process
    DISK = "disk"  # valid entry on disk
    COMPILED = "compiled"  # no entry: compiled and stored
    REBUILT = "rebuilt"  # corrupt or incomplete entry: compiled again


@dataclass(frozen=True)
class Toolchain:
    """What the cache needs from the kernel layer; injectable so tests need no DSL."""

    compile: Callable[[KernelConfig], Any]
    export: Callable[[Any, str, str], None]
    load: Callable[[str, str], KernelFn]
    dsl_version: Callable[[], str]
    source_files: Callable[[], Sequence[Path]]


def dsl_toolchain() -> Toolchain:
    """The real toolchain: `cutedsl_kernels.build` (imports the DSL only when compiling)."""
    from cutedsl_kernels import build

    return Toolchain(
        compile=build.compile_kernel,
        export=build.export_kernel,
        load=build.load_kernel,
        dsl_version=build.dsl_version,
        source_files=build.kernel_source_files,
    )


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes a compiled kernel's bytes."""

    config: KernelConfig
    dsl_version: str
    source_hash: str

    def fields(self) -> dict[str, Any]:
        """JSON-ready key fields (also stored in the manifest)."""
        return {
            "format": FORMAT_VERSION,
            "kernel": self.config.name,  # kinds of config may share field values
            "config": asdict(self.config),
            "dsl_version": self.dsl_version,
            "source_hash": self.source_hash,
        }

    @property
    def digest(self) -> str:
        """Directory name of this key's entry: a short hash of `fields()`."""
        blob = json.dumps(self.fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    @property
    def function_name(self) -> str:
        """Symbol name of the exported kernel (a C identifier)."""
        return f"sparsek_{self.config.name}"


@dataclass(frozen=True)
class CacheEntry:
    """One on-disk entry as `list_entries` reports it."""

    path: Path
    arch: str
    name: str
    size: int
    valid: bool
    problem: str | None


def cache_dir() -> Path:
    """Root of the on-disk cache.

    `$SPARSEK_CACHE_DIR` if set, else `$XDG_CACHE_HOME/sparsek`, else `~/.cache/sparsek`.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sparsek"


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
        self._identity: tuple[str, str] | None = None
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
        """The cache key of `config` (DSL version and source hash computed once)."""
        if self._identity is None:
            version = self.toolchain.dsl_version()
            self._identity = (version, source_hash(self.toolchain.source_files(), version))
        return CacheKey(config, *self._identity)

    def entry_dir(self, key: CacheKey) -> Path:
        """Directory of `key`'s entry (it may not exist)."""
        return self.root / key.config.arch / key.digest

    def get_kernel(self, config: KernelConfig) -> KernelFn:
        """The loaded kernel for `config`, compiling it on first use.

        Raises:
            ValueError: the kernel layer rejects `config`.
        """
        key = self.key(config)
        fn = self._kernels.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._kernels.get(key)
            if fn is None:
                path, _ = self._ensure_on_disk(key)
                fn = self.toolchain.load(str(path), key.function_name)
                self._kernels[key] = fn
        return fn

    def compile_into_cache(self, config: KernelConfig) -> CacheStatus:
        """Make sure `config` has a valid disk entry, without loading it (no GPU needed)."""
        key = self.key(config)
        if key in self._kernels:
            return CacheStatus.MEMORY
        with self._lock:
            _, status = self._ensure_on_disk(key)
        return status

    def list_entries(self) -> list[CacheEntry]:
        """Every entry directory under `root`, verified (sha256 of its object)."""
        entries = []
        for entry in sorted(self.root.glob("*/*")):
            if not entry.is_dir():
                continue
            manifest = _read_manifest(entry)
            problem = _verify(entry, manifest, expected=None)
            name = str(manifest.get("function_name", "?")) if manifest else "?"
            size = int(manifest.get("size", 0)) if manifest else 0
            entries.append(
                CacheEntry(entry, entry.parent.name, name, size, problem is None, problem)
            )
        return entries

    def clear(self) -> int:
        """Delete every disk entry and forget loaded kernels; returns the entries removed."""
        removed = 0
        with self._lock:
            self._kernels.clear()
            root = self.root
            if root.is_dir():
                for arch_dir in root.iterdir():
                    if arch_dir.is_dir():
                        removed += sum(1 for e in arch_dir.iterdir() if e.is_dir())
                        shutil.rmtree(arch_dir, ignore_errors=True)
        return removed

    def _ensure_on_disk(self, key: CacheKey) -> tuple[Path, CacheStatus]:
        entry = self.entry_dir(key)
        if _verify(entry, _read_manifest(entry), key) is None:
            return entry / OBJECT_NAME, CacheStatus.DISK
        entry.mkdir(parents=True, exist_ok=True)
        with _file_lock(entry / LOCK_NAME):
            # Another process may have built the entry while we waited for the lock.
            problem = _verify(entry, _read_manifest(entry), key)
            if problem is None:
                return entry / OBJECT_NAME, CacheStatus.DISK
            status = CacheStatus.COMPILED
            if problem != _MISSING:
                _warn_once(entry, problem)
                status = CacheStatus.REBUILT
                for name in (MANIFEST_NAME, OBJECT_NAME):
                    (entry / name).unlink(missing_ok=True)
            self._build(key, entry)
        return entry / OBJECT_NAME, status

    def _build(self, key: CacheKey, entry: Path) -> None:
        start = time.perf_counter()
        compiled = self.toolchain.compile(key.config)
        fd, tmp = tempfile.mkstemp(prefix=".kernel-", suffix=".so", dir=entry)
        os.close(fd)
        try:
            self.toolchain.export(compiled, tmp, key.function_name)
            sha, size = _sha256_file(Path(tmp))
            os.replace(tmp, entry / OBJECT_NAME)
        finally:
            Path(tmp).unlink(missing_ok=True)
        manifest = {
            **key.fields(),
            "name": key.config.name,
            "function_name": key.function_name,
            "object": OBJECT_NAME,
            "sha256": sha,
            "size": size,
            "compile_seconds": round(time.perf_counter() - start, 3),
            "created_unix": int(time.time()),
        }
        _atomic_write(entry / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))
        logger.info("sparsek: compiled %s into %s", key.config.name, entry)


_MISSING = "missing"
_warned: set[str] = set()


def _read_manifest(entry: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((entry / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _verify(entry: Path, manifest: dict[str, Any] | None, expected: CacheKey | None) -> str | None:
    """None when the entry is complete and intact, else what is wrong with it."""
    obj = entry / OBJECT_NAME
    if manifest is None:
        if not (entry / MANIFEST_NAME).exists() and not obj.exists():
            return _MISSING
        return "manifest missing or unreadable"
    if (
        expected is not None
        and {k: manifest.get(k) for k in expected.fields()} != expected.fields()
    ):
        return "manifest key does not match the entry's key"
    if not obj.is_file():
        return f"{OBJECT_NAME} missing"
    sha, size = _sha256_file(obj)
    if size != manifest.get("size"):
        return f"{OBJECT_NAME} is {size} bytes, manifest says {manifest.get('size')} (truncated?)"
    if sha != manifest.get("sha256"):
        return f"{OBJECT_NAME} sha256 does not match the manifest"
    return None


def _warn_once(entry: Path, problem: str) -> None:
    if str(entry) in _warned:
        return
    _warned.add(str(entry))
    message = f"sparsek: corrupt kernel cache entry {entry} ({problem}); rebuilding it"
    logger.warning(message)
    warnings.warn(message, CacheWarning, stacklevel=4)


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


_default = KernelCache()


def default_cache() -> KernelCache:
    """The process-wide cache used by the torch op and the CLI."""
    return _default


def get_kernel(config: KernelConfig) -> KernelFn:
    """Loaded kernel for `config` from the default cache (compiled on first use)."""
    return _default.get_kernel(config)


def compile_into_cache(config: KernelConfig) -> CacheStatus:
    """Compile `config` into the default disk cache if needed (no GPU needed)."""
    return _default.compile_into_cache(config)


def list_entries() -> list[CacheEntry]:
    """Entries of the default cache."""
    return _default.list_entries()


def clear() -> int:
    """Remove every entry of the default cache; returns how many were removed."""
    return _default.clear()
