"""The `sparsek::attention` torch op on CPU: opcheck, fake tensors, torch.compile, launch logic.

Compared against: the float32 reference (`sparsek.reference`) in eager mode, and the op's
own eager results under torch.compile. The CUDA launch path is exercised with CPU tensors
and a fake kernel that records its arguments (no GPU, no DSL).
"""

from __future__ import annotations

import pytest
import torch
from fake_launch import fake_config, fake_launch_path
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsek
from cutedsl_kernels.config import DENSE
from sparsek import memo, ops, registry, routing, tuning
from sparsek.launch import dense, launcher, tma
from sparsek.masks import CAUSAL, NO_MASK
from sparsek.reference import reference_attention
from sparsek.tuning import Workload

op = torch.ops.sparsek.attention


def inputs(b=2, sq=16, sk=24, h=4, hkv=2, d=32, dtype=torch.float32, bhsd=False):
    gen = torch.Generator().manual_seed(sq + 7 * sk)
    if bhsd:  # (B, H, S, D) storage viewed as (B, S, H, D): what SDPA users hold.
        make = lambda s, n: torch.randn(b, n, s, d, generator=gen, dtype=dtype).transpose(1, 2)  # noqa: E731
    else:
        make = lambda s, n: torch.randn(b, s, n, d, generator=gen, dtype=dtype)  # noqa: E731
    return make(sq, h), make(sk, hkv), make(sk, hkv)


@pytest.mark.parametrize("bhsd", [False, True], ids=["contiguous", "permuted"])
@pytest.mark.parametrize(
    ("causal", "top_left"), [(False, False), (True, False), (True, True)], ids=["full", "br", "tl"]
)
def test_opcheck(bhsd: bool, causal: bool, top_left: bool) -> None:
    q, k, v = inputs(bhsd=bhsd)
    torch.library.opcheck(op, (q, k, v, causal, 0.125, top_left))


def test_eager_matches_reference() -> None:
    q, k, v = inputs(sq=20, sk=9, bhsd=True)
    out, lse = op(q, k, v, True, 0.2, False)
    want_out, want_lse = reference_attention(q, k, v, causal=True, softmax_scale=0.2)
    assert out.is_contiguous() and out.shape == q.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    assert (out[:, :11] == 0).all() and torch.isneginf(lse[:, :, :11]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_impl_shapes_dtypes_strides(dtype: torch.dtype) -> None:
    with FakeTensorMode():
        q, k, v = inputs(b=3, sq=17, sk=5, h=8, hkv=1, d=64, dtype=dtype, bhsd=True)
        out, lse = op(q, k, v, True, 0.125, False)
    assert out.shape == (3, 17, 8, 64) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (3, 8, 17) and lse.dtype == torch.float32 and lse.is_contiguous()


def test_torch_compile_one_graph_for_all_seqlens() -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v):
        out, lse = op(q, k, v, True, 0.125, False)
        return out * 2, lse

    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    for sq, sk in [(33, 65), (64, 64), (100, 31), (257, 300)]:
        q, k, v = inputs(sq=sq, sk=sk)
        got, got_lse = compiled(q, k, v)
        want, want_lse = f(q, k, v)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_lse, want_lse)
    assert counter.frame_count == 1


def compiled_frames(fn, seqlens, mark_seqlen_dynamic: bool = False) -> int:
    """Frames `torch.compile(fn, fullgraph=True, dynamic=True)` compiles over B2 H8 d128
    bf16 q/k/v of these sequence lengths (`mark_seqlen_dynamic`: the sequence dim is
    marked dynamic on every input before the call, the user-side way out of duck sizing)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for s in seqlens:
        gen = torch.Generator().manual_seed(s)
        q, k, v = (torch.randn(2, s, 8, 128, generator=gen).bfloat16() for _ in range(3))
        if mark_seqlen_dynamic:
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 1)
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    return counter.frame_count


def test_torch_compile_dynamic_recompiles_only_for_duck_sizing() -> None:
    """`sparsek.attention` under torch.compile(dynamic=True) at seqlen 128, 300, 1000: the
    one recompile is torch's duck sizing (the first call's seqlen 128 equals head_dim 128,
    so dynamo assumes they are one size and guards on it), which torch SDPA gets too; no
    guard of sparsek's own specialises a size. Marking the sequence dim dynamic (or
    `torch.fx.experimental._config.use_duck_shape = False`) gives one frame."""

    def ours(q, k, v):
        return sparsek.attention(q, k, v, causal=True)

    def sdpa(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return out.transpose(1, 2)

    duck = (128, 300, 1000)
    assert compiled_frames(ours, duck) == compiled_frames(sdpa, duck) <= 2
    assert compiled_frames(ours, duck, mark_seqlen_dynamic=True) == 1
    assert compiled_frames(ours, (129, 300, 1000)) == 1


def test_torch_compile_public_api_cpu_fallback() -> None:
    """The Python layer (validation, dispatch, fallback) traces without graph breaks."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")

    def f(q, k, v):
        return sparsek.attention(q, k, v, causal=True)

    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    for sq in (16, 40, 72):
        q, k, v = inputs(sq=sq, sk=sq)
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    assert counter.frame_count == 1


