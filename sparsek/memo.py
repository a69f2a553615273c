"""Memoized answers of the launch path, each registered here so they can be dropped at once.

Every repeated request is served from memos keyed by what the answer depends on (the
eager call signature, a request's shapes and strides, the (device, kernel identity) of a
loaded kernel, the registry's answer). Their contents follow from the registry's tables
and the loaded kernels, so anything that changes those (`tuning.override`, a test that
fakes the device) calls `clear_all()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

# A memo is emptied all at once when it holds this many entries (a serving engine's
# request shapes vary with each step's token count: the set is bounded only by use).
MAX_ENTRIES = 4096

_K = TypeVar("_K")
_V = TypeVar("_V")

_CLEARERS: list[Callable[[], None]] = []


def register(clear: Callable[[], None]) -> None:
    """Have `clear_all` call `clear`: a memo dict's `clear`, an `functools.lru_cache`'s
    `cache_clear`."""
    _CLEARERS.append(clear)


def clear_all() -> None:
    """Empty every registered memo."""
    for clear in _CLEARERS:
        clear()


def remember(memo: dict[_K, _V], key: _K, value: _V) -> _V:
    """`memo[key] = value`, emptying `memo` first when it holds `MAX_ENTRIES` entries."""
    if len(memo) >= MAX_ENTRIES:
        memo.clear()
    memo[key] = value
    return value
