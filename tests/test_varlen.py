"""`sparsek.attention_varlen` and `torch.ops.sparsek.attention_varlen` on CPU.

Compared against: `sparsek.reference.reference_attention` in float64, called once per
sequence on that sequence's slice of the packed tensors (an independent unpacking: no
padding, masks or gathers). Also: the malformed-input contract (TypeError / ValueError
naming the argument), opcheck, the fake implementation and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import malformed
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsek
import sparsek.ops  # registers torch.ops.sparsek (import sparsek alone does not)
from sparsek import routing
from sparsek.reference import reference_attention

op = torch.ops.sparsek.attention_varlen


@pytest.fixture(autouse=True)
def _fresh_log_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_logged_reasons", set())
    monkeypatch.delenv("SPARSEK_STRICT", raising=False)


def cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def packed(lens_q, lens_k, h=4, hkv=2, d=32, dv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), h, d, generator=gen).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=gen).to(dtype)
    v = torch.randn(sum(lens_k), hkv, dv or d, generator=gen).to(dtype)
    return q, k, v, cu(lens_q), cu(lens_k)


def per_sequence_reference(q, k, v, cu_q, cu_k, causal, scale):
    """float64 out (total_q, H, Dv) and lse (H, total_q), one reference call per sequence."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 == q0:
            continue
        o, s = reference_attention(
            q[None, q0:q1],
            k[None, k0:k1],
            v[None, k0:k1],
            causal=causal,
            softmax_scale=scale,
            compute_dtype=torch.float64,
        )
        out[q0:q1], lse[:, q0:q1] = o[0], s[0]
    return out, lse


LENGTHS = {
    "mixed": ([0, 1, 3, 7, 130, 2], [5, 0, 3, 9, 150, 1]),
    "equal": ([3, 17, 1], [3, 17, 1]),
    "q-longer": ([9, 4], [3, 4]),
    "single": ([33], [61]),
}


