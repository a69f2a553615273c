"""The CUDA launch path of `sparsek.launch` with the registry, the cache and the device
faked, so host-side launch logic runs on CPU tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import pytest
import torch

from cutedsl_kernels.config import DENSE, ElementTypes, FmhaFwdConfig, Layout, MaskSpec
from sparsek import memo
from sparsek.launch import launcher
from sparsek.registry import dtype_name
from sparsek.tuning import Workload


def fake_config(
    arch: str,
    head_dim: int,
    dtype: torch.dtype | str,
    mask: MaskSpec,
    layout: Layout = DENSE,
    workload: Workload = Workload.DEFAULT,
    head_dim_v: int | None = None,
    out_dtype: torch.dtype | str | None = None,
    cache_dtype: torch.dtype | str | None = None,
) -> FmhaFwdConfig:
    """A config of the request's identity (any head dims, default tiles, static schedule):
    a `lookup` for `fake_launch_path` that accepts every request."""
    dtypes = ElementTypes.uniform(dtype_name(dtype))
    if out_dtype is not None:
        dtypes = ElementTypes.fp8(dtype_name(out_dtype))
    if cache_dtype is not None:
        dtypes = ElementTypes.fp8_cache(dtype_name(dtype))
    return FmhaFwdConfig(arch, head_dim, dtypes, mask, head_dim_v=head_dim_v, **asdict(layout))


def fake_launch_path(
    monkeypatch: pytest.MonkeyPatch,
    lookup: Callable[..., FmhaFwdConfig],
    kernel: Callable[..., None],
) -> None:
    """`launcher.lookup` answers with `lookup` (called as lookup(arch, head_dim, dtype, mask,
    layout, workload) on each kernel load), every loaded kernel is `kernel`, the device is
    an sm_90a with 132 SMs, and no kernel is loaded or request planned yet."""
    monkeypatch.setattr(launcher, "detect_arch", lambda device: "sm_90a")
    monkeypatch.setattr(launcher, "lookup", lookup)
    monkeypatch.setattr(launcher, "get_kernel", lambda config: kernel)
    monkeypatch.setattr(launcher, "num_sms", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    memo.clear_all()
