"""The CUDA launch plan of `attention_with_kvcache` (`sparsek.launch.kvcache`), on CPU.

The kernels are replaced by torch stand-ins that follow their contract (the kernel: the
attention of the rows it is handed, through the views the plan builds; split-KV: split 0
owns every key, the others none; the combine: a log-sum-exp merge). So these tests check
the plan (views of q/out/lse, decode grouping of heads, packed rows, lse staging, the
split path, copies of inputs TMA cannot read) against the float64 reference, and that a
repeated request is served from the memo. The kernels' own numerics are GPU tests.
"""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from test_kvcache import make_caches

from cutedsl_kernels.config import DENSE, ElementTypes, FmhaFwdConfig, Layout
from sparsek.launch import dense, kvcache, launcher
from sparsek.masks import CAUSAL, make_mask
from sparsek.reference import reference_attention
from sparsek.reference_varlen import reference_attention_kvcache
from sparsek.registry import dtype_name
from sparsek.tuning import DECODE_WORKLOADS, Workload

i32 = torch.int32
LENS = [1, 17, 64, 129, 300]

# (window, softcap, with sinks): each mask feature on its own and all together.
MASKS = [
    ((-1, -1), 0.0, True),
    ((-1, -1), 5.0, False),
    ((37, -1), 0.0, False),
    ((20, 3), 4.0, True),
]


def sinks_for(h: int) -> torch.Tensor:
    return torch.linspace(-1.0, 2.0, h)


def fake_kernel(causal: bool | None, layout: Layout | None):
    """A stand-in for the forward kernel of (causal, layout); causal None: the combine."""

    def combine(o_part, lse_part, out, lse, sinks) -> None:
        # The plan's precomputed partial shapes are the kernel views' with a split axis.
        assert o_part.shape[1:] == out.shape and lse_part.shape[1:] == lse.shape
        assert o_part.is_contiguous() and lse_part.is_contiguous()
        total = torch.logsumexp(lse_part, dim=0)  # -inf: a row that sees no key
        if sinks is not None:  # row (b, s, h): sinks[min(s, rows - 1), h]
            rows = torch.arange(lse.shape[-1]).clamp(max=sinks.shape[0] - 1)
            sink = sinks[rows].T.to(total.dtype)  # (h, s)
            total = torch.where(torch.isneginf(total), total, torch.logaddexp(total, sink))
        finite = torch.where(torch.isneginf(total), 0.0, total)
        weights = torch.exp(lse_part - finite).transpose(-1, -2).unsqueeze(-1)
        out.copy_((weights * o_part).sum(dim=0))
        lse.copy_(total)

    def attention(q, k, v, out, lse, cu_q, cu_k, seqused, table, counter, sinks, *scalars):
        q_descale, k_descale, v_descale, *scalars = scalars
        scale, offset, left, right, softcap, rows, splits, ctas = scalars
        # 16-bit queries; an FP8 cache comes with its descales, a 16-bit one without
        assert q_descale is None and (k_descale is None) == (k.dtype == q.dtype)
        assert (v_descale is None) == (k_descale is None)
        assert cu_k is None and counter is None and offset == 0 and ctas == 0
        assert (splits > 1) == layout.split_kv
        assert sinks is None or (splits == 1 and sinks.dim() == 2)  # (rows, heads); a split
        # kernel leaves the sinks to the combine
        mask = dict(causal=causal, window_size=(left, right), softcap=softcap)

        def reference(qx, keys, **kwargs):
            """The kernel's rows: sinks[min(row, rows - 1), head] for row i of qx;
            single_query: every row is the sequence's last token (its own one-row query)."""
            kw = dict(softmax_scale=scale, compute_dtype=torch.float64, **mask, **kwargs)
            kw.update(k_descale=k_descale, v_descale=v_descale)
            per_row = layout.single_query or (sinks is not None and sinks.shape[0] > 1)
            if not per_row:
                heads = None if sinks is None else sinks[0]
                return reference_attention_kvcache(qx, k, v, keys, table, sinks=heads, **kw)
            # A tile's rows are heads of one query: no causal mask; a window only for
            # single_query kernels (whose masks place every row at that query).
            assert qx.dim() == 4 and not causal
            assert layout.single_query or (left, right) == (-1, -1)
            sinks_ = sinks if sinks is not None else [None]
            parts = [
                reference_attention_kvcache(
                    qx[:, i : i + 1],
                    k,
                    v,
                    keys,
                    table,
                    sinks=sinks_[min(i, len(sinks_) - 1)],
                    **kw,
                )
                for i in range(qx.shape[1])
            ]
            return torch.cat([o for o, _ in parts], 1), torch.cat([s for _, s in parts], 2)

        assert (cu_q is not None) == layout.varlen_q and (table is not None) == (
            layout.kv_layout == "paged"
        )
        if layout.single_query and layout.varlen_q:  # the token of sequence b (`SeqInfo`)
            first, count = cu_q[:-1], cu_q[1:] - cu_q[:-1]
            empty_before = torch.arange(len(count)) - first
            token = torch.where(count > 0, first, cu_q[-1] + empty_before).long()
            keys = torch.where(count > 0, seqused, 0)
            o, s = reference(q[token], keys)
            o, s = torch.empty_like(o).index_copy_(0, token, o), s[token.argsort()]
        else:
            packed = dict(cu_seqlens_q=cu_q, max_seqlen_q=rows) if cu_q is not None else {}
            o, s = reference(q[0] if cu_q is not None else q, seqused, **packed)
            if cu_q is not None:
                o, s = o[None], s[None]
        if splits > 1:  # split 0 owns every key, the others none
            out.zero_()
            lse.fill_(float("-inf"))
            out, lse = out[0], lse[0]
        out.copy_(o)
        lse.copy_(s)

    return combine if causal is None else attention


