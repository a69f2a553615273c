"""The kernel cache on disk: entry layout, manifests, locks, listing and removal.

Layout under the cache root (`sparsek.cache.cache_dir()`):

    <arch>/<key digest>/
        kernel.so       exported kernel (host launcher + cubin): a shared library loaded with
                        TVM-FFI, or the DSL's object file where no C compiler exists
        manifest.json   the key's fields ("key"), then the build's: function name, sha256
                        and size of kernel.so, ...; written last (the commit marker)
        .lock           flock'ed: exclusively while a process builds or removes the entry,
                        shared while one loads its kernel
        .kernel-*, .manifest.json-*   temporary files of a build in progress

An entry is sparsek's when its directory is named by a key digest and its manifest's key
fields hash to that name or, lacking a readable manifest, when every file in it has one of
the names above (an unfinished or damaged build). Nothing else under the root is listed or
removed, a symlink is never followed, and only files with those names are deleted: the root
may be a folder shared with other programs.

Temporary files are written only under the entry's exclusive lock, so whoever holds that
lock knows any temporary file present is an orphan of a killed build, and removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OBJECT_NAME = "kernel.so"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
TEMP_PREFIXES = (".kernel-", f".{MANIFEST_NAME}-")
DIGEST_LENGTH = 24

# What `verify` answers for an entry that is not (yet) there: nothing, or a build that was
# killed after storing its object and before its manifest. Neither is corruption.
MISSING = "missing"
UNFINISHED = f"unfinished build ({OBJECT_NAME} without {MANIFEST_NAME})"

_DIGEST = re.compile(rf"^[0-9a-f]{{{DIGEST_LENGTH}}}$")
# A lock file replaced while a process waited for it (the entry was removed and made
# again) is retried, after a pause that doubles from 1 ms up to 50 ms so that a process
# removing entries in a loop cannot win every round; still replaced after this long
# means something else is wrong.
_LOCK_RETRY_S = 10.0


def _retries() -> Iterator[None]:
    """One iteration per attempt for `_LOCK_RETRY_S`, pausing between them."""
    deadline = time.monotonic() + _LOCK_RETRY_S
    pause = 0.001
    while True:
        yield
        if time.monotonic() >= deadline:
            return
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


class CacheDirError(OSError):
    """The cache directory, or an entry's directory or lock file in it, cannot be made
    (read-only, full, not a directory)."""


@dataclass(frozen=True)
class CacheEntry:
    """One on-disk entry as `list_entries` reports it.

    Attributes:
        path: the entry's directory.
        arch: target architecture (the parent directory's name).
        name: exported function name ("?" without a readable manifest).
        size: bytes of the kernel object, as its manifest records them.
        valid: complete and intact (manifest present, object matches its sha256).
        problem: what is wrong when not valid (`MISSING`, `UNFINISHED` or the corruption).
        stale: made by another format, toolchain or kernel source than this install's, so
            never used by it (`prune` removes it).
        disk_bytes: every file of the entry together (object, manifest, leftovers).
        created_unix: when the entry was written (manifest, else the newest file's mtime).
    """

    path: Path
    arch: str
    name: str
    size: int
    valid: bool
    problem: str | None
    stale: bool = False
    disk_bytes: int = 0
    created_unix: float = 0.0

    @property
    def state(self) -> str:
        """One word for `cache list`: current, stale, unfinished or corrupt."""
        if self.valid:
            return "stale" if self.stale else "current"
        return "unfinished" if self.problem in (MISSING, UNFINISHED) else "corrupt"

    def age_seconds(self, now: float | None = None) -> float:
        """Seconds since the entry was written."""
        return max(0.0, (time.time() if now is None else now) - self.created_unix)


@dataclass(frozen=True)
class PruneResult:
    """What `prune` did: entries removed, bytes freed, entries left alone because a process
    was building or loading them at that moment."""

    removed: int
    freed_bytes: int
    busy: int


def key_digest(fields: Mapping[str, Any]) -> str:
    """Directory name of the entry whose key fields are `fields`."""
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:DIGEST_LENGTH]


def read_manifest(entry: Path) -> dict[str, Any] | None:
    """The entry's manifest, or None when absent or unreadable."""
    try:
        data = json.loads((entry / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(entry: Path, key: Mapping[str, Any], **build: Any) -> None:
    """Commit the entry: its manifest (the key's fields under "key", then `build`, which
    holds `sha256` and `size` of the object), written atomically and last."""
    text = json.dumps({"key": dict(key), **build}, indent=2, sort_keys=True)
    atomic_write(entry / MANIFEST_NAME, text)


def verify(entry: Path, expected: Mapping[str, Any] | None) -> str | None:
    """None when the entry is complete and intact (and, given `expected` key fields, made
    for that key), else what is wrong with it (`MISSING` and `UNFINISHED` included)."""
    manifest = read_manifest(entry)
    obj = entry / OBJECT_NAME
    if manifest is None:
        if (entry / MANIFEST_NAME).exists():
            return "manifest unreadable"
        return UNFINISHED if obj.exists() else MISSING
    if expected is not None and manifest.get("key") != dict(expected):
        return "manifest key does not match the entry's key"
    try:
        sha, size = sha256_file(obj)
    except FileNotFoundError:
        return f"{OBJECT_NAME} missing"
    except OSError as exc:
        return f"{OBJECT_NAME} unreadable ({exc.strerror})"
    if size != manifest.get("size"):
        return f"{OBJECT_NAME} is {size} bytes, manifest says {manifest.get('size')} (truncated?)"
    if sha != manifest.get("sha256"):
        return f"{OBJECT_NAME} sha256 does not match the manifest"
    return None


def sha256_file(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of a file."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def is_temp_file(name: str) -> bool:
    """A temporary file of a build (orphaned when no process holds the entry's lock)."""
    return name.startswith(TEMP_PREFIXES)


# Why fcntl.flock and not the `filelock` package (which the cache would otherwise use):
# loaders take a shared lock beside the builders' and prune's exclusive one, also on a
# lock file opened read-only (a cache on a read-only mount); prune deletes the lock file
# of an entry it removes while others wait on it (they notice and open the new one); a
# killed holder's lock goes with its process. filelock's FileLock (flock) is exclusive
# only; its ReadWriteLock (>= 3.21) keeps the lock in an SQLite database, which refuses a
# read-only file and must not be deleted under its holders; its SoftReadWriteLock (marker
# files for NFS) keeps a killed holder's lock until it times out (90 s by default).
@contextlib.contextmanager
def locked(entry: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold the entry's lock while the block runs; yields whether it is held.

    Exclusive (the default) creates the entry directory and lock file, and raises
    `CacheDirError` where the cache cannot be written. Shared opens an existing lock file
    only: without one (an entry being removed, a read-only copy of a cache) it yields False
    at once. With `wait=False` a lock taken by another process yields False instead of
    waiting.
    A lock file that was removed while this process waited for it is opened again, so a
    lock is never held on a file that no longer names the entry.
    """
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if not wait:
        mode |= fcntl.LOCK_NB
    path = entry / LOCK_NAME
    for _ in _retries():
        fd = _open_lock(entry, shared)
        if fd is None:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                yield False
                return
            if _same_file(fd, path):
                yield True
                return
        finally:
            os.close(fd)  # closing releases the lock
    raise OSError(errno.EAGAIN, f"the lock file {path} keeps being replaced")


def _open_lock(entry: Path, shared: bool) -> int | None:
    path = entry / LOCK_NAME
    if shared:
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
    for _ in _retries():
        try:
            entry.mkdir(parents=True, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except (FileNotFoundError, FileExistsError):
            # The entry was removed between mkdir and open; or another process made it
            # and a third removed it again before mkdir could see a directory there
            # (`Path.mkdir(exist_ok=True)` raises FileExistsError then).
            continue
        except OSError as exc:
            raise CacheDirError(exc.errno, f"{exc.strerror}: {exc.filename}") from exc
    raise CacheDirError(errno.EAGAIN, f"the cache entry {entry} keeps being removed")


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def remove_temp_files(entry: Path) -> None:
    """Delete the entry's temporary files; only under its exclusive lock."""
    for child in _files(entry):
        if is_temp_file(child.name):
            child.unlink(missing_ok=True)


def iter_entries(root: Path) -> Iterator[Path]:
    """Every entry directory sparsek wrote under `root` (`<arch>/<digest>`), in order,
    without following symlinks."""
    for arch_dir in _subdirs(root):
        for entry in _subdirs(arch_dir):
            if _DIGEST.match(entry.name) and _is_sparsek_entry(entry):
                yield entry


def describe(entry: Path, current: Mapping[str, Any]) -> CacheEntry:
    """`entry` as `list_entries` reports it; `current` holds this install's values of the
    key fields that make an entry stale (format, toolchain, source hash)."""
    manifest = read_manifest(entry)
    problem = verify(entry, None)
    stats = list(_stats(entry))
    created = max((s.st_mtime for s in stats), default=0.0)
    if manifest is None:
        return CacheEntry(entry, entry.parent.name, "?", 0, False, problem, False, _bytes(stats))
    key = manifest.get("key")
    stale = not isinstance(key, dict) or any(key.get(k) != v for k, v in current.items())
    return CacheEntry(
        path=entry,
        arch=entry.parent.name,
        name=str(manifest.get("function_name", "?")),
        size=int(manifest.get("size", 0)),
        valid=problem is None,
        problem=problem,
        stale=stale,
        disk_bytes=_bytes(stats),
        created_unix=float(manifest.get("created_unix", created)),
    )


def list_entries(root: Path, current: Mapping[str, Any]) -> list[CacheEntry]:
    """Every entry sparsek wrote under `root`, verified (sha256 of its object)."""
    return [describe(entry, current) for entry in iter_entries(root)]


def prune(root: Path, current: Mapping[str, Any], *, everything: bool = False) -> PruneResult:
    """Remove stale, unfinished and corrupt entries (every entry with `everything`), each
    under its exclusive lock; entries a process holds at that moment are left alone.
    Orphaned temporary files of the entries kept are removed too."""
    removed = freed = busy = 0
    for entry in iter_entries(root):
        with locked(entry, wait=False) as held:
            if not held:
                busy += 1
                continue
            info = describe(entry, current)
            if everything or info.stale or not info.valid:
                freed += _remove_entry(entry)
                removed += 1
            else:
                remove_temp_files(entry)
        _rmdir_if_empty(entry)
    for arch_dir in _subdirs(root):
        _rmdir_if_empty(arch_dir)
    return PruneResult(removed, freed, busy)


def _remove_entry(entry: Path) -> int:
    """Delete the entry's files (sparsek's names only; the lock file last); returns bytes
    freed. The caller holds the exclusive lock and removes the directory afterwards."""
    freed = 0
    for child in sorted(_files(entry), key=lambda f: f.name == LOCK_NAME):
        if _is_sparsek_file(child.name):
            freed += sum(s.st_size for s in _stat(child))
            child.unlink(missing_ok=True)
    return freed


def _rmdir_if_empty(path: Path) -> None:
    # Fails where the directory is not empty (in use again, or foreign files) or gone.
    with contextlib.suppress(OSError):
        path.rmdir()


def _is_sparsek_file(name: str) -> bool:
    return name in (OBJECT_NAME, MANIFEST_NAME, LOCK_NAME) or is_temp_file(name)


def _is_sparsek_entry(entry: Path) -> bool:
    manifest = read_manifest(entry)
    if manifest is not None and isinstance(manifest.get("key"), dict):
        return key_digest(manifest["key"]) == entry.name
    try:
        children = list(os.scandir(entry))
    except OSError:
        return False
    return all(c.is_file(follow_symlinks=False) and _is_sparsek_file(c.name) for c in children)


def _subdirs(path: Path) -> Iterator[Path]:
    try:
        children = sorted(os.scandir(path), key=lambda c: c.name)
    except OSError:
        return
    for child in children:
        if child.is_dir(follow_symlinks=False):
            yield Path(child.path)


def _files(entry: Path) -> Iterator[Path]:
    try:
        children = list(os.scandir(entry))
    except OSError:
        return
    for child in children:
        if child.is_file(follow_symlinks=False):
            yield Path(child.path)


def _stat(path: Path) -> list[os.stat_result]:
    """The file's lstat, or nothing where it has just been removed."""
    try:
        return [path.lstat()]
    except FileNotFoundError:
        return []


def _stats(entry: Path) -> Iterator[os.stat_result]:
    for child in _files(entry):
        yield from _stat(child)


def _bytes(stats: list[os.stat_result]) -> int:
    return sum(s.st_size for s in stats if stat.S_ISREG(s.st_mode))
