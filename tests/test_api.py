"""Public API behaviour without a GPU: fallbacks to torch SDPA, strict mode, logging.

Compared against: torch.nn.functional.scaled_dot_product_attention (the drop-in must return
exactly what it returns when it falls back) and the float64 reference for the bottom-right
causal fallback, which SDPA does not offer directly.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsek
from cutedsl_kernels.config import NO_MASK
from sparsek import api, routing
from sparsek.launch import dense
from sparsek.reference import reference_attention


@pytest.fixture(autouse=True)
def _fresh_log_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_logged_reasons", set())
    monkeypatch.delenv("SPARSEK_STRICT", raising=False)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def as_if_on_cuda(q: torch.Tensor, *others: torch.Tensor) -> routing.Path:
    """`routing.forward_path` as it answers for CUDA tensors (a stand-in for `api`'s)."""
    return routing.choose_path("cuda", routing.needs_grad(q, *others))


@pytest.mark.parametrize(
    ("sq", "sk", "h", "hkv", "causal"),
    [(16, 16, 4, 4, True), (7, 19, 4, 1, True), (19, 7, 4, 2, True), (12, 30, 6, 3, False)],
)
def test_attention_cpu_fallback_matches_reference(sq, sk, h, hkv, causal) -> None:
    q, k, v = rand(2, sq, h, 32), rand(2, sk, hkv, 32), rand(2, sk, hkv, 32)
    out = sparsek.attention(q, k, v, causal=causal, softmax_scale=0.3)
    want, _ = reference_attention(
        q, k, v, causal=causal, softmax_scale=0.3, compute_dtype=torch.float64
    )
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    if sq > sk and causal:
        assert (out[:, : sq - sk] == 0).all()


def test_attention_return_lse_on_fallback() -> None:
    q, k, v = rand(1, 9, 2, 16), rand(1, 5, 1, 16), rand(1, 5, 1, 16)
    out, lse = sparsek.attention(q, k, v, causal=True, return_lse=True)
    want_out, want_lse = reference_attention(q, k, v, causal=True)
    assert lse.shape == (1, 2, 9) and lse.dtype == torch.float32
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_attention_half_precision_and_empty_inputs() -> None:
    q = rand(1, 8, 2, 64, dtype=torch.bfloat16)
    out = sparsek.attention(q, q, q, causal=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    empty = rand(0, 8, 2, 64)
    assert sparsek.attention(empty, empty, empty).shape == (0, 8, 2, 64)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"is_causal": True, "scale": 0.05},
        {"attn_mask": torch.rand(8, 12) > 0.3},
        {"attn_mask": torch.randn(2, 4, 8, 12)},
        {"enable_gqa": True},
    ],
)
def test_sdpa_drop_in_falls_back_to_torch(kwargs) -> None:
    hkv = 2 if kwargs.get("enable_gqa") else 4
    q, k, v = rand(2, 4, 8, 32), rand(2, hkv, 12, 32), rand(2, hkv, 12, 32)
    got = sparsek.scaled_dot_product_attention(q, k, v, **kwargs)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(got, want)


def test_sdpa_drop_in_hands_nested_tensors_to_torch() -> None:
    def jagged() -> torch.Tensor:  # (batch, heads, ragged seqlen, head_dim)
        seqs = [rand(3, 4, 16), rand(5, 4, 16)]
        return torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)

    q, k, v = jagged(), jagged(), jagged()
    got = sparsek.scaled_dot_product_attention(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v)
    assert got.is_nested and torch.equal(got.values(), want.values())


def test_sdpa_drop_in_dropout_falls_back_with_same_rng() -> None:
    q = rand(1, 2, 8, 16)
    torch.manual_seed(3)
    got = sparsek.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(3)
    want = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(got, want)


def test_fallback_is_logged_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    q = rand(1, 4, 2, 16)
    meta = q.to("meta")  # a device no kernel serves, unlike the CPU (the documented path)
    with caplog.at_level(logging.WARNING, logger="sparsek.routing"):
        for _ in range(3):
            sparsek.scaled_dot_product_attention(meta, meta, meta)
        mask = torch.ones(2, 2, dtype=torch.bool)
        sparsek.scaled_dot_product_attention(meta, meta, meta, attn_mask=mask.to("meta"))
        sparsek.scaled_dot_product_attention(q, q, q, attn_mask=mask)  # CPU: not either
        sparsek.attention(q, q, q)
    messages = [r.getMessage() for r in caplog.records if r.name == "sparsek.routing"]
    assert len(messages) == 2
    assert "device=meta" in messages[0] and "attn_mask" in messages[1]


