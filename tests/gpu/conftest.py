"""Fixtures shared by the GPU suites."""

from __future__ import annotations

import pytest
import torch

from sparsek.launch import launcher


@pytest.fixture
def strict_and_poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fallbacks refused (`SPARSEK_STRICT=1`: every check runs a kernel) and every output
    allocation filled with NaN (every launch path allocates through `launcher.empty`), so
    an element a kernel leaves unwritten fails the comparison."""
    monkeypatch.setenv("SPARSEK_STRICT", "1")

    def poisoned(shape, dtype, device, stride=None):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launcher, "empty", poisoned)
