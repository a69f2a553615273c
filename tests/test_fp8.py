"""FP8 (float8_e4m3fn) inputs on CPU: their checks, their result, the ops, the route a
CUDA request takes, the registry's FP8 kernels and the key-major copy of V they read.

Compared against: `fp8_oracle.oracle`, textbook attention in float64 of the inputs
dequantized one head at a time from the definition in `sparsek/fp8.py`. Tolerance: the CPU
path computes in float32 and rounds the output once to `out_dtype`, so the bound is a
few units of that type's rounding of |out| (<= max|v| * max descale): rtol 2**-7
(bfloat16) or 2**-10 (float16) of the output's magnitude, LSE atol 1e-4.
"""

from __future__ import annotations

import logging

import pytest
import torch
from fp8_oracle import FP8, oracle

import sparsek
from cutedsl_kernels.config import ElementTypes
from sparsek.errors import UnsupportedError

RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def fp8_inputs(gen, batch, sq, sk, heads, kv_heads, dim, dim_v=None):
    """q, k, v in FP8 (values from N(0, 3^2), saturating e4m3's +-448 never) and their
    (batch, kv_heads) descales in [0.1, 1.1)."""
    dim_v = dim if dim_v is None else dim_v
    q = (3 * torch.randn(batch, sq, heads, dim, generator=gen)).to(FP8)
    k = (3 * torch.randn(batch, sk, kv_heads, dim, generator=gen)).to(FP8)
    v = (3 * torch.randn(batch, sk, kv_heads, dim_v, generator=gen)).to(FP8)
    descales = [torch.rand(batch, kv_heads, generator=gen) + 0.1 for _ in range(3)]
    return q, k, v, descales


def check_close(out, lse, want_out, want_lse, out_dtype):
    assert out.dtype == out_dtype and lse.dtype == torch.float32
    bound = RTOL[out_dtype] * max(want_out.abs().max().item(), 1e-3)
    assert (out.double() - want_out).abs().max().item() <= bound
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = ~torch.isneginf(want_lse)
    assert (lse.double()[finite] - want_lse[finite]).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------ results


@pytest.mark.parametrize(
    ("batch", "sq", "sk", "heads", "kv_heads", "causal", "window", "out_dtype"),
    [
        (2, 37, 45, 4, 2, True, (-1, -1), None),  # GQA, Sq < Sk, odd lengths
        (1, 50, 20, 4, 4, True, (-1, -1), torch.float16),  # Sq > Sk: early rows see nothing
        (3, 16, 16, 6, 1, False, (-1, -1), torch.bfloat16),  # MQA, non-causal
        (2, 33, 33, 4, 2, False, (4, 2), None),  # a two-sided window
    ],
)
def test_fp8_attention_is_attention_of_the_dequantized_inputs(
    batch, sq, sk, heads, kv_heads, causal, window, out_dtype
) -> None:
    gen = torch.Generator().manual_seed(sq * 100 + sk)
    q, k, v, descales = fp8_inputs(gen, batch, sq, sk, heads, kv_heads, 32)
    out, lse = sparsek.attention(
        q, k, v, causal=causal, window_size=window, return_lse=True,
        q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
        out_dtype=out_dtype,
    )  # fmt: skip
    want_out, want_lse = oracle(q, k, v, descales, causal, window)
    check_close(out, lse, want_out, want_lse, out_dtype or torch.bfloat16)
    if causal and sq > sk:
        assert torch.all(out[:, : sq - sk] == 0)