class Kernels(list):
    """The kernels the plans loaded, in order: (causal, layout, workload) of each forward
    kernel, (None, None, None) of the combine. `asks` counts the plans' questions to
    `launcher.kernel_config`: one per plan built (two for a decode batch that fills the
    GPU), none for a request served from the memo."""

    asks = 0


@pytest.fixture
def fake_kernels(monkeypatch: pytest.MonkeyPatch) -> Kernels:
    built = Kernels()
    config = SimpleNamespace(tile_m=128, tile_n=128, ctas_per_sm=1)

    def kernel_config(*args: object) -> SimpleNamespace:
        built.asks += 1
        return config

    monkeypatch.setattr(launcher, "kernel_config", kernel_config)
    monkeypatch.setattr(launcher, "num_sms", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def forward_kernel(
        device, head_dim, dtype, mask, layout=DENSE, workload=Workload.DEFAULT, head_dim_v=None,
        cache_dtype=None,
    ):  # fmt: skip
        built.append((mask.causal, layout, workload))
        dtypes = ElementTypes.uniform(dtype_name(dtype))
        if cache_dtype is not None:
            dtypes = ElementTypes.fp8_cache(dtype_name(dtype))
        identity = FmhaFwdConfig(
            "sm_90a", head_dim, dtypes, mask, head_dim_v=head_dim_v, **asdict(layout)
        )
        return launcher.ForwardKernel(fake_kernel(mask.causal, layout), identity)

    def combine_kernel(device, head_dim, dtype, sinks=False):
        built.append((None, None, None))
        return fake_kernel(None, None)

    monkeypatch.setattr(launcher, "forward_kernel", forward_kernel)
    monkeypatch.setattr(launcher, "combine_kernel", combine_kernel)
    return built


def run(
    q, caches, *, causal=True, num_splits=0, cu=None, max_q=None, window=(-1, -1), softcap=0.0,
    sinks=None, descales=None,
):  # fmt: skip
    k, v, seqlens, *table = caches
    mask = make_mask(causal, window, softcap, sinks is not None)
    args = (q, k, v, seqlens, table[0] if table else None, cu, max_q, mask)
    return kvcache.attention_with_kvcache(*args, 0.25, num_splits, None, sinks, descales)


def reference(
    q, caches, *, causal=True, cu=None, max_q=None, window=(-1, -1), softcap=0.0, sinks=None,
    descales=(None, None),
):  # fmt: skip
    k, v, seqlens, *table = caches
    return reference_attention_kvcache(
        q, k, v, seqlens, table[0] if table else None, cu_seqlens_q=cu, max_seqlen_q=max_q,
        causal=causal, softmax_scale=0.25, window_size=window, softcap=softcap, sinks=sinks,
        compute_dtype=torch.float64, k_descale=descales[0], v_descale=descales[1],
    )  # fmt: skip


def check(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("num_splits", [1, 3, 0], ids=["no-split", "3-splits", "auto"])
def test_decode_over_an_fp8_cache(fake_kernels, paged, num_splits) -> None:
    """An FP8 cache under 16-bit queries: decode runs the converting kernels with the
    cache's descales (split or not; never the two-CTA tiles), and the result is the
    reference of the dequantized cache."""
    fp8 = torch.float8_e4m3fn
    (k, v), (kp, vp, table), seqlens = make_caches(LENS, 300, hkv=2)
    k, v, kp, vp = ((2 * t).to(fp8) for t in (k, v, kp, vp))
    caches = (kp, vp, seqlens, table) if paged else (k, v, seqlens)
    gen = torch.Generator().manual_seed(1)
    descales = tuple(torch.rand(len(LENS), 2, generator=gen) + 0.5 for _ in "kv")
    q = torch.randn(len(LENS), 1, 8, 32)
    got = run(q, caches, num_splits=num_splits, descales=descales)
    check(got, reference(q, caches, descales=descales))
    assert all(w is not Workload.DECODE_FILLS_GPU for *_, w in fake_kernels)


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_several_queries_per_sequence_over_an_fp8_cache(fake_kernels, packed, num_splits) -> None:
    """Chunked prefill over an FP8 cache (a serving engine's mixed batch when packed):
    the converting kernels of the causal mask, with the cache's descales (no dequantized
    copy), and the result is the reference of the dequantized cache."""
    fp8 = torch.float8_e4m3fn
    lens, q_lens = [5, 40, 300, 3], [2, 7, 1, 3]
    _, (kp, vp, table), seqlens = make_caches(lens, 300, hkv=2)
    caches = ((2 * kp).to(fp8), (2 * vp).to(fp8), seqlens, table)
    gen = torch.Generator().manual_seed(2)
    descales = tuple(torch.rand(len(lens), 2, generator=gen) + 0.5 for _ in "kv")
    if packed:
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=i32)
        q = torch.randn(int(cu[-1]), 4, 32)
        kw = {"cu": cu, "max_q": max(q_lens)}
    else:
        q, kw = torch.randn(len(lens), 3, 4, 32), {}
    got = run(q, caches, num_splits=num_splits, descales=descales, **kw)
    check(got, reference(q, caches, descales=descales, **kw))
    forward = [(c, w) for c, lt, w in fake_kernels if lt is not None]
    assert forward and all(c and w is Workload.DEFAULT for c, w in forward)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("num_splits", [1, 3, 0], ids=["no-split", "3-splits", "auto"])
@pytest.mark.parametrize(("h", "hkv"), [(8, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_decode_batched(fake_kernels, paged, num_splits, h, hkv) -> None:
    (k, v), (kp, vp, table), seqlens = make_caches(LENS, 300, hkv=hkv)
    caches = (kp, vp, seqlens, table) if paged else (k, v, seqlens)
    q = torch.randn(len(LENS), 1, h, 32)
    check(run(q, caches, num_splits=num_splits), reference(q, caches))
    # Decode: the group's heads are the rows of non-causal, non-packed launches.
    assert {c for c, *_ in fake_kernels} <= {False, None}
    assert all(
        lt is None or (wl in DECODE_WORKLOADS and not lt.varlen_q) for _, lt, wl in fake_kernels
    )


@pytest.mark.parametrize(
    ("sms", "num_splits", "fills"), [(4, 0, True), (4, 1, True), (4, 3, False), (132, 0, False)]
)
def test_decode_filling_the_gpu_takes_its_own_tiles(
    fake_kernels, monkeypatch: pytest.MonkeyPatch, sms: int, num_splits: int, fills: bool
) -> None:
    """A decode batch of at least one (sequence, KV head) tile per SM is never split and
    runs the `DECODE_FILLS_GPU` tiles (unless splits are asked for); smaller ones do not."""
    monkeypatch.setattr(launcher, "num_sms", lambda index: sms)
    (k, v), _, seqlens = make_caches(LENS, 300, hkv=1)  # 5 sequences x 1 KV head: 5 CTAs
    q = torch.randn(len(LENS), 1, 4, 32)
    check(run(q, (k, v, seqlens), num_splits=num_splits), reference(q, (k, v, seqlens)))
    ((layout, workload),) = {(lt, wl) for _, lt, wl in fake_kernels if lt is not None}
    assert (workload is Workload.DECODE_FILLS_GPU) == fills and workload in DECODE_WORKLOADS
    assert layout.split_kv != fills


def test_decode_filling_the_gpu_is_never_split(fake_kernels, monkeypatch) -> None:
    """Its tiles run two CTAs per SM and have no split variant: a long cache (16 key
    tiles here) is not split either."""
    monkeypatch.setattr(launcher, "num_sms", lambda index: 4)
    stand_in = launcher.kernel_config()  # the fixture's config of every request
    monkeypatch.setattr(stand_in, "ctas_per_sm", 2)
    (k, v), _, seqlens = make_caches(LENS, 2000, hkv=1)  # 16 key tiles of capacity
    q = torch.randn(len(LENS), 1, 4, 32)
    check(run(q, (k, v, seqlens)), reference(q, (k, v, seqlens)))
    ((layout, workload),) = {(lt, wl) for _, lt, wl in fake_kernels if lt is not None}
    assert workload is Workload.DECODE_FILLS_GPU and not layout.split_kv


def test_decode_packed_stages_lse_and_reads_strided_q(fake_kernels) -> None:
    (k, v), _, seqlens = make_caches(LENS, 300, hkv=2)
    q = torch.randn(len(LENS), 16, 32)[:, ::2]  # (total_q = batch, 8 heads, d), head stride 64
    cu = torch.arange(len(LENS) + 1, dtype=i32)
    got = run(q, (k, v, seqlens), num_splits=2, cu=cu, max_q=1)
    check(got, reference(q, (k, v, seqlens), cu=cu, max_q=1))
    assert got[1].shape == (8, len(LENS))  # (num_heads, total_q)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize(
    "cu", [[0, 0, 1, 2], [0, 1, 1, 2, 2, 3], [0, 0, 0, 0], [0, 1, 2, 3]], ids=str
)
def test_decode_packed_follows_cu_seqlens_q(fake_kernels, paged, num_splits, cu) -> None:
    """Packed decode (max_seqlen_q 1, total_q == batch) with empty sequences anywhere: each
    token is its own sequence's (through cu_seqlens_q, on the device), the tokens no
    sequence owns get 0 / -inf, and the plan is the same for every cu_seqlens_q."""
    lens = [40, 17, 300, 5, 129][: len(cu) - 1]
    (k, v), (kp, vp, table), seqlens = make_caches(lens, 300, hkv=2)
    caches = (kp, vp, seqlens, table) if paged else (k, v, seqlens)
    cu_q = torch.tensor(cu, dtype=i32)
    q = torch.randn(len(lens), 8, 32)
    got = run(q, caches, num_splits=num_splits, cu=cu_q, max_q=1)
    check(got, reference(q, caches, cu=cu_q, max_q=1))
    assert torch.isneginf(got[1][:, cu[-1] :]).all()
    assert all(lt is None or lt.single_query for _, lt, _ in fake_kernels)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_chunked_prefill_packed(fake_kernels, num_splits) -> None:
    lens = [5, 40, 300, 3]
    q_lens = [2, 7, 1, 3]
    _, (kp, vp, table), seqlens = make_caches(lens, 300, hkv=2)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=i32)
    q = torch.randn(int(cu[-1]) + 4, 4, 32)  # 4 rows past the last sequence: out 0, lse -inf
    caches = (kp, vp, seqlens, table)
    got = run(q, caches, num_splits=num_splits, cu=cu, max_q=max(q_lens))
    check(got, reference(q, caches, cu=cu, max_q=max(q_lens)))
    assert (got[0][-4:] == 0).all() and torch.isneginf(got[1][:, -4:]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_batched_multi_query(fake_kernels, causal) -> None:
    _, (kp, vp, table), seqlens = make_caches(LENS, 300, hkv=2)
    q = torch.randn(len(LENS), 3, 4, 32)
    check(
        run(q, (kp, vp, seqlens, table), causal=causal),
        reference(q, (kp, vp, seqlens, table), causal=causal),
    )


def test_unreadable_inputs_are_copied_and_planned_again(fake_kernels) -> None:
    (k, v), _, seqlens = make_caches(LENS, 300, hkv=2)
    q = torch.randn(len(LENS), 1, 4, 36)[..., :32]  # head stride 36: not a multiple of 8
    misaligned = torch.randn(k.numel() + 1)[1:].view(k.shape).copy_(k)
    check(run(q, (misaligned, v, seqlens)), reference(q, (k, v, seqlens)))
    assert fake_kernels.asks == 2  # the request's plan, then the copies'
    meta = (seqlens, None, None, None, CAUSAL, 0)  # what `run` passes
    assert not kvcache.kvcache_plan(q, misaligned, v, *meta).readable
    assert kvcache.kvcache_plan(q.contiguous(), k, v, *meta).readable  # the copies' signature
    assert fake_kernels.asks == 2  # both memoized


def test_repeated_requests_reuse_the_plan(fake_kernels) -> None:
    (k, v), _, seqlens = make_caches(LENS, 300, hkv=2)
    q = torch.randn(len(LENS), 1, 4, 32)
    run(q, (k, v, seqlens))
    loads = len(fake_kernels)
    for _ in range(3):
        fresh = torch.randn_like(q)
        check(run(fresh, (k, v, seqlens)), reference(fresh, (k, v, seqlens)))
    assert fake_kernels.asks == 1 and len(fake_kernels) == loads  # one plan
    run(q[:2], (k[:2], v[:2], seqlens[:2]))  # another shape: another plan
    assert fake_kernels.asks == 2


def test_empty_and_keyless_requests_launch_nothing(fake_kernels) -> None:
    (k, v), _, seqlens = make_caches(LENS, 300, hkv=2)
    out, lse = run(torch.randn(len(LENS), 1, 0, 32), (k[..., :0, :], v[..., :0, :], seqlens))
    assert out.numel() == 0 and fake_kernels == []
    q = torch.randn(len(LENS), 1, 4, 32)
    out, lse = run(q, (k[:, :0], v[:, :0], torch.zeros_like(seqlens)))
    assert (out == 0).all() and torch.isneginf(lse).all() and fake_kernels == []


@pytest.fixture
def no_dense_kernels(fake_kernels, monkeypatch: pytest.MonkeyPatch) -> Kernels:
    """`fake_kernels`, failing the test if a dense kernel is loaded."""
    cache_kernel = launcher.forward_kernel  # the fake's

    def forward_kernel(
        device, head_dim, dtype, mask, layout=DENSE, workload=Workload.DEFAULT, head_dim_v=None,
        cache_dtype=None,
    ):  # fmt: skip
        if layout == DENSE:
            pytest.fail("dense kernel loaded")
        return cache_kernel(device, head_dim, dtype, mask, layout, workload, head_dim_v)

    monkeypatch.setattr(launcher, "forward_kernel", forward_kernel)
    return fake_kernels


@pytest.mark.parametrize(
    ("causal", "top_left"), [(False, False), (True, False), (True, True)], ids=str
)
@pytest.mark.parametrize(("h", "hkv"), [(8, 2), (4, 4)])
def test_dense_single_queries_run_as_decode(no_dense_kernels, causal, top_left, h, hkv):
    """`sparsek.attention` with one query per sequence: planned as KV-cache decode over the
    dense K/V (its heads grouped per KV head); a top-left causal query sees key 0 only."""
    gen = torch.Generator().manual_seed(h + top_left)
    q = torch.randn(3, 1, h, 32, generator=gen)
    k, v = (torch.randn(3, 300, hkv, 32, generator=gen) for _ in range(2))
    plan = dense.dense_plan(q, k, v, make_mask(causal), 0.25, top_left)
    assert plan.decode is not None
    out, lse = dense.run_dense(plan, q, k, v)
    want, want_lse = reference_attention(
        q, k, v, causal=causal, causal_top_left=top_left, softmax_scale=0.25,
        compute_dtype=torch.float64,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    assert all(wl in DECODE_WORKLOADS for causal_, _, wl in no_dense_kernels if causal_ is not None)


@pytest.mark.parametrize(("window", "softcap", "with_sinks"), MASKS, ids=str)
def test_dense_single_queries_with_masks_run_as_decode(
    no_dense_kernels, window, softcap, with_sinks
):
    """`sparsek.attention` with one query per sequence and a window, softcap or sinks:
    the decode kernels too (bottom-right, as a cache aligns them), sinks passed per call."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 1, 8, 32, generator=gen)
    k, v = (torch.randn(3, 300, 2, 32, generator=gen) for _ in range(2))
    sinks = sinks_for(8) if with_sinks else None
    mask = make_mask(True, window, softcap, with_sinks)
    plan = dense.dense_plan(q, k, v, mask, 0.25, False)
    assert plan.decode is not None
    out, lse = dense.run_dense(plan, q, k, v, sinks=sinks)
    want, want_lse = reference_attention(
        q, k, v, causal=True, softmax_scale=0.25, window_size=window, softcap=softcap,
        sinks=sinks, compute_dtype=torch.float64,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_packed_rows_without_any_sequence_launch_nothing(fake_kernels, paged) -> None:
    """batch 0 (cu_seqlens_q = [0]) with padded packed rows and a nonzero max_seqlen_q: no
    kernel runs (they index per sequence); every row is 0 / -inf."""
    (k, v), (kp, vp, _), _ = make_caches(LENS, 300)
    seqlens = torch.zeros(0, dtype=torch.int32)
    caches = (
        (kp, vp, seqlens, torch.zeros(0, 20, dtype=torch.int32))
        if paged
        else (k[:0], v[:0], seqlens)
    )
    q = torch.randn(7, 4, 32)
    cu = torch.zeros(1, dtype=torch.int32)
    out, lse = run(q, caches, cu=cu, max_q=5)
    assert (out == 0).all() and torch.isneginf(lse).all() and lse.shape == (4, 7)
    assert fake_kernels == []


def test_decode_plan_first_made_during_graph_capture(fake_kernels, monkeypatch) -> None:
    """A dense single-query plan first made while a CUDA graph is captured: its device
    work (the cache-length fill) is recorded, not run (simulated: the fill leaves garbage
    while capturing). Later eager calls must not read that unfilled tensor."""
    capture = {"on": True}
    real_full = torch.full

    def full(*args, **kwargs):
        tensor = real_full(*args, **kwargs)
        return tensor.fill_(-7) if capture["on"] else tensor  # recorded, not run

    monkeypatch.setattr(torch, "full", full)
    monkeypatch.setattr(launcher, "capturing", lambda device: capture["on"], raising=False)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 1, 8, 32, generator=gen)
    k, v = (torch.randn(3, 300, 2, 32, generator=gen) for _ in range(2))
    plan = dense.dense_plan(q, k, v, CAUSAL, 0.25, False)
    assert plan.decode is not None and plan.lse_scratch is None
    capture["on"] = False  # the capture ended; eager calls follow
    for _ in range(2):
        out, lse = dense.run_dense(dense.dense_plan(q, k, v, CAUSAL, 0.25, False), q, k, v)
        want, want_lse = reference_attention(
            q, k, v, causal=True, softmax_scale=0.25, compute_dtype=torch.float64
        )
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("num_splits", [1, 3], ids=["no-split", "3-splits"])
@pytest.mark.parametrize(("window", "softcap", "with_sinks"), MASKS, ids=str)
def test_decode_with_masks(fake_kernels, paged, num_splits, window, softcap, with_sinks) -> None:
    """Batched and packed decode keep the heads-as-rows tiles with every mask: sinks read per
    (group row, KV head), left to the combine by split-KV partials; a window takes the
    single_query kernels, whose rows all sit at the sequence's last token."""
    (k, v), (kp, vp, table), seqlens = make_caches(LENS, 300, hkv=2)
    caches = (kp, vp, seqlens, table) if paged else (k, v, seqlens)
    mask = dict(window=window, softcap=softcap, sinks=sinks_for(8) if with_sinks else None)
    q = torch.randn(len(LENS), 1, 8, 32)
    check(run(q, caches, num_splits=num_splits, **mask), reference(q, caches, **mask))
    cu = torch.tensor([0, 1, 1, 2, 3, 4, 5], dtype=i32)  # an empty sequence, a padding token
    lens6 = [40, 0, 17, 300, 5, 129]
    (k6, v6), _, seqlens6 = make_caches(lens6, 300, hkv=2)
    caches_6 = (k6, v6, seqlens6)
    packed = torch.randn(6, 8, 32)
    got = run(packed, caches_6, num_splits=num_splits, cu=cu, max_q=1, **mask)
    check(got, reference(packed, caches_6, cu=cu, max_q=1, **mask))
    windowed = window != (-1, -1)
    layouts = [(lt, wl) for _, lt, wl in fake_kernels if lt is not None]
    # Decode tiles every time; batched queries take the single_query kernels for a window.
    assert all(wl in DECODE_WORKLOADS for _, wl in layouts)
    assert all(lt.single_query == (lt.varlen_q or windowed) for lt, _ in layouts)
    assert any(lt.split_kv for lt, _ in layouts) == (num_splits > 1)


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize(("window", "softcap", "with_sinks"), MASKS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_prefill_with_masks(fake_kernels, num_splits, window, softcap, with_sinks, causal):
    lens = [5, 40, 300, 3]
    q_lens = [2, 7, 1, 3]
    _, (kp, vp, table), seqlens = make_caches(lens, 300, hkv=2)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=i32)
    q = torch.randn(int(cu[-1]) + 4, 4, 32)
    caches = (kp, vp, seqlens, table)
    mask = dict(
        causal=causal, window=window, softcap=softcap, sinks=sinks_for(4) if with_sinks else None
    )
    got = run(q, caches, num_splits=num_splits, cu=cu, max_q=max(q_lens), **mask)
    check(got, reference(q, caches, cu=cu, max_q=max(q_lens), **mask))
    assert (got[0][-4:] == 0).all() and torch.isneginf(got[1][:, -4:]).all()
