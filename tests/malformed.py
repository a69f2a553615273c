"""The shared harness of the malformed-input tables in the test_*.py files.

Each table row is (id, call, expected exception type, fragment of its message); the
fragment names the argument, so a test fails when an error stops saying what was wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

Row = tuple[str, Callable[[], object], type[Exception], str]


def params(table: Sequence[Row]) -> list[object]:
    """pytest params (call, error, fragment) with the row ids."""
    return [pytest.param(call, error, fragment, id=name) for name, call, error, fragment in table]


def assert_rejected(call: Callable[[], object], error: type[Exception], fragment: str) -> None:
    """`call()` raises exactly `error`, and its message contains `fragment`."""
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    assert fragment in str(info.value)
