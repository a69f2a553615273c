"""`sparsek.scaled_dot_product_attention` behaves like PyTorch's SDPA.

Compared against: `torch.nn.functional.scaled_dot_product_attention` called with the same
arguments, over a table of calls: a call torch answers gets torch's answer, a call torch
rejects raises the same exception type. Each row also records what torch 2.13 (CPU) was
seen to do (`test_the_table_records_torch`); the comparisons run against the installed
torch.

Twice: with CPU tensors as they are (the drop-in's CPU path), and routed as if they were
CUDA tensors on an sm_90a GPU (the device rule answers as for CUDA, the registry as on
sm_90a, the launch path is faked by a kernel that computes attention in float32). There
each row also says whether the kernels serve it: served rows match torch within torch's
own rounding error against a float64 SDPA; the others are fallbacks to torch (logged, or
refused under `SPARSEK_STRICT=1`, but only once torch has accepted the arguments).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import sparsek
from sparsek import api, routing
from sparsek.launch import dense, launcher
from sparsek.routing import NEEDS_GRAD

TORCH_SDPA = F.scaled_dot_product_attention
RECORDED_WITH = "2.13"  # the torch version whose behaviour the table records
ANSWERS = "answers"

Args = tuple[tuple[object, ...], dict[str, object]]


@dataclass(frozen=True)
class Call:
    """One call of SDPA: fresh arguments on each `make()`, what torch does with them
    (`ANSWERS` or the exception type), and whether sparsek's kernels serve it on sm_90a."""

    make: Callable[[], Args]
    torch_does: str | type[Exception] = ANSWERS
    served: bool = False


