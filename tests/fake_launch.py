"""The CUDA launch path of `sparsek.ops` with the registry, the cache and the device
faked, so host-side launch logic runs on CPU tensors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sparsek import ops


def fake_launch_path(
    monkeypatch: pytest.MonkeyPatch, lookup: Callable[..., object], kernel: Callable[..., None]
) -> None:
    """`ops.lookup` answers with `lookup`, every loaded kernel is `kernel`, the device
    is an sm_90a with 132 SMs, and no kernel is loaded or request planned yet."""
    monkeypatch.setattr(ops, "detect_arch", lambda device: "sm_90a")
    monkeypatch.setattr(ops, "lookup", lookup)
    monkeypatch.setattr(ops, "get_kernel", lambda config: kernel)
    monkeypatch.setattr(ops, "_LAUNCHERS", {})
    monkeypatch.setattr(ops, "_COUNTED", set())
    monkeypatch.setattr(ops, "_DENSE_PLANS", {})
    monkeypatch.setattr(ops, "_LSE_SCRATCH", {})
    monkeypatch.setattr(ops, "num_sms", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