def test_descales_matter_and_a_per_tensor_scale_passes_as_an_expanded_view() -> None:
    """Each descale changes the result (none is dropped), and a (1, 1) scale expanded to
    (batch, kv_heads) with stride 0 is accepted and equals the materialized one."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, descales = fp8_inputs(gen, 2, 9, 11, 4, 2, 16)
    base = sparsek.attention(q, k, v, q_descale=descales[0], k_descale=descales[1],
                             v_descale=descales[2])  # fmt: skip
    for i in range(3):
        changed = list(descales)
        changed[i] = changed[i] * 2
        other = sparsek.attention(q, k, v, q_descale=changed[0], k_descale=changed[1],
                                  v_descale=changed[2])  # fmt: skip
        assert not torch.allclose(base, other)
    scale = torch.tensor([[0.5]]).expand(2, 2)
    assert scale.stride() == (0, 0)
    expanded = sparsek.attention(q, k, v, q_descale=scale, k_descale=scale, v_descale=scale)
    full = torch.full((2, 2), 0.5)
    materialized = sparsek.attention(q, k, v, q_descale=full, k_descale=full, v_descale=full)
    torch.testing.assert_close(expanded, materialized, rtol=0, atol=0)


def test_fp8_varlen_is_dense_fp8_per_sequence() -> None:
    """Packed sequences (one of length 0, padding rows past the last one) with a descale
    row per sequence give each sequence's dense FP8 result; padding rows give 0."""
    gen = torch.Generator().manual_seed(3)
    q_lens, k_lens = [5, 0, 12], [9, 4, 12]
    heads, kv_heads, dim = 4, 2, 16
    seqs = [
        fp8_inputs(gen, 1, sq, sk, heads, kv_heads, dim)
        for sq, sk in zip(q_lens, k_lens, strict=True)
    ]
    pad_q = (3 * torch.randn(3, heads, dim, generator=gen)).to(FP8)
    q = torch.cat([*(s[0][0] for s in seqs), pad_q])
    k = torch.cat([s[1][0] for s in seqs])
    v = torch.cat([s[2][0] for s in seqs])
    descales = [torch.cat([s[3][i] for s in seqs]) for i in range(3)]
    cu_q = torch.tensor([0, 5, 5, 17], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 13, 25], dtype=torch.int32)
    out, lse = sparsek.attention_varlen(
        q, k, v, cu_q, cu_k, 12, 12, causal=True, return_lse=True, out_dtype=torch.float16,
        q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
    )  # fmt: skip
    assert out.dtype == torch.float16 and out.shape == (20, heads, dim)
    for b, (sq, _) in enumerate(zip(q_lens, k_lens, strict=True)):
        sq_, sk_, d = seqs[b][0], seqs[b][1], seqs[b][3]
        want_out, want_lse = oracle(sq_, sk_, seqs[b][2], d, causal=True)
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        if sq:
            check_close(out[rows][None], lse[:, rows][None], want_out, want_lse, torch.float16)
    assert torch.all(out[17:] == 0) and torch.all(torch.isneginf(lse[:, 17:]))


# ------------------------------------------------------------------------ checks

GOOD = object()  # stands for the matching good descale


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        ({"v_descale": None}, ValueError, "v_descale is required with float8_e4m3fn"),
        ({"q_descale": "x"}, TypeError, "q_descale must be a float32 tensor"),
        ({"k_descale": torch.ones(2, 2, dtype=torch.float64)}, TypeError, "k_descale has dtype"),
        ({"q_descale": torch.ones(1, 2)}, ValueError, r"q_descale has shape \(1, 2\); it must"),
        ({"v_descale": torch.ones(2, 4)}, ValueError, r"\(batch, num_kv_heads\) = \(2, 2\)"),
        ({"q_descale": torch.ones(2, 2, device="meta")}, ValueError, "q_descale.device=meta"),
        ({"out_dtype": torch.float32}, ValueError, "out_dtype=torch.float32 is not supported"),
        ({"out_dtype": "bfloat16"}, TypeError, "out_dtype must be a torch.dtype"),
    ],
)
def test_bad_fp8_arguments_name_the_argument(change, error, fragment) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v, descales = fp8_inputs(gen, 2, 5, 6, 4, 2, 16)
    kwargs = dict(zip(("q_descale", "k_descale", "v_descale"), descales, strict=True))
    kwargs.update(change)
    with pytest.raises(error, match=fragment):
        sparsek.attention(q, k, v, **kwargs)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(error, match=fragment):
        sparsek.attention_varlen(q.flatten(0, 1), k[:, :5].flatten(0, 1),
                                 v[:, :5].flatten(0, 1), cu, cu, 5, 5, **kwargs)  # fmt: skip