def test_registry_check_is_constant_under_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA dispatch decision is folded to a constant (no tracing into the registry)."""
    from cutedsl_kernels import build

    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    monkeypatch.setattr(build, "can_implement", lambda c: [])
    torch._dynamo.reset()

    def f(x):
        head_dim = routing.static_head_dim(x.shape[-1])
        reasons = routing.registry_blockers(0, head_dim, "bfloat16", "causal")
        return x + len(reasons)

    x = torch.zeros(4, 128)
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), x)
    y = torch.zeros(4, 80)
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(y), y + 1)


# -------------------------------------------------------------- CUDA launch path, faked


class RecordingKernel:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.masks: list[tuple] = []

    def __call__(self, q, k, v, out, lse, *rest) -> None:
        # Dense launches pass no sequence metadata or tile counter, max_seqlen_q 0, one
        # split and the SM count (a persistent kernel's CTAs).
        *metadata, sinks, qd, kd, vd, scale, offset, left, right, softcap = rest[:-3]
        max_seqlen_q, splits, ctas = rest[-3:]
        assert (qd, kd, vd) == (None, None, None)  # 16-bit inputs: no descales
        assert (*metadata, max_seqlen_q, splits, ctas) == (None, None, None, None, None, 0, 1, 132)
        self.calls.append((q, k, v, out, lse, scale, offset))
        self.masks.append((left, right, softcap, sinks))
        out.fill_(1.0)
        lse.fill_(2.0)


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> RecordingKernel:
    kernel = RecordingKernel()
    fake_launch_path(monkeypatch, fake_config, kernel)
    return kernel


@pytest.mark.parametrize(
    ("sq", "sk", "causal", "top_left", "offset"),
    [
        (16, 24, True, False, 8),
        (16, 24, True, True, 0),
        (24, 16, True, False, -8),
        (5, 9, False, False, 0),
    ],
)
def test_launch_arguments(fake_kernel, sq, sk, causal, top_left, offset) -> None:
    q, k, v = inputs(sq=sq, sk=sk, bhsd=True)
    out, lse = dense.attention(q, k, v, causal, 0.5, top_left)
    [(kq, kk, kv, kout, klse, scale, koff)] = fake_kernel.calls
    assert kq is q and kk is k and kv is v  # permuted BHSD views satisfy TMA: no copies
    assert kout is out and klse is lse and scale == 0.5 and koff == offset
    assert out.shape == q.shape and lse.shape == (2, 4, sq)
    assert out.is_contiguous() and lse.is_contiguous()


@pytest.mark.parametrize(
    ("causal", "window", "softcap", "want_window", "want_offset"),
    [
        (False, (-1, -1), 0.0, (-1, -1), 0),  # no mask: no offset either
        (True, (-1, -1), 0.0, (-1, -1), 8),
        (True, (5, -1), 0.0, (5, 0), 8),  # causal window: right 0
        (False, (5, 3), 30.0, (5, 3), 8),  # windows align bottom-right like causal
    ],
)
def test_launch_arguments_of_masks(
    fake_kernel, causal, window, softcap, want_window, want_offset
) -> None:
    q, k, v = inputs(sq=16, sk=24, bhsd=True)
    sinks = torch.randn(4)
    dense.attention(q, k, v, causal, 0.5, False, *window, softcap, sinks)
    [(*_, scale, offset)] = fake_kernel.calls
    [(left, right, cap, ksinks)] = fake_kernel.masks
    assert (left, right, cap, offset, scale) == (*want_window, softcap, want_offset, 0.5)
    assert ksinks.shape == (1, 4) and ksinks.data_ptr() == sinks.data_ptr()


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 1), (2, 0, 3, 4), (0, 5), (7,), ()])
def test_contiguous_strides_match_torch(shape: tuple[int, ...]) -> None:
    assert launcher.contiguous_strides(shape) == torch.empty(shape).stride()


@pytest.mark.parametrize(
    ("shape_q", "shape_k"),
    [
        ((0, 8, 4, 32), (0, 8, 2, 32)),
        ((2, 0, 4, 32), (2, 8, 2, 32)),
        ((2, 8, 0, 32), (2, 8, 0, 32)),
    ],
)
def test_zero_size_launches_nothing(fake_kernel, shape_q, shape_k) -> None:
    out, _ = dense.attention(
        torch.randn(shape_q), torch.randn(shape_k), torch.randn(shape_k), True, 0.5, False
    )
    assert fake_kernel.calls == [] and out.shape == shape_q and out.numel() == 0


def test_no_keys_gives_zero_rows_without_launch(fake_kernel) -> None:
    q, k = torch.randn(2, 8, 4, 32), torch.randn(2, 0, 2, 32)
    out, lse = dense.attention(q, k, k, False, 0.5, False)
    assert fake_kernel.calls == []
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_repeated_requests_reuse_their_plan_and_still_check_pointers(
    fake_kernel, monkeypatch
) -> None:
    """A signature is planned once (one registry lookup for all calls); another stride
    gets its own plan; a misaligned base is copied on every call even when its
    signature's plan says the strides are readable; unreadable strides are copied."""
    asked: list[tuple] = []
    monkeypatch.setattr(launcher, "get_kernel", lambda config: asked.append(config) or fake_kernel)
    q, k, v = inputs(sq=9, sk=13, bhsd=True)
    for _ in range(3):
        dense.attention(q, k, v, True, 0.5, False)
    plan = dense.dense_plan(q, k, v, CAUSAL, 0.5, False)
    assert dense.dense_plan(q, k, v, CAUSAL, 0.5, False) is plan  # memoized: planned once
    assert len(asked) == 1 and len(fake_kernel.calls) == 3
    flat = torch.randn(q.numel() + 1)
    misaligned = flat[1:].view(q.shape)  # the contiguous signature, base 4 bytes off
    aligned = flat[:-1].view(q.shape)
    for query in (aligned, misaligned, aligned):
        dense.attention(query, k, v, True, 0.5, False)
    sent = [call[0] for call in fake_kernel.calls[3:]]
    assert sent[0] is aligned and sent[2] is aligned
    contiguous_plan = dense.dense_plan(aligned, k, v, CAUSAL, 0.5, False)
    assert contiguous_plan is not plan  # another stride: its own plan ...
    # ... and one per signature, whatever its base pointer
    assert dense.dense_plan(misaligned, k, v, CAUSAL, 0.5, False) is contiguous_plan
    assert sent[1] is not misaligned and sent[1].data_ptr() % 16 == 0
    assert torch.equal(sent[1], misaligned)
    odd = torch.randn(2, 9, 4, 36)[..., :32]  # row stride 36: not a multiple of 8
    dense.attention(odd, k, v, True, 0.5, False)
    assert fake_kernel.calls[-1][0].is_contiguous() and torch.equal(fake_kernel.calls[-1][0], odd)
    assert len(asked) == 1  # one (head_dim, dtype, causal) kernel throughout


