"""One rule for CPU tensors and inputs that require grad, in every entry point.

Compared against: the rule `sparsek.routing` documents, for `attention`, the SDPA drop-in,
`attention_varlen` and `attention_with_kvcache` alike: an input that requires grad (grad
mode on) is a fallback on every device (logged once as `NEEDS_GRAD`, `UnsupportedError`
under `SPARSEK_STRICT=1`); other CPU tensors take the documented CPU path (never logged,
never refused); tensors of a device without kernels (meta here) are a fallback naming the
device. Also `choose_path`'s answers for CUDA, which need no GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

import sparsek
from cutedsl_kernels.config import CAUSAL, NO_MASK
from sparsek import routing
from sparsek.routing import NEEDS_GRAD

i32 = torch.int32


def randn(*shape: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=gen).to(device)


def attention(device: str, grad: bool) -> object:
    q = randn(1, 5, 4, 16, device=device).requires_grad_(grad)
    k, v = randn(1, 7, 2, 16, device=device), randn(1, 7, 2, 16, device=device)
    return sparsek.attention(q, k, v, causal=True)


def drop_in(device: str, grad: bool) -> object:
    q = randn(1, 4, 5, 16, device=device).requires_grad_(grad)
    k, v = randn(1, 2, 7, 16, device=device), randn(1, 2, 7, 16, device=device)
    return sparsek.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def varlen(device: str, grad: bool) -> object:
    q = randn(8, 4, 16, device=device).requires_grad_(grad)
    k, v = randn(10, 2, 16, device=device), randn(10, 2, 16, device=device)
    cu_q = torch.tensor([0, 3, 8], dtype=i32, device=device)
    cu_k = torch.tensor([0, 4, 10], dtype=i32, device=device)
    return sparsek.attention_varlen(q, k, v, cu_q, cu_k, 5, 6, causal=True)


def kvcache(device: str, grad: bool) -> object:
    q = randn(2, 1, 4, 16, device=device).requires_grad_(grad)
    k, v = randn(2, 32, 2, 16, device=device), randn(2, 32, 2, 16, device=device)
    seqlens = torch.tensor([5, 20], dtype=i32, device=device)
    return sparsek.attention_with_kvcache(q, k, v, seqlens)


ENTRY_POINTS: dict[str, Callable[[str, bool], object]] = {
    "attention": attention,
    "drop-in": drop_in,
    "varlen": varlen,
    "kvcache": kvcache,
}
ON_META = "device=meta: the kernels run on CUDA devices only"
# (device, an input requires grad) -> the fallback reason; None: the CPU path.
CASES = {("cpu", False): None, ("cpu", True): NEEDS_GRAD, ("meta", False): ON_META}
CASES[("meta", True)] = NEEDS_GRAD


@pytest.fixture(autouse=True)
def _fresh_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_logged_reasons", set())
    monkeypatch.delenv("SPARSEK_STRICT", raising=False)


def routing_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sparsek.routing"]


@pytest.mark.parametrize(("device", "grad"), list(CASES), ids=lambda x: str(x))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_fallbacks_are_logged_by_their_cause(entry, device, grad, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="sparsek.routing"):
        for _ in range(2):
            out = ENTRY_POINTS[entry](device, grad)
    assert isinstance(out, torch.Tensor) and out.device.type == device
    assert out.requires_grad == grad  # a differentiable path for inputs that need grad
    reason = CASES[(device, grad)]
    messages = routing_messages(caplog)
    if reason is None:
        assert messages == []
    else:
        assert len(messages) == 1 and messages[0].endswith(f": {reason}")
    if grad:
        assert "device=" not in messages[0]


@pytest.mark.parametrize(("device", "grad"), list(CASES), ids=lambda x: str(x))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_strict_mode_refuses_the_same_calls(entry, device, grad, monkeypatch) -> None:
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    reason = CASES[(device, grad)]
    if reason is None:
        assert isinstance(ENTRY_POINTS[entry](device, grad), torch.Tensor)
        return
    with pytest.raises(sparsek.UnsupportedError) as info:
        ENTRY_POINTS[entry](device, grad)
    assert info.value.reasons == [reason] and "SPARSEK_STRICT=1" in str(info.value)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_requires_grad_without_grad_mode_is_no_fallback(entry, monkeypatch) -> None:
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    with torch.no_grad():
        out = ENTRY_POINTS[entry]("cpu", True)
    assert isinstance(out, torch.Tensor) and not out.requires_grad


@pytest.mark.parametrize(
    ("device_type", "grad", "path"),
    [
        ("cuda", False, "KERNELS"),
        ("cuda", True, "AUTOGRAD"),
        ("cpu", False, "CPU"),
        ("cpu", True, "AUTOGRAD"),
        ("meta", False, "KERNELS"),  # asked, and the kernels answer with the device
        ("mps", True, "AUTOGRAD"),
    ],
)
def test_choose_path(device_type: str, grad: bool, path: str) -> None:
    assert routing.choose_path(device_type, grad) is routing.Path[path]


def test_cuda_dense_blockers_read_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's answer for CUDA inputs, asked with CPU tensors of their shapes."""
    from cutedsl_kernels import build

    monkeypatch.setattr(build, "can_implement", lambda config: [])
    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    q = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    assert routing.cuda_dense_blockers(0, q, q, CAUSAL) == ()
    narrow_v = routing.cuda_dense_blockers(0, q, q[..., :32], CAUSAL)[0]
    assert "head_dim_v=32 is not supported with head_dim=64 on sm_90a (supported: 64)" in narrow_v
    assert "head_dim=16" in routing.cuda_dense_blockers(0, q[..., :16], q[..., :16], NO_MASK)[0]
    assert "dtype=float32" in routing.cuda_dense_blockers(None, q.float(), q.float(), NO_MASK)[0]