def test_attention_on_cpu_runs_the_reference_op_even_in_strict_mode(monkeypatch) -> None:
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    q, k = rand(1, 5, 4, 16), rand(1, 7, 2, 16)
    out, lse = sparsek.attention(q, k, k, causal=True, return_lse=True)
    want, want_lse = reference_attention(q, k, k, causal=True, compute_dtype=torch.float32)
    torch.testing.assert_close(out, want.to(q.dtype))
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda q: sparsek.attention(q.requires_grad_(), q, q), "requires grad"),
        (lambda q: sparsek.scaled_dot_product_attention(q, q, q), "device=meta"),
        (
            lambda q: sparsek.scaled_dot_product_attention(q, q, q, attn_mask=q[..., :4] > 0),
            "attn_mask",
        ),
        (lambda q: sparsek.scaled_dot_product_attention(q, q, q, dropout_p=0.1), "dropout_p"),
        (
            lambda q: sparsek.scaled_dot_product_attention(
                *[torch.nested.nested_tensor([q[0], q[0, :2]], layout=torch.jagged)] * 3
            ),
            "nested tensors",
        ),
    ],
)
def test_strict_mode_turns_fallbacks_into_errors(monkeypatch, call, fragment) -> None:
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    # The drop-in's CPU calls are its documented CPU path: ask as if on a CUDA device.
    monkeypatch.setattr(api, "forward_path", as_if_on_cuda)
    with pytest.raises(sparsek.UnsupportedError) as info:
        call(rand(1, 4, 4, 16).to("meta") if "device" in fragment else rand(1, 4, 4, 16))
    assert any(fragment in r for r in info.value.reasons)
    assert "SPARSEK_STRICT=1" in str(info.value)


def test_strict_zero_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEK_STRICT", "0")
    q = rand(1, 4, 2, 16)
    assert sparsek.attention(q, q, q).shape == q.shape


def test_requires_grad_is_a_fallback_reason() -> None:
    q = rand(1, 4, 2, 64).requires_grad_()
    assert routing.dense_blockers(q, q, q, NO_MASK) == (routing.NEEDS_GRAD,)
    out = sparsek.attention(q, q, q)
    assert isinstance(out, torch.Tensor)
    out.sum().backward()  # the SDPA fallback is differentiable
    assert q.grad is not None


def test_registry_blockers_for_cuda_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    from cutedsl_kernels import build

    monkeypatch.setattr(build, "can_implement", lambda c: [])
    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    assert routing.registry_blockers(0, 128, "bfloat16", "causal") == ()
    assert "head_dim=80" in routing.registry_blockers(0, 80, "float16", "full")[0]
    assert "head_dim is not supported" in routing.registry_blockers(0, None, "float16", "full")[0]
    assert "dtype=float32" in routing.registry_blockers(0, 64, "float32", "full")[0]
    monkeypatch.setenv("SPARSEK_ARCH", "sm_80")
    assert "arch=sm_80" in routing.registry_blockers(0, 64, "float16", "full")[0]