def test_fp8_arguments_with_16_bit_inputs_and_other_8_bit_types_are_refused() -> None:
    q = torch.randn(1, 5, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q_descale applies to float8_e4m3fn inputs only"):
        sparsek.attention(q, q, q, q_descale=torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"out_dtype=torch\.float16 applies to float8_e4m3fn"):
        sparsek.attention(q, q, q, out_dtype=torch.float16)
    assert sparsek.attention(q, q, q, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    e5m2 = q.to(torch.float8_e5m2)
    ones = torch.ones(1, 2)
    with pytest.raises(TypeError, match=r"the supported 8-bit type is torch\.float8_e4m3fn"):
        sparsek.attention(e5m2, e5m2, e5m2, q_descale=ones, k_descale=ones, v_descale=ones)
    with pytest.raises(ValueError, match=r"k\.dtype=torch\.bfloat16 must equal q\.dtype"):
        sparsek.attention(q.to(FP8), q, q.to(FP8), q_descale=ones, k_descale=ones,
                          v_descale=ones)  # fmt: skip


# ------------------------------------------------------------------------ ops


def test_the_ops_take_fp8_inputs_and_out_dtype() -> None:
    """Schema and fake implementations: the output takes `out_dtype`. (opcheck's schema
    test compares the inputs with torch.allclose, which float8 CPU tensors do not
    implement; the fake, registration and AOT-dispatch tests run.)"""
    from torch.library import opcheck

    gen = torch.Generator().manual_seed(1)
    q, k, v, (dq, dk, dv) = fp8_inputs(gen, 2, 7, 9, 4, 2, 16)
    tests = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    args = (q, k, v, True, 0.25, False, -1, -1, 0.0, None, dq, dk, dv, torch.float16)
    opcheck(torch.ops.sparsek.attention.default, args, test_utils=tests)
    out, lse = torch.ops.sparsek.attention(*args)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    cu = torch.tensor([0, 7, 14], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 18], dtype=torch.int32)
    packed = (q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu_k, 7, 9, True, 0.25)
    varlen_args = (*packed, -1, -1, 0.0, None, dq, dk, dv, None)
    opcheck(torch.ops.sparsek.attention_varlen.default, varlen_args, test_utils=tests)
    out, _ = torch.ops.sparsek.attention_varlen(*varlen_args)
    assert out.dtype == torch.bfloat16  # the op's out_dtype None: bfloat16 for FP8 inputs


def test_descales_are_graph_inputs_under_compile() -> None:
    """torch.compile(fullgraph=True) traces FP8 attention with the descales as inputs: new
    descale values change the result without a recompile."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, (dq, dk, dv) = fp8_inputs(gen, 1, 6, 6, 2, 2, 16)

    def fn(q, k, v, dq, dk, dv):
        return sparsek.attention(q, k, v, causal=True, q_descale=dq, k_descale=dk, v_descale=dv)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, dq, dk, dv), fn(q, k, v, dq, dk, dv))
    torch.testing.assert_close(compiled(q, k, v, dq, dk, 2 * dv), fn(q, k, v, dq, dk, 2 * dv))


# ------------------------------------------------------------------------ CUDA route


def test_a_cuda_request_no_fp8_kernel_serves_is_dequantized_to_bfloat16(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the kernels are asked (a CUDA request, faked here) and no FP8 kernel serves
    the request, the inputs are dequantized to bfloat16 and take the 16-bit path: the
    result is that path's on the dequantized inputs, the reason is logged, and
    SPARSEK_STRICT=1 refuses it."""
    from sparsek import api, fp8
    from sparsek.routing import Path

    reason = "dtype=float8_e4m3fn: head_dim=16 is not supported"
    asked: list[tuple[torch.dtype, torch.dtype | None]] = []

    def blockers(q, k, v, mask, out_dtype=None):
        asked.append((q.dtype, out_dtype))
        return (reason,) if q.dtype == FP8 else ("fake: 16-bit request",)

    monkeypatch.setattr(api, "forward_path", lambda *tensors: Path.KERNELS)
    monkeypatch.setattr(api, "dense_blockers", blockers)
    gen = torch.Generator().manual_seed(4)
    q, k, v, descales = fp8_inputs(gen, 2, 8, 8, 4, 2, 16)
    kwargs = dict(zip(("q_descale", "k_descale", "v_descale"), descales, strict=True))
    with caplog.at_level(logging.WARNING, logger="sparsek.routing"):
        out, lse = sparsek.attention(
            q, k, v, causal=True, out_dtype=torch.float16, return_lse=True, **kwargs
        )
    assert asked == [(FP8, torch.float16), (torch.bfloat16, None)]
    assert any("dequantizing the FP8 inputs to bfloat16" in r.message for r in caplog.records)
    q16, k16, v16 = (
        fp8.dequantize(t, d, torch.bfloat16) for t, d in zip((q, k, v), descales, strict=True)
    )
    want, want_lse = sparsek.attention(q16, k16, v16, causal=True, return_lse=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, want.to(torch.float16), rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    with pytest.raises(UnsupportedError, match="head_dim=16 is not supported"):
        sparsek.attention(q, k, v, **kwargs)


# ------------------------------------------------------------------------ kernels


def test_the_registry_serves_fp8_prefill_and_says_why_not_elsewhere() -> None:
    """FP8 kernels: every `tuning.FP8` head dim, dense and packed, O in bfloat16 or
    float16, every mask; anything else is refused with its reason."""
    from cutedsl_kernels.config import DENSE, PACKED, ElementTypes, Layout, MaskSpec
    from sparsek import registry, tuning

    for head_dim in tuning.fp8_head_dims("sm_90a"):
        for layout in (DENSE, PACKED):
            for out in ("bfloat16", "float16"):
                mask = MaskSpec(causal=True, softcap=True, sinks=True)
                config = registry.lookup("sm_90a", head_dim, FP8, mask, layout, out_dtype=out)
                assert config.dtypes == ElementTypes.fp8(out) and config.v_key_major
                assert config.layout == layout
    registered = registry.registered_fp8_configs("sm_90a")
    assert set(registered) <= set(registry.registered_kernels("sm_90a"))
    assert {c.head_dim for c in registered} == set(tuning.fp8_head_dims("sm_90a"))

    def reasons(**change):
        args = {"head_dim": 128, "mask": MaskSpec(), "layout": DENSE, "out_dtype": "bfloat16"}
        args.update(change)
        head_dim, mask, layout = args.pop("head_dim"), args.pop("mask"), args.pop("layout")
        found = registry.find("sm_90a", head_dim, "float8_e4m3fn", mask, layout, **args)
        assert isinstance(found, tuple)
        return "; ".join(found)

    assert "head_dim=96 is not supported" in reasons(head_dim=96)
    assert "out_dtype=None is not supported" in reasons(out_dtype=None)
    assert "out_dtype=float32 is not supported" in reasons(out_dtype="float32")
    assert "FP8 KV caches are not supported" in reasons(layout=Layout(kv_layout="cache"))
    assert "head_dim_v=64" in reasons(head_dim_v=64)


def test_the_registry_serves_fp8_caches_for_every_query_length() -> None:
    """FP8-cache kernels (16-bit queries, float8_e4m3fn cache): decode and longer queries
    (chunked prefill, packed mixed batches) on 64-row tiles, evict-first loads for decode
    only; the two-CTA decode tiles and the dense layout are refused with the reason; the
    cache update that quantizes is registered for each of their head dims and dtypes."""
    from cutedsl_kernels.config import CAUSAL, NO_MASK, KVStoreConfig, Layout
    from sparsek import registry, tuning
    from sparsek.tuning import Workload

    paged = Layout(True, "paged", 16)
    chunk = registry.lookup("sm_90a", 128, "bfloat16", CAUSAL, paged, cache_dtype=FP8)
    decode = registry.lookup(
        "sm_90a", 128, "bfloat16", NO_MASK, Layout(True, "paged", 16, single_query=True),
        Workload.DECODE, cache_dtype=FP8,
    )  # fmt: skip
    for config in (chunk, decode):
        assert config.dtypes == ElementTypes.fp8_cache("bfloat16") and config.tile_m == 64
    assert decode.kv_evict_first and not chunk.kv_evict_first
    registered = set(registry.registered_kernels("sm_90a"))
    assert chunk in registered and decode in registered
    name = "float8_e4m3fn"
    refused = registry.find(
        "sm_90a", 128, "bfloat16", NO_MASK, paged, Workload.DECODE_FILLS_GPU, cache_dtype=name
    )
    assert isinstance(refused, tuple) and "workloads default, decode" in refused[0]
    dense = registry.find("sm_90a", 128, "bfloat16", CAUSAL, Layout(), cache_dtype=name)
    assert isinstance(dense, tuple) and "'cache' or 'paged' layout" in dense[0]
    stores = {
        KVStoreConfig("sm_90a", d, t, "float8_e4m3fn")
        for d in tuning.fp8_head_dims("sm_90a")
        for t in ("float16", "bfloat16")
    }
    assert stores <= registered and all(c.quantizes for c in stores)
    assert registry.lookup_kv_store("sm_90a", 64, torch.float16, FP8) in stores


def test_quantize_rounds_to_nearest_e4m3_and_saturates() -> None:
    """`fp8.quantize` (the cache update's rounding): x / scale to the nearest E4M3 value,
    ties to even, finite values beyond +-448 (infinities too) to +-448, NaN stays NaN."""
    from sparsek import fp8

    x = torch.tensor([1.0, 0.3, -0.55, 0.5625 / 2, 1000.0, -1e9, float("inf"), float("nan")])
    got = fp8.quantize(x.to(torch.bfloat16), torch.tensor([0.5])).float()
    # 0.6 -> 0.625 and -1.1 -> -1.125 (steps of 1/16 below 1, 1/8 above); 0.5625 is exact
    assert got[:4].tolist() == [2.0, 0.625, -1.125, 0.5625]
    assert got[4:7].tolist() == [448.0, -448.0, 448.0] and got[7].isnan()
    assert fp8.quantize(torch.tensor([3.0]), torch.tensor(2.0)).float().item() == 1.5


def test_fp8_kernel_limits_name_what_they_refuse() -> None:
    from dataclasses import replace

    from cutedsl_kernels.config import ElementTypes, FmhaFwdConfig
    from cutedsl_kernels.hopper.limits import can_implement, smem_bytes

    good = FmhaFwdConfig("sm_90a", 128, ElementTypes.fp8("bfloat16"))
    assert can_implement(good) == []
    # a persistent schedule (tile counter, head groups) is implementable; tuning picks it
    assert can_implement(replace(good, persistent=True, dynamic_schedule=True, l2_group_mb=8)) == []
    assert smem_bytes(good) < smem_bytes(replace(good, dtypes=ElementTypes.uniform("bfloat16")))
    for change, fragment in [
        ({"head_dim": 96}, "FP8 kernels serve head_dim in (64, 128)"),
        ({"tile_n": 112}, "tile_n=112: FP8 kernels need a multiple of 32"),
        ({"split_kv": True}, "not split-KV"),
        ({"kv_layout": "cache"}, "dense and packed (varlen) layouts"),
        ({"dtypes": ElementTypes("float8_e4m3fn", "bfloat16", "bfloat16")}, "FP8 kernels take"),
        ({"dtypes": ElementTypes.fp8("float32")}, "with O in float16 or bfloat16"),
        (
            {"dtypes": ElementTypes.uniform("bfloat16"), "pv_two_level": False},
            "pv_two_level=False applies to FP8 kernels only",
        ),
    ]:
        assert any(fragment in r for r in can_implement(replace(good, **change))), change


def test_key_major_v_is_v_with_the_key_axis_contiguous() -> None:
    """The FP8 kernels' copy of V: the same values, keys contiguous, the key axis padded
    to 16 elements (TMA's 16-byte strides), and packed rows past the data zeroed."""
    from sparsek.launch.fp8 import key_major

    v = (3 * torch.randn(2, 37, 3, 64)).to(FP8)
    vt = key_major(v)
    assert vt.shape == v.shape and vt.dtype == FP8
    assert vt.stride() == (3 * 64 * 48, 1, 64 * 48, 48)
    assert torch.equal(vt.view(torch.uint8), v.view(torch.uint8))
    packed = (3 * torch.randn(1, 50, 2, 64)).to(FP8)
    vt = key_major(packed, torch.tensor(40))
    assert torch.equal(vt[:, :40].view(torch.uint8), packed[:, :40].view(torch.uint8))
    assert torch.all(vt[:, 40:].view(torch.uint8) == 0)


def test_the_fp8_launch_sends_key_major_v_descales_and_out_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA launch path of FP8 requests (device, registry and kernel faked): the
    kernel gets V key-major with the same values, the descales and an output of
    `out_dtype`; a stand-in kernel that computes causal attention from exactly what it is
    sent gives the dequantized reference (dense and packed)."""
    from fake_launch import fake_config, fake_launch_path

    from sparsek.launch import dense
    from sparsek.launch.fp8 import attention_varlen_fp8
    from sparsek.masks import CAUSAL

    configs = []

    def lookup(*args, **kwargs):
        configs.append(fake_config(*args, **kwargs))
        return configs[-1]

    def kernel(q, k, v, out, lse, cu_q, cu_k, used_k, pages, counter, sinks, *rest):
        assert v.stride(1) == 1 and k.stride(-1) == 1  # V key-major, K as stored
        descales = rest[:3]
        sequences = q.shape[0] if cu_q is None else cu_q.shape[0] - 1
        for b in range(sequences):
            batch, rows, keys = b, slice(None), slice(None)
            if cu_q is not None:  # packed: a batch of one
                batch = 0
                rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
                keys = slice(int(cu_k[b]), int(cu_k[b + 1]))
            qb, kb, vb = (t[batch, span][None] for t, span in ((q, rows), (k, keys), (v, keys)))
            ob, lb = oracle(qb, kb, vb, [d[b : b + 1] for d in descales], causal=True)
            out[batch, rows] = ob[0].to(out.dtype)
            lse[batch, :, rows] = lb[0].float()

    fake_launch_path(monkeypatch, lookup, kernel)
    gen = torch.Generator().manual_seed(6)
    q, k, v, descales = fp8_inputs(gen, 2, 9, 9, 4, 2, 64)
    out, lse = dense.attention(q, k, v, True, 64**-0.5, False, -1, -1, 0.0, None, *descales,
                               torch.float16)  # fmt: skip
    want, want_lse = oracle(q, k, v, descales, causal=True)
    assert configs[-1].dtypes == ElementTypes.fp8("float16") and not configs[-1].varlen_q
    check_close(out, lse, want, want_lse, torch.float16)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    packed = [t.flatten(0, 1) for t in (q, k, v)]
    out, lse = attention_varlen_fp8(*packed, cu, cu, 9, CAUSAL, 64**-0.5, None,
                                    tuple(descales), torch.bfloat16)  # fmt: skip
    assert configs[-1].dtypes == ElementTypes.fp8("bfloat16") and configs[-1].varlen_q
    out, lse = out.view(2, 9, 4, 64), lse.view(4, 2, 9).transpose(0, 1)
    check_close(out, lse, want, want_lse, torch.bfloat16)


# ------------------------------------------------------------------------ FP8 caches


def fp8_caches(gen, lens, capacity, kv_heads, dim, page=None):
    """Per-sequence FP8 keys/values (`lens` tokens), their (batch, kv_heads) descales,
    and a contiguous (batch, capacity, ...) cache holding them, or with `page` a paged one
    (blocks shuffled, NaN bytes in unused rows, a stale table entry past each sequence)."""
    batch = len(lens)
    k, v = (
        (3 * torch.randn(batch, capacity, kv_heads, dim, generator=gen)).to(FP8) for _ in range(2)
    )
    descales = [torch.rand(batch, kv_heads, generator=gen) + 0.1 for _ in range(2)]
    if page is None:
        return k, v, descales, None
    blocks = capacity // page
    order = torch.randperm(batch * blocks + 1, generator=gen)
    table = order[: batch * blocks].view(batch, blocks).to(torch.int32)
    nan = torch.full((1,), float("nan")).to(FP8).view(torch.uint8)
    caches = []
    for t in (k, v):
        paged = nan.expand(batch * blocks + 1, page, kv_heads, dim).clone().view(FP8)
        paged.view(torch.uint8)[table.long().flatten()] = t.view(torch.uint8).reshape(
            batch * blocks, page, kv_heads, dim
        )
        caches.append(paged)
    for b, n in enumerate(lens):
        table[b, -(-n // page) :] = 10_000  # stale entries past the sequence: never read
    return caches[0], caches[1], descales, table


@pytest.mark.parametrize("page", [None, 16])
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_fp8_caches_are_dequantized_per_sequence(page, seqlen_q) -> None:
    """A float8_e4m3fn cache under bfloat16 queries: each sequence's result is attention
    over its keys and values times its descale rows (contiguous and paged caches, decode
    and several new queries, GQA)."""
    gen = torch.Generator().manual_seed(seqlen_q + (page or 0))
    lens, heads, kv_heads, dim = [5, 40, 17], 4, 2, 16
    k_cache, v_cache, descales, table = fp8_caches(gen, lens, 48, kv_heads, dim, page)
    batch = len(lens)
    q = torch.randn(batch, seqlen_q, heads, dim, generator=gen, dtype=torch.bfloat16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = sparsek.attention_with_kvcache(
        q, k_cache, v_cache, seqlens, table, return_lse=True,
        k_descale=descales[0], v_descale=descales[1],
    )  # fmt: skip
    assert out.dtype == torch.bfloat16
    k_seq, v_seq, _, _ = fp8_caches(
        torch.Generator().manual_seed(seqlen_q + (page or 0)), lens, 48, kv_heads, dim
    )
    for b, n in enumerate(lens):
        ones = torch.ones(1, heads // kv_heads)  # q is 16-bit: a descale of 1 per head
        q8 = q[b : b + 1].float()
        want, want_lse = oracle(
            q8, k_seq[b : b + 1, :n], v_seq[b : b + 1, :n],
            [ones.expand(1, kv_heads), descales[0][b : b + 1], descales[1][b : b + 1]],
            causal=True,
        )  # fmt: skip
        check_close(out[b : b + 1], lse[b : b + 1], want, want_lse, torch.bfloat16)


def test_bad_fp8_cache_arguments_name_the_argument() -> None:
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache, (dk, dv), _ = fp8_caches(gen, [4, 4], 16, 2, 16)
    q = torch.randn(2, 1, 4, 16, dtype=torch.bfloat16)
    seqlens = torch.tensor([4, 4], dtype=torch.int32)

    def call(q=q, k=k_cache, v=v_cache, **kwargs):
        return sparsek.attention_with_kvcache(q, k, v, seqlens, **kwargs)

    with pytest.raises(ValueError, match="v_descale is required with float8_e4m3fn caches"):
        call(k_descale=dk)
    with pytest.raises(ValueError, match=r"k_descale has shape \(1, 2\)"):
        call(k_descale=dk[:1], v_descale=dv)
    with pytest.raises(TypeError, match=r"v_descale has dtype torch\.float64"):
        call(k_descale=dk, v_descale=dv.double())
    with pytest.raises(ValueError, match="k_descale applies to float8_e4m3fn caches only"):
        call(k=k_cache.to(torch.bfloat16), v=v_cache.to(torch.bfloat16), k_descale=dk)
    with pytest.raises(TypeError, match="attention_with_kvcache takes float16 or bfloat16"):
        call(q=q.to(FP8), k_descale=dk, v_descale=dv)
    e5m2 = k_cache.float().to(torch.float8_e5m2)
    with pytest.raises(ValueError, match=r"must equal q\.dtype"):
        call(k=e5m2, v=e5m2, k_descale=dk, v_descale=dv)
    with pytest.raises(ValueError, match=r"\(or both k_cache and v_cache float8_e4m3fn under"):
        call(v=v_cache.to(torch.bfloat16), k_descale=dk, v_descale=dv)


def test_the_kvcache_op_takes_fp8_caches() -> None:
    from torch.library import opcheck

    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, (dk, dv), table = fp8_caches(gen, [9, 30], 32, 2, 16, page=16)
    q = torch.randn(2, 1, 4, 16, dtype=torch.bfloat16)
    seqlens = torch.tensor([9, 30], dtype=torch.int32)
    table = torch.where(table >= 10_000, 0, table)  # (opcheck reads every entry)
    args = (q, k_cache, v_cache, seqlens, table, None, None, True, 0.25, 0, -1, -1, 0.0, None,
            dk, dv)  # fmt: skip
    tests = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    opcheck(torch.ops.sparsek.attention_with_kvcache.default, args, test_utils=tests)
    out, _ = torch.ops.sparsek.attention_with_kvcache(*args)
    assert out.dtype == torch.bfloat16


def test_a_cuda_request_over_an_fp8_cache_runs_its_blocks_dequantized(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the kernels are asked (a CUDA request, faked here): no FP8-cache kernel is
    registered, so the batch's blocks are dequantized to q's dtype and take the 16-bit
    path (the same result as a 16-bit cache of those values), logged; strict refuses."""
    from sparsek import api_varlen, fp8
    from sparsek.routing import Path

    monkeypatch.setattr(api_varlen, "forward_path", lambda *tensors: Path.KERNELS)
    gen = torch.Generator().manual_seed(8)
    k_cache, v_cache, (dk, dv), table = fp8_caches(gen, [9, 30], 32, 2, 16, page=16)
    q = torch.randn(2, 1, 4, 16, dtype=torch.bfloat16)
    seqlens = torch.tensor([9, 30], dtype=torch.int32)
    with caplog.at_level(logging.WARNING, logger="sparsek.routing"):
        out = sparsek.attention_with_kvcache(q, k_cache, v_cache, seqlens, table,
                                             k_descale=dk, v_descale=dv)  # fmt: skip
    assert any("dequantizing the FP8 KV cache" in r.message for r in caplog.records)
    k16, v16 = (
        fp8.dequantize_cache(c, d, table, seqlens, torch.bfloat16)
        for c, d in ((k_cache, dk), (v_cache, dv))
    )
    want = sparsek.attention_with_kvcache(q, k16, v16, seqlens, fp8.compact_block_table(table))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    with pytest.raises(UnsupportedError, match="kernels cannot run this input"):
        sparsek.attention_with_kvcache(q, k_cache, v_cache, seqlens, table, k_descale=dk,
                                       v_descale=dv)  # fmt: skip
