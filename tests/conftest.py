"""Shared pytest setup: markers, GPU skips at collection, an isolated kernel cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

MARKERS = {
    "gpu": "needs a CUDA GPU (skipped at collection without one)",
    "sm90": "needs a Hopper (compute capability 9.0) GPU",
    "sm100": "needs a Blackwell (compute capability 10.0) GPU",
    "slow": "takes more than a few seconds",
    "fuzz": "the seeded randomized GPU test (tests/gpu/test_fuzz_gpu.py)",
}
CAPABILITY_MARKERS = {"sm90": (9, 0), "sm100": (10, 0)}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if has_gpu else None
    no_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(no_gpu)
            continue
        for marker, needed in CAPABILITY_MARKERS.items():
            if marker in item.keywords and capability != needed:
                item.add_marker(pytest.mark.skip(reason=f"needs compute capability {needed}"))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test session compiles into its own cache (never the user's ~/.cache), or into
    `$SPARSEK_TEST_CACHE_DIR` when that names one: a GPU run can fill it first in many
    processes (`SPARSEK_CACHE_DIR=DIR sparsek compile -j 16 ...`) instead of compiling each
    kernel where a test first launches it."""
    named = os.environ.get("SPARSEK_TEST_CACHE_DIR")
    path = Path(named) if named else tmp_path_factory.mktemp("sparsek-cache")
    old = os.environ.get("SPARSEK_CACHE_DIR")
    os.environ["SPARSEK_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SPARSEK_CACHE_DIR", None)
    else:
        os.environ["SPARSEK_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _clean_registry_memo() -> Iterator[None]:
    """Registry answers, loaded kernels and launch plans are memoized; tests that
    monkeypatch `can_implement` or fake the launch path need fresh memos (all of them:
    `sparsek.memo.clear_all`), before and after each test."""
    from sparsek import memo

    memo.clear_all()
    yield
    memo.clear_all()