def test_import_is_light() -> None:
    """`import sparsek` pulls in neither the CuTe DSL nor xformers/vllm."""
    code = (
        "import sys, time; t = time.perf_counter(); import sparsek; "
        "dt = time.perf_counter() - t; "
        "heavy = ('cutlass', 'xformers', 'vllm', 'tvm_ffi'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy]; "
        "assert not bad, bad; assert sparsek.__version__ == '0.2.0'; print(dt)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 20


# ------------------------------------------------- memoized eager calls (launch faked)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[tuple]]:
    """`sparsek.attention` and the drop-in on CPU tensors as if a kernel served them: the
    launch path is faked, the kernel check passes unless an input requires grad. Yields
    (validations so far, kernel calls)."""
    from fake_launch import fake_config, fake_launch_path

    calls: list[tuple] = []

    def kernel(q, k, v, out, lse, *rest) -> None:
        calls.append((q, k, v))
        out.fill_(3.0)
        lse.fill_(4.0)

    validations = [0]  # calls of `attention`'s validation or the drop-in's kernel check

    def counted(check):
        def call(*args, **kwargs):
            validations[0] += 1
            return check(*args, **kwargs)

        return call

    fake_launch_path(monkeypatch, fake_config, kernel)  # no plan or call memoized yet
    monkeypatch.setattr(api, "forward_path", as_if_on_cuda)
    monkeypatch.setattr(api, "check_qkv", counted(api.check_qkv))
    monkeypatch.setattr(api, "sdpa_blockers", counted(api.sdpa_blockers))
    monkeypatch.setattr(
        api, "dense_blockers", lambda q, k, v, c: ("grad",) if routing.needs_grad(q, k, v) else ()
    )
    return validations, calls


def test_repeated_calls_skip_validation_but_bad_arguments_still_raise(served, monkeypatch) -> None:
    validations, calls = served
    q, k = rand(1, 8, 4, 32, dtype=torch.bfloat16), rand(1, 8, 2, 32, dtype=torch.bfloat16)
    for _ in range(3):
        out = sparsek.attention(q, k, k, causal=True, softmax_scale=1.0)
    out, lse = sparsek.attention(q, k, k, causal=True, softmax_scale=1.0, return_lse=True)
    assert validations == [1] and len(calls) == 4
    assert (out == 3).all() and (lse == 4).all() and lse.shape == (1, 4, 8)
    # Same tensors: arguments hashing equal to a memoized signature are still checked.
    with pytest.raises(TypeError, match="causal must be a bool"):
        sparsek.attention(q, k, k, causal=1, softmax_scale=1.0)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        sparsek.attention(q, k, k, causal=True, softmax_scale=1.0, return_lse=1)
    with pytest.raises(TypeError, match="softmax_scale must be a float"):
        sparsek.attention(q, k, k, causal=True, softmax_scale=True)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        sparsek.attention(q, k, k, causal=True, softmax_scale=float("nan"))
    with pytest.raises(ValueError, match=r"k\.dtype"):
        sparsek.attention(q, k.half(), k, causal=True, softmax_scale=1.0)
    assert len(calls) == 4
    # What the kernel check reads is in the signature: grad, the SPARSEK_ARCH override.
    q.requires_grad_(True)
    assert not (sparsek.attention(q, k, k, causal=True, softmax_scale=1.0) == 3).any()
    q.requires_grad_(False)
    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    sparsek.attention(q, k, k, causal=True, softmax_scale=1.0)
    assert len(calls) == 5 and validations == [6]  # 1 + scale x2, dtype, grad, arch


def test_calls_that_drop_the_lse_write_it_to_a_shared_scratch(monkeypatch) -> None:
    """Repeated calls without return_lse (and the SDPA drop-in) hand the kernel a view of
    the device's LSE scratch instead of a fresh allocation, while problems larger than
    the scratch, and calls that return the LSE, get their own."""
    from fake_launch import fake_config, fake_launch_path

    lses: list[torch.Tensor] = []

    def kernel(q, k, v, out, lse, *rest) -> None:
        lses.append(lse)
        out.fill_(3.0)
        lse.fill_(4.0)

    fake_launch_path(monkeypatch, fake_config, kernel)  # no plan or call memoized yet
    monkeypatch.setattr(api, "forward_path", as_if_on_cuda)
    monkeypatch.setattr(api, "dense_blockers", lambda *a: ())
    monkeypatch.setattr(dense, "LSE_SCRATCH_FLOATS", 64)
    small, large = rand(1, 8, 4, 32), rand(1, 24, 4, 32)  # 32 and 96 LSE rows
    for _ in range(3):
        sparsek.attention(small, small, small)
    scratch = dense.lse_scratch(small.device, (dense.LSE_SCRATCH_FLOATS,))  # all of it
    assert lses[1] is lses[2] and lses[1].data_ptr() == scratch.data_ptr()
    assert lses[1].shape == (1, 4, 8) and lses[0] is not lses[1]  # the first call: planned
    _, lse = sparsek.attention(small, small, small, return_lse=True)
    assert lse is lses[-1] and lse.data_ptr() != scratch.data_ptr() and (lse == 4).all()
    x = small.transpose(1, 2)
    for _ in range(2):
        sparsek.scaled_dot_product_attention(x, x, x)
    assert lses[-1].data_ptr() == scratch.data_ptr()
    for _ in range(2):
        sparsek.attention(large, large, large)
    assert all(lse.data_ptr() != scratch.data_ptr() for lse in lses[-2:])


def test_memoized_calls_see_new_strides_and_pointers(served) -> None:
    _, calls = served
    q = rand(1, 8, 2, 32, dtype=torch.bfloat16)
    sparsek.attention(q, q, q)
    flat = rand(q.numel() + 1, dtype=torch.bfloat16)
    misaligned = flat[1:].view(q.shape)  # q's signature, base 2 bytes off
    sparsek.attention(misaligned, q, q)
    strided = rand(1, 8, 2, 40, dtype=torch.bfloat16)[..., :32]  # row stride 40 of 8: fine
    sparsek.attention(strided, q, q)
    assert calls[0][0] is q and calls[2][0] is strided
    assert calls[1][0] is not misaligned and torch.equal(calls[1][0], misaligned)
    assert len(api._SERVED) == 2


def test_sdpa_drop_in_memoizes_apart_from_attention(served) -> None:
    validations, calls = served
    x = rand(1, 2, 8, 32, dtype=torch.bfloat16)  # (batch, heads, seqlen, head_dim)
    for _ in range(3):
        out = sparsek.scaled_dot_product_attention(x, x, x, is_causal=True)
    assert validations == [1] and len(calls) == 3 and (out == 3).all()
    assert calls[-1][0].shape == (1, 8, 2, 32)  # the kernel reads (batch, seqlen, heads, dim)
    sparsek.attention(x, x, x, causal=True)  # same tensors, other layout: its own plan
    assert validations == [2] and len(api._SERVED) == len(api._SERVED_SDPA) == 1
    with pytest.raises(TypeError, match="'is_causal' must be bool"):  # torch's own check
        sparsek.scaled_dot_product_attention(x, x, x, is_causal=1)
    with pytest.raises(RuntimeError, match="dropout probability"):  # torch's own check
        sparsek.scaled_dot_product_attention(x, x, x, dropout_p=1.5)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    masked = sparsek.scaled_dot_product_attention(x, x, x, attn_mask=mask)  # falls back
    assert len(calls) == 4 and not (masked == 3).any()