@pytest.mark.parametrize("lens", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize(("h", "hkv"), [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_per_sequence_reference(lens, h, hkv, causal) -> None:
    q, k, v, cu_q, cu_k = packed(*lens, h=h, hkv=hkv)
    out, lse = sparsek.attention_varlen(
        q, k, v, cu_q, cu_k, max(lens[0]), max(lens[1]), causal=causal, softmax_scale=0.3,
        return_lse=True,
    )  # fmt: skip
    want, want_lse = per_sequence_reference(q, k, v, cu_q, cu_k, causal, 0.3)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (h, q.shape[0]) and lse.dtype == torch.float32 and lse.is_contiguous()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_and_empty_keys_give_zero_and_neg_inf() -> None:
    # Sequence 0: 4 queries, 2 keys, causal -> its first 2 rows see nothing; sequence 1: no key.
    q, k, v, cu_q, cu_k = packed([4, 3], [2, 0])
    out, lse = sparsek.attention_varlen(q, k, v, cu_q, cu_k, 4, 2, causal=True, return_lse=True)
    assert (out[:2] == 0).all() and torch.isneginf(lse[:, :2]).all()
    assert (out[4:] == 0).all() and torch.isneginf(lse[:, 4:]).all()
    assert torch.isfinite(lse[:, 2:4]).all() and (out[2:4] != 0).any()


def test_rows_past_the_last_sequence_belong_to_none() -> None:
    q, k, v, cu_q, cu_k = packed([3, 2], [4, 4])
    padded_q = torch.cat([q, torch.randn(3, *q.shape[1:])])  # CUDA-graph style padding
    out, lse = sparsek.attention_varlen(padded_q, k, v, cu_q, cu_k, 3, 4, return_lse=True)
    want, want_lse = sparsek.attention_varlen(q, k, v, cu_q, cu_k, 3, 4, return_lse=True)
    torch.testing.assert_close(out[:5], want)
    torch.testing.assert_close(lse[:, :5], want_lse)
    assert (out[5:] == 0).all() and torch.isneginf(lse[:, 5:]).all()


def test_empty_batch_and_no_tokens() -> None:
    q, k, v = torch.randn(0, 2, 16), torch.randn(0, 1, 16), torch.randn(0, 1, 16)
    for cu_seqlens in (cu([]), cu([0, 0])):
        out, lse = sparsek.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, 0, 0, return_lse=True)
        assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_value_head_dim(dtype: torch.dtype) -> None:
    q, k, v, cu_q, cu_k = packed([5, 2], [6, 9], dv=24, dtype=dtype)
    out = sparsek.attention_varlen(q, k, v, cu_q, cu_k, 5, 9, causal=True)
    want, _ = per_sequence_reference(q, k, v, cu_q, cu_k, True, None)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (7, 4, 24)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_gradients_flow_through_the_reference() -> None:
    q, k, v, cu_q, cu_k = packed([3, 5], [4, 6], dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_()
    out = sparsek.attention_varlen(q, k, v, cu_q, cu_k, 5, 6, causal=True)
    assert isinstance(out, torch.Tensor)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = per_sequence_reference(q, k, v, cu_q, cu_k, True, None)[0]
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_cpu_metadata_values_are_checked_by_the_op() -> None:
    q, k, v, cu_q, cu_k = packed([3, 5], [4, 6])
    with pytest.raises(ValueError, match="max_seqlen_q=4 is smaller than the longest"):
        sparsek.attention_varlen(q, k, v, cu_q, cu_k, 4, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-negative and non-decreasing"):
        sparsek.attention_varlen(q, k, v, cu_q, cu_k.flip(0).contiguous(), 5, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\]=8 exceeds the 7 rows of q"):
        sparsek.attention_varlen(q[:7], k, v, cu_q, cu_k, 5, 6)


# ------------------------------------------------------------- devices no kernel serves


ON_META = "device=meta: the kernels run on CUDA devices only"


def test_non_cpu_inputs_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v, cu_q, cu_k = (t.to("meta") for t in packed([3, 5], [4, 6]))
    with caplog.at_level(logging.WARNING, logger="sparsek.routing"):
        for _ in range(3):
            out = sparsek.attention_varlen(q, k, v, cu_q, cu_k, 5, 6)
    assert isinstance(out, torch.Tensor) and out.shape == (8, 4, 32) and out.device.type == "meta"
    messages = [r.getMessage() for r in caplog.records if r.name == "sparsek.routing"]
    assert len(messages) == 1 and ON_META in messages[0]


def test_strict_mode_refuses_non_cpu_inputs_but_not_cpu(monkeypatch) -> None:
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    cpu_args = packed([3, 5], [4, 6])
    assert sparsek.attention_varlen(*cpu_args, 5, 6).shape == (8, 4, 32)
    with pytest.raises(sparsek.UnsupportedError) as info:
        sparsek.attention_varlen(*(t.to("meta") for t in cpu_args), 5, 6)
    assert info.value.reasons == [ON_META] and "SPARSEK_STRICT=1" in str(info.value)


# ------------------------------------------------------------- the torch op


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(causal: bool) -> None:
    q, k, v, cu_q, cu_k = packed([0, 3, 7], [2, 0, 9], h=4, hkv=2, d=16)
    torch.library.opcheck(op, (q, k, v, cu_q, cu_k, 7, 9, causal, 0.25))


def test_fake_impl_reads_shapes_only() -> None:
    with FakeTensorMode():
        q, k, v = torch.randn(11, 8, 64), torch.randn(20, 2, 64), torch.randn(20, 2, 32)
        cu_seqlens = torch.empty(4, dtype=torch.int32)  # values never read
        out, lse = op(q, k, v, cu_seqlens, cu_seqlens, 100, 100, True, 0.125)
    assert out.shape == (11, 8, 32) and out.is_contiguous()
    assert lse.shape == (8, 11) and lse.dtype == torch.float32 and lse.is_contiguous()


def test_torch_compile_fullgraph_public_api() -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")

    def f(q, k, v, cu_q, cu_k):
        out, lse = sparsek.attention_varlen(
            q, k, v, cu_q, cu_k, 40, 40, causal=True, return_lse=True
        )
        return out * 2, lse

    compiled = torch.compile(f, backend=counter, fullgraph=True)
    for lens_q, lens_k in [([3, 40, 5], [10, 40, 5]), ([20, 20, 8], [2, 39, 14])]:
        args = packed(lens_q, lens_k)  # same total sizes, different boundaries
        got, got_lse = compiled(*args)
        want, want_lse = f(*args)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_lse, want_lse)
    assert counter.frame_count == 1


# ------------------------------------------------------------- malformed inputs

Q, K, V, CQ, CK = packed([3, 5], [4, 6])
varlen = sparsek.attention_varlen


def nested(t: torch.Tensor) -> torch.Tensor:
    """`t`'s tokens as a nested tensor of two sequences."""
    return torch.nested.nested_tensor([t[:3], t[3:]])


MALFORMED: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("q-not-tensor", lambda: varlen([1.0], K, V, CQ, CK, 5, 6), TypeError, "q must be a torch"),
    ("q-int", lambda: varlen(Q.long(), K, V, CQ, CK, 5, 6), TypeError, "q has dtype torch.int64"),
    ("q-nested", lambda: varlen(nested(Q), K, V, CQ, CK, 5, 6), TypeError, "q is a nested"),
    ("v-sparse", lambda: varlen(Q, K, V.to_sparse(), CQ, CK, 5, 6), TypeError, "v has layout"),
    (
        "cu-q-sparse",
        lambda: varlen(Q, K, V, CQ.to_sparse(), CK, 5, 6),
        TypeError,
        "cu_seqlens_q has layout torch.sparse_coo",
    ),
    ("q-4d", lambda: varlen(Q[None], K, V, CQ, CK, 5, 6), ValueError, "q must be 3-D"),
    ("k-4d", lambda: varlen(Q, K[None], V, CQ, CK, 5, 6), ValueError, "k must be 3-D"),
    ("v-dtype", lambda: varlen(Q, K, V.double(), CQ, CK, 5, 6), ValueError, "v.dtype="),
    ("k-device", lambda: varlen(Q, K.to("meta"), V, CQ, CK, 5, 6), ValueError, "k.device=meta"),
    ("v-tokens", lambda: varlen(Q, K, V[:5], CQ, CK, 5, 6), ValueError, "v shape"),
    ("head-dim", lambda: varlen(Q, K[..., :16], V, CQ, CK, 5, 6), ValueError, "k head_dim=16"),
    ("heads", lambda: varlen(Q[:, :3], K, V, CQ, CK, 5, 6), ValueError, "num_heads=3"),
    (
        "cu-q-int64",
        lambda: varlen(Q, K, V, CQ.long(), CK, 5, 6),
        TypeError,
        "cu_seqlens_q has dtype torch.int64; supported: torch.int32",
    ),
    ("cu-k-list", lambda: varlen(Q, K, V, CQ, [0, 4], 5, 6), TypeError, "cu_seqlens_k must be"),
    ("cu-q-2d", lambda: varlen(Q, K, V, CQ[None], CK, 5, 6), ValueError, "cu_seqlens_q must be"),
    (
        "cu-k-device",
        lambda: varlen(Q, K, V, CQ, CK.to("meta"), 5, 6),
        ValueError,
        "cu_seqlens_k.device=meta",
    ),
    ("cu-q-empty", lambda: varlen(Q, K, V, CQ[:0], CK, 5, 6), ValueError, "batch + 1 >= 1"),
    (
        "cu-lengths",
        lambda: varlen(Q, K, V, CQ, CK[:2], 5, 6),
        ValueError,
        "cu_seqlens_k has 2 entries but cu_seqlens_q has 3",
    ),
    (
        "max-tensor",
        lambda: varlen(Q, K, V, CQ, CK, torch.tensor(5), 6),
        TypeError,
        "max_seqlen_q must be a Python int",
    ),
    ("max-float", lambda: varlen(Q, K, V, CQ, CK, 5, 6.0), TypeError, "max_seqlen_k must be"),
    ("max-negative", lambda: varlen(Q, K, V, CQ, CK, -1, 6), ValueError, "max_seqlen_q must be >="),
    ("causal-int", lambda: varlen(Q, K, V, CQ, CK, 5, 6, causal=1), TypeError, "causal must be"),
    (
        "scale-zero",
        lambda: varlen(Q, K, V, CQ, CK, 5, 6, softmax_scale=0.0),
        ValueError,
        "softmax_scale",
    ),
]


@pytest.mark.parametrize(("call", "error", "fragment"), malformed.params(MALFORMED))
def test_malformed_input_is_rejected(
    call: Callable[[], object], error: type[Exception], fragment: str
) -> None:
    malformed.assert_rejected(call, error, fragment)


@pytest.mark.parametrize("dynamic", [True, False])
def test_launch_passes_a_zeroed_tile_counter_to_dynamic_kernels(monkeypatch, dynamic) -> None:
    from dataclasses import replace

    from fake_launch import fake_launch_path

    from cutedsl_kernels.config import PACKED
    from sparsek import registry
    from sparsek.launch import varlen
    from sparsek.masks import CAUSAL, make_mask

    packed = registry.lookup("sm_90a", 128, "bfloat16", registry.mask_of(True), PACKED)
    config = replace(packed, persistent=dynamic, dynamic_schedule=dynamic)
    seen: list[tuple] = []

    def kernel(*args) -> None:
        seen.append(args)

    fake_launch_path(monkeypatch, lambda *a: config, kernel)
    lens = [3, 0, 130]
    cu = torch.tensor([0, 3, 3, 133], dtype=torch.int32)
    q, k = torch.randn(133, 4, 128), torch.randn(133, 2, 128)
    for _ in range(2):  # the first call loads the kernel, the second finds it memoized
        varlen.attention_varlen(q, k, k, cu, cu, max(lens), CAUSAL, 0.1)
    # A window, softcap and sinks: sizes and cap as scalars, sinks as a (1, heads) view.
    head_sinks = torch.arange(4.0)
    windowed = make_mask(False, (7, 2), 3.0, sinks=True)
    varlen.attention_varlen(q, k, k, cu, cu, max(lens), windowed, 0.1, head_sinks)
    for args in seen[:2]:
        counter, sinks, descales, scalars = args[9], args[10], args[11:14], args[14:]
        # softmax_scale, causal_offset, window (unbounded), softcap (off), max_seqlen_q,
        # num_splits, num_ctas
        assert sinks is None and descales == (None, None, None)
        assert scalars == (0.1, 0, -1, -1, 0.0, 130, 1, 132)
        if dynamic:
            assert counter.dtype == torch.int32 and counter.tolist() == [0]
        else:
            assert counter is None
    sinks, scalars = seen[2][10], seen[2][14:]
    assert sinks.shape == (1, 4) and torch.equal(sinks[0], head_sinks)
    assert scalars == (0.1, 0, 7, 2, 3.0, 130, 1, 132)
    assert len(seen) == 3