def qkv(
    sq: int = 8,
    sk: int = 12,
    h: int = 4,
    hkv: int | None = None,
    d: int = 64,
    dv: int | None = None,
    lead: tuple[int, ...] = (2,),
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(*lead, heads, seqlen, head_dim) query, key and value; the same values on each call."""
    gen = torch.Generator().manual_seed(0)
    hkv = h if hkv is None else hkv
    q = torch.randn(*lead, h, sq, d, generator=gen).to(dtype)
    k = torch.randn(*lead, hkv, sk, d, generator=gen).to(dtype)
    v = torch.randn(*lead, hkv, sk, d if dv is None else dv, generator=gen).to(dtype)
    return q, k, v


def row(
    tensors: Callable[[], tuple[object, ...]],
    torch_does: str | type[Exception] = ANSWERS,
    served: bool = False,
    **kwargs: object,
) -> Call:
    return Call(lambda: (tensors(), dict(kwargs)), torch_does, served)


def bshd_view() -> tuple[torch.Tensor, ...]:
    """(batch, seqlen, heads, head_dim) storage seen as (batch, heads, seqlen, head_dim)."""
    return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv())


def every_other_token() -> tuple[torch.Tensor, ...]:
    return tuple(t[:, :, ::2] for t in qkv(sq=16, sk=24))


def expanded_kv_heads() -> tuple[torch.Tensor, ...]:
    q, k, v = qkv()
    return q, k[:, :1].expand(-1, 4, -1, -1), v[:, :1].expand(-1, 4, -1, -1)


def with_grad() -> tuple[torch.Tensor, ...]:
    q, k, v = qkv()
    return q.requires_grad_(), k, v


def mask(*shape: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(*shape, generator=gen)
    return values > -0.5 if dtype == torch.bool else values.to(dtype)


R, T = RuntimeError, TypeError
TABLE: dict[str, Call] = {
    # ranks
    "4d": row(qkv, served=True),
    "3d": row(lambda: tuple(t[0] for t in qkv())),
    "2d": row(lambda: tuple(t[0, 0] for t in qkv())),
    "1d": row(lambda: tuple(t[0, 0, 0] for t in qkv()), R),
    "5d": row(lambda: qkv(lead=(3, 2))),
    "5d-gqa": row(lambda: qkv(h=8, hkv=2, lead=(3, 2)), enable_gqa=True),
    "4d-query-3d-key-value": row(lambda: (qkv()[0], *(t[0] for t in qkv()[1:]))),
    # causal masks (top-left aligned) and problem sizes
    "causal": row(qkv, served=True, is_causal=True),
    "causal-more-queries": row(lambda: qkv(sq=12, sk=8), served=True, is_causal=True),
    "causal-more-keys": row(lambda: qkv(sq=8, sk=12), served=True, is_causal=True),
    "one-query": row(lambda: qkv(sq=1), served=True, is_causal=True),
    "bfloat16": row(lambda: qkv(dtype=torch.bfloat16), served=True, is_causal=True),
    "head-dim-128": row(lambda: qkv(d=128), served=True),
    "float32": row(lambda: qkv(dtype=torch.float32)),
    "float64": row(lambda: qkv(dtype=torch.float64)),
    "head-dim-32": row(lambda: qkv(d=32), served=True),
    "head-dim-80": row(lambda: qkv(d=80)),
    # grouped-query attention
    "gqa": row(lambda: qkv(h=8, hkv=2), served=True, enable_gqa=True),
    "mqa-causal": row(lambda: qkv(h=8, hkv=1), served=True, enable_gqa=True, is_causal=True),
    "gqa-flag-equal-heads": row(qkv, served=True, enable_gqa=True),
    "gqa-flag-off": row(lambda: qkv(h=8, hkv=2), R),
    "gqa-not-a-multiple": row(lambda: qkv(h=6, hkv=4), R, enable_gqa=True),
    "gqa-more-kv-heads": row(lambda: qkv(h=2, hkv=4), R, enable_gqa=True),
    "gqa-value-heads-differ": row(
        lambda: (*qkv(h=8, hkv=4)[:2], qkv(h=8, hkv=2)[2]), enable_gqa=True
    ),
    # scale
    "scale-0.5": row(qkv, served=True, scale=0.5),
    "scale-int": row(qkv, served=True, scale=2),
    "scale-0": row(qkv, scale=0.0),
    "scale-negative": row(qkv, scale=-0.5),
    "scale-nan": row(qkv, scale=float("nan")),
    "scale-inf": row(qkv, scale=float("inf")),
    "scale-bool": row(qkv, scale=True),
    "scale-0d-tensor": row(qkv, scale=torch.tensor(0.5)),
    "scale-str": row(qkv, T, scale="0.5"),
    # dropout (torch's RNG is seeded alike before each call)
    "dropout-0.5": row(qkv, dropout_p=0.5),
    "dropout-1.0": row(qkv, dropout_p=1.0),
    "dropout-1-int": row(qkv, dropout_p=1),
    "dropout-0-int": row(qkv, served=True, dropout_p=0),
    "dropout-1.5": row(qkv, R, dropout_p=1.5),
    "dropout-negative": row(qkv, R, dropout_p=-0.1),
    "dropout-nan": row(qkv, R, dropout_p=float("nan")),
    "dropout-str": row(qkv, T, dropout_p="0"),
    # attn_mask
    "mask-bool": row(qkv, attn_mask=mask(8, 12)),
    "mask-additive-4d": row(qkv, attn_mask=mask(2, 4, 8, 12, dtype=torch.float16)),
    "mask-broadcast-batch-heads": row(qkv, attn_mask=mask(1, 1, 8, 12)),
    "mask-broadcast-keys": row(qkv, attn_mask=mask(2, 1, 1, 12)),
    "mask-with-causal": row(qkv, attn_mask=mask(8, 12), is_causal=True),
    "mask-bad-shape": row(qkv, R, attn_mask=mask(7, 12)),
    "mask-int": row(qkv, R, attn_mask=mask(8, 12, dtype=torch.int64)),
    "mask-float64": row(qkv, R, attn_mask=mask(8, 12, dtype=torch.float64)),
    "mask-list": row(qkv, T, attn_mask=[[True]]),
    # flags
    "is-causal-int": row(qkv, T, is_causal=1),
    "is-causal-none": row(qkv, T, is_causal=None),
    "enable-gqa-int": row(qkv, T, enable_gqa=1),
    # dtypes and devices
    "key-float32": row(lambda: (qkv()[0], qkv()[1].float(), qkv()[2]), R),
    "value-bfloat16": row(lambda: (*qkv()[:2], qkv()[2].bfloat16()), R),
    "integer-dtype": row(lambda: tuple(t.long() for t in qkv()), R),
    "key-on-meta": row(lambda: (qkv()[0], qkv()[1].to("meta"), qkv()[2]), R),
    # shapes
    "batch-mismatch": row(lambda: (qkv()[0], *qkv(lead=(3,))[1:]), R),
    "batch-broadcast": row(lambda: (qkv()[0], *qkv(lead=(1,))[1:])),
    "head-dim-mismatch": row(lambda: (qkv()[0], qkv(d=32)[1], qkv()[2]), R),
    "value-head-dim-differs": row(lambda: qkv(dv=32)),
    # empty tensors
    "empty-batch": row(lambda: qkv(lead=(0,)), served=True),
    "empty-queries": row(lambda: qkv(sq=0), served=True),
    "empty-keys": row(lambda: qkv(sk=0), served=True, is_causal=True),
    "empty-heads": row(lambda: qkv(h=0)),
    "empty-head-dim": row(lambda: qkv(d=0)),
    # strides
    "bshd-storage": row(bshd_view, served=True, is_causal=True),
    "every-other-token": row(every_other_token, served=True),
    "expanded-kv-heads": row(expanded_kv_heads, served=True),
    # not dense tensors, autograd
    "query-list": row(lambda: ([1.0], *qkv()[1:]), T),
    "query-sparse": row(lambda: (qkv(dtype=torch.float32)[0].to_sparse(), *qkv()[1:]), R),
    "requires-grad": row(with_grad),
}


def outcome(sdpa: Callable[..., torch.Tensor], call: Call) -> torch.Tensor | Exception:
    args, kwargs = call.make()
    torch.manual_seed(0)
    try:
        return sdpa(*args, **kwargs)
    except Exception as error:  # the outcome under test
        return error


def assert_same(got: torch.Tensor | Exception, want: torch.Tensor | Exception) -> None:
    """The same exception type, or equal tensors (dtype, shape, values, NaNs)."""
    if isinstance(want, Exception):
        assert type(got) is type(want), f"torch raised {want!r}, sparsek gave {got!r}"
        return
    assert isinstance(got, torch.Tensor), f"torch answered, sparsek raised {got!r}"
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def routing_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sparsek.routing"]


CASES = [pytest.param(call, id=name) for name, call in TABLE.items()]


@pytest.fixture(autouse=True)
def _fresh_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_logged_reasons", set())
    monkeypatch.delenv("SPARSEK_STRICT", raising=False)


def test_the_table_records_torch() -> None:
    """Each row's `torch_does` is what torch does (checked on the recorded version)."""
    if not torch.__version__.startswith(RECORDED_WITH):
        pytest.skip(f"the table records torch {RECORDED_WITH}, this is {torch.__version__}")
    seen = {name: outcome(TORCH_SDPA, call) for name, call in TABLE.items()}
    does = {n: type(o) if isinstance(o, Exception) else ANSWERS for n, o in seen.items()}
    assert does == {name: call.torch_does for name, call in TABLE.items()}


def test_the_table_covers_both_outcomes() -> None:
    answered = [c for c in TABLE.values() if c.torch_does == ANSWERS]
    assert len(answered) >= 30 and len(TABLE) - len(answered) >= 20
    assert sum(c.served for c in TABLE.values()) >= 15


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("call", CASES)
def test_cpu_calls_match_torch(call: Call, strict: bool, monkeypatch, caplog) -> None:
    """CPU tensors: torch's answer or exception, never logged, never refused in strict
    mode (the documented CPU path), but for inputs that require grad (a fallback)."""
    if strict:
        monkeypatch.setenv("SPARSEK_STRICT", "1")
    want = outcome(TORCH_SDPA, call)
    with caplog.at_level(logging.WARNING, logger="sparsek.routing"):
        got = outcome(sparsek.scaled_dot_product_attention, call)
    if call is TABLE["requires-grad"]:
        if strict:
            assert isinstance(got, sparsek.UnsupportedError)
            assert got.reasons == [NEEDS_GRAD]
            return
        assert routing_messages(caplog) == [f"sparsek: falling back to torch SDPA: {NEEDS_GRAD}"]
        assert isinstance(got, torch.Tensor) and got.requires_grad
    else:
        assert routing_messages(caplog) == []
    assert_same(got, want)


# ------------------------------------------------- as if on CUDA (sm_90a), launch faked


def float32_kernel(causal: bool) -> Callable[..., None]:
    """A stand-in for a compiled forward kernel: attention in float32 over the (batch,
    seqlen, heads, head_dim) tensors it is launched with."""

    def kernel(q, k, v, out, lse, cu_q, cu_k, used_k, pages, counter, sinks, *rest):
        scale, offset = rest[3:5]  # (after the three descales)
        groups = q.shape[2] // k.shape[2]
        qf = q.float().transpose(1, 2)
        kf, vf = (t.float().transpose(1, 2).repeat_interleave(groups, dim=1) for t in (k, v))
        scores = qf @ kf.transpose(-1, -2) * scale
        if causal:
            rows = torch.arange(q.shape[1]).unsqueeze(1)
            scores = scores.masked_fill(torch.arange(k.shape[1]) > rows + offset, float("-inf"))
        out.copy_((scores.softmax(-1) @ vf).transpose(1, 2))
        lse.copy_(scores.logsumexp(-1))

    return kernel


@pytest.fixture
def as_on_sm90(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """CPU tensors routed as CUDA tensors on an sm_90a: `forward_path` answers as for CUDA,
    the registry as on sm_90a (its head dims and dtypes), kernels compute in float32
    (`float32_kernel`; one query per sequence stays on them rather than the decode
    kernels). Returns a list that counts the calls handed to torch's SDPA."""
    from fake_launch import fake_config, fake_launch_path

    from cutedsl_kernels import build

    fake_launch_path(monkeypatch, fake_config, float32_kernel(False))
    monkeypatch.setattr(launcher, "get_kernel", lambda config: float32_kernel(config.mask.causal))
    monkeypatch.setattr(dense, "decode_route", lambda *args: None)
    monkeypatch.setattr(build, "can_implement", lambda config: [])
    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    monkeypatch.setattr(
        api, "forward_path", lambda q, *o: routing.choose_path("cuda", routing.needs_grad(q, *o))
    )
    monkeypatch.setattr(
        api, "dense_blockers", lambda q, k, v, mask: routing.cuda_dense_blockers(0, q, v, mask)
    )
    handed = [0]

    def torch_sdpa(*args, **kwargs):
        handed[0] += 1
        return TORCH_SDPA(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", torch_sdpa)
    return handed


def float64_sdpa(call: Call) -> torch.Tensor:
    args, kwargs = call.make()
    tensors = [t.double() for t in args if isinstance(t, torch.Tensor)]
    return TORCH_SDPA(*tensors, **kwargs)


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("call", CASES)
def test_cuda_routing_matches_torch(call: Call, strict: bool, as_on_sm90, monkeypatch, caplog):
    """Served rows run the kernels and match torch; the rest get torch's answer (a logged
    fallback, or UnsupportedError in strict mode) or torch's exception."""
    if strict:
        monkeypatch.setenv("SPARSEK_STRICT", "1")
    want = outcome(TORCH_SDPA, call)
    with caplog.at_level(logging.WARNING, logger="sparsek.routing"):
        got = outcome(sparsek.scaled_dot_product_attention, call)
    messages = routing_messages(caplog)
    if isinstance(want, Exception):  # torch's exception, not a fallback's
        assert_same(got, want)
        assert messages == []
    elif call.served:
        assert as_on_sm90 == [0] and messages == []
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        assert got.shape == want.shape
        ref = float64_sdpa(call)
        torch_error = (want.double() - ref).abs().max() if ref.numel() else 0.0
        assert ((got.double() - ref).abs() <= 2 * torch_error + 1e-5).all()
    elif strict:
        assert isinstance(got, sparsek.UnsupportedError) and as_on_sm90 == [1]
    else:
        assert as_on_sm90 == [1] and len(messages) == 1
        assert_same(got, want)


def test_repeated_served_calls_match_torch(as_on_sm90) -> None:
    """The memoized plan of a served call keeps answering like torch."""
    call = TABLE["mqa-causal"]
    want = outcome(TORCH_SDPA, call)
    for _ in range(3):
        got = outcome(sparsek.scaled_dot_product_attention, call)
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert len(api._SERVED_SDPA) == 1 and as_on_sm90 == [0]


def test_served_calls_trace_into_one_graph(as_on_sm90) -> None:
    """The kernel check of the drop-in traces under torch.compile(fullgraph=True,
    dynamic=True) without specialising on the sequence length."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")

    def f(q, k, v):
        return sparsek.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    for sq, sk in ((9, 33), (17, 40), (30, 70)):
        q, k, v = qkv(sq=sq, sk=sk, h=8, hkv=2)
        torch._dynamo.mark_dynamic(q, 2)
        for t in (k, v):
            torch._dynamo.mark_dynamic(t, 2)
        want = TORCH_SDPA(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(compiled(q, k, v), want, atol=2e-3, rtol=2e-3)
    assert counter.frame_count == 1 and as_on_sm90 == [0]