def test_plan_memo_is_bounded(fake_kernel, monkeypatch) -> None:
    """Past `memo.MAX_ENTRIES` plans the memo starts afresh: the oldest signatures are
    planned again, the newest stay memoized."""
    monkeypatch.setattr(memo, "MAX_ENTRIES", 3)
    plans = []
    for sq in range(1, 6):
        dense.attention(*inputs(sq=sq, sk=4), False, 0.5, False)
        plans.append(dense.dense_plan(*inputs(sq=sq, sk=4), NO_MASK, 0.5, False))
    assert len(fake_kernel.calls) == 5
    assert dense.dense_plan(*inputs(sq=5, sk=4), NO_MASK, 0.5, False) is plans[-1]
    assert dense.dense_plan(*inputs(sq=1, sk=4), NO_MASK, 0.5, False) is not plans[0]
    bounded: dict[int, int] = {}
    for key in range(5):
        memo.remember(bounded, key, key)
        assert 1 <= len(bounded) <= 3


def test_tma_compatible_copies_only_when_needed() -> None:
    base = torch.randn(2, 4, 16, 64)
    permuted = base.transpose(1, 2)
    assert tma.tma_compatible(permuted) is permuted
    assert tma.tma_compatible(base) is base
    bad_last = torch.randn(2, 16, 4, 128)[..., ::2]
    odd_stride = torch.randn(2, 16, 4, 68)[..., :64]
    misaligned = torch.randn(2 * 16 * 4 * 64 + 1)[1:].view(2, 16, 4, 64)
    expanded = torch.randn(1, 16, 4, 64).expand(3, 16, 4, 64)
    for t in (bad_last, odd_stride, misaligned, expanded):
        fixed = tma.tma_compatible(t)
        assert fixed is not t and fixed.is_contiguous() and fixed.data_ptr() % 16 == 0
        assert torch.equal(fixed, t)


def test_eager_calls_skip_the_dispatcher_but_modes_and_compile_do_not(monkeypatch) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []

    def direct(q, k, v, causal, scale, top_left, *mask_args):
        calls.append("direct")
        return q, q.new_empty(q.shape[0], q.shape[2], q.shape[1])

    monkeypatch.setattr(dense, "attention", direct)
    q = torch.randn(1, 8, 2, 16)
    ops.call_attention(q, q, q, False, 0.25, False)
    assert calls == ["direct"]
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        out, lse = ops.call_attention(fq, fq, fq, False, 0.25, False)  # the op's fake impl
    assert calls == ["direct"] and out.shape == q.shape and lse.shape == (1, 2, 8)


def recording_lookup(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The (faked) registry lookups of kernel loads: each one's arguments."""
    asked: list[tuple] = []
    monkeypatch.setattr(launcher, "lookup", lambda *a: asked.append(a) or fake_config(*a))
    return asked


def test_long_causal_queries_take_the_long_workload(fake_kernel, monkeypatch) -> None:
    asked = recording_lookup(monkeypatch)
    loads: list[object] = []
    monkeypatch.setattr(launcher, "get_kernel", lambda config: loads.append(config) or fake_kernel)
    n = tuning.LONG_SEQLEN_Q
    for sq, causal in ((n, True), (n - 1, True), (n, False), (n + 1, True)):
        q, k = torch.randn(1, sq, 3, 32), torch.randn(1, sq, 1, 32)  # > 132 tiles of 64
        dense.attention(q, k, k, causal, 0.5, False)
    workloads = [args[5] for args in asked]  # `lookup` is faked: its arguments
    assert workloads == [Workload.LONG_Q, Workload.DEFAULT, Workload.DEFAULT]  # memoized per key
    assert [args[4] for args in asked] == [DENSE] * 3
    assert len(loads) == 3 and len(fake_kernel.calls) == 4


def test_problems_of_one_wave_take_the_one_wave_workload(fake_kernel, monkeypatch) -> None:
    """batch x heads x 64-row query tiles <= the SMs (132 here): ONE_WAVE, also for long
    causal queries; one tile more: the other workloads."""
    asked = recording_lookup(monkeypatch)
    cases = [
        ((1, 512, 8), False, Workload.ONE_WAVE),
        ((2, 33 * 64, 2), True, Workload.ONE_WAVE),  # 132 tiles
        ((2, 33 * 64 + 1, 2), False, Workload.DEFAULT),  # 136
        ((1, 1, 132), False, Workload.ONE_WAVE),
        ((1, 1, 133), True, Workload.DEFAULT),
        ((1, 66 * 64, 2), True, Workload.ONE_WAVE),  # long causal, yet one wave
        ((1, 4096, 3), True, Workload.LONG_Q),
    ]
    for (b, sq, h), causal, want in cases:
        assert dense.dense_workload(b, sq, h, causal, 132) is want, (b, sq, h, causal)
    for (b, sq, h), causal, _ in cases[:3]:  # the plan asks for the workload's kernel
        q, k = torch.randn(b, sq, h, 32), torch.randn(b, 7, 1, 32)
        dense.attention(q, k, k, causal, 0.5, False)
    assert [args[5] for args in asked] == [c[-1] for c in cases[:3]]


def test_dynamic_kernels_get_a_zeroed_tile_counter_per_call(monkeypatch) -> None:
    causal = registry.mask_of(True)
    config = registry.lookup("sm_90a", 128, "bfloat16", causal, DENSE, Workload.LONG_Q)
    assert config.dynamic_schedule
    counters: list[torch.Tensor] = []

    def kernel(q, k, v, out, lse, *rest) -> None:
        *metadata, counter = rest[:5]
        # no sinks, no descales; scale, offset, window, softcap, max_seqlen_q, splits, SMs
        assert metadata == [None, None, None, None] and rest[5:9] == (None, None, None, None)
        assert rest[9:] == (0.5, 0, -1, -1, 0.0, 0, 1, 132)
        assert counter.dtype == torch.int32 and counter.tolist() == [0]
        counters.append(counter)
        counter.add_(7)  # what the kernel leaves behind must not reach the next call

    fake_launch_path(monkeypatch, lambda *a: config, kernel)
    q = torch.randn(1, tuning.LONG_SEQLEN_Q, 2, 128, dtype=torch.bfloat16)
    for _ in range(2):
        dense.attention(q, q, q, True, 0.5, False)
    assert len(counters) == 2 and counters[0] is not counters[1]


def test_clear_all_empties_the_launch_path_memos(fake_kernel, monkeypatch) -> None:
    """`memo.clear_all` drops every memoized answer: plans, loaded kernels, registry
    answers; the next request plans and loads again."""
    loads: list[object] = []
    monkeypatch.setattr(launcher, "get_kernel", lambda config: loads.append(config) or fake_kernel)
    q, k, v = inputs(sq=9, sk=13)
    dense.attention(q, k, v, True, 0.5, False)
    plan = dense.dense_plan(q, k, v, CAUSAL, 0.5, False)
    mask = registry.mask_of(True)
    kernel = launcher.forward_kernel(q.device, 32, q.dtype, mask, DENSE, Workload.ONE_WAVE)
    assert kernel is plan.kernel and len(loads) == 1  # 8 query tiles: one wave
    registry.find("sm_90a", 64, "bfloat16", registry.mask_of(False))
    assert registry.find.cache_info().currsize > 0
    memo.clear_all()
    assert registry.find.cache_info().currsize == 0
    assert dense.dense_plan(q, k, v, CAUSAL, 0.5, False) is not plan
    assert len(loads) == 2  # the kernel was loaded again for the new plan
    dense.attention(q, k, v, True, 0.5, False)
    assert len(loads) == 2 and len(fake_kernel.calls) == 2


def test_kv_expanded_over_heads_is_read_in_place(fake_kernel) -> None:
    """K/V broadcast over heads (`expand` of one head: stride 0) reach the kernel as their
    one KV head, a view of the caller's storage (MQA), not as a copy of 4 equal heads."""
    q, k1, v1 = inputs(sq=9, sk=13, hkv=1)
    k, v = k1.expand(2, 13, 4, 32), v1.expand(2, 13, 4, 32)
    dense.attention(q, k, v, True, 0.5, False)
    [(_, kk, kv, *_)] = fake_kernel.calls
    assert kk.shape == (2, 13, 1, 32) and kk.data_ptr() == k1.data_ptr()
    assert kv.shape == (2, 13, 1, 32) and kv.data_ptr() == v1.data_ptr()


def test_one_kv_head_is_exact() -> None:
    """Attention over expanded K/V equals attention over their one head (the reference)."""
    q, k1, v1 = inputs(sq=9, sk=13, hkv=1)
    k, v = k1.expand(2, 13, 4, 32), v1.expand(2, 13, 4, 32)
    k_one, v_one = tma.one_kv_head(k, v)
    assert k_one.shape[2] == 1 and v_one.shape[2] == 1
    for got, want in zip(
        reference_attention(q, k_one, v_one, causal=True, compute_dtype=torch.float64),
        reference_attention(q, k, v, causal=True, compute_dtype=torch.float64),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
    other = k1.expand(2, 13, 4, 32).contiguous()
    assert tma.one_kv_head(other, v)[0] is other  # not broadcast: as it is
