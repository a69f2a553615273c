"""sparsek's Hopper kernels on an H100, end to end through the public API and the torch op.

Compared against: a float64 reference (`sparsek.reference`) on the same inputs. Tolerance
is relative to PyTorch's own error in the same dtype:
    max|out - ref| <= 2 * max|sdpa_out - ref| + atol   (atol 1e-3 fp16, 2e-3 bf16)
where sdpa_out is torch SDPA (with an explicit mask for bottom-right causal) in the input
dtype. LSE is compared with the reference's LSE. Outputs are poisoned with NaN before each
launch (through `sparsek.launch.launcher.empty`) so unwritten elements fail. Fallbacks are disabled
(`SPARSEK_STRICT=1`) so every check here runs a kernel.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import sparsek
from cutedsl_kernels.config import DENSE, Layout, MaskSpec
from sparsek import api, registry, tuning
from sparsek.launch import dense, launcher
from sparsek.launch.launcher import ForwardKernel
from sparsek.masks import CAUSAL, NO_MASK
from sparsek.reference import reference_attention
from sparsek.tuning import Workload

pytestmark = [pytest.mark.gpu, pytest.mark.sm90, pytest.mark.usefixtures("strict_and_poisoned")]

ATOL = {torch.float16: 1e-3, torch.bfloat16: 2e-3}
DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = registry.registered_head_dims("sm_90a")

# (batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, causal)
SHAPES = [
    (1, 1, 1, 4, 4, False),
    (2, 17, 17, 4, 1, True),  # MQA
    (3, 127, 127, 8, 2, True),  # GQA 4:1
    (2, 128, 128, 4, 4, False),
    (1, 129, 129, 4, 1, True),
    (1, 1031, 1031, 8, 2, True),  # odd length > 1000, GQA 4:1
    (2, 100, 300, 4, 4, True),  # Sq < Sk
    (2, 300, 100, 4, 2, True),  # Sq > Sk: bottom-right leaves rows 0..199 fully masked
    (8, 64, 200, 8, 2, False),  # batch 8
    (1, 1031, 17, 4, 4, False),  # Sq > Sk
    (2, 1, 1031, 4, 1, True),  # decode-like
]


Request = tuple[MaskSpec, Layout, Workload, ForwardKernel]


@pytest.fixture
def forward_kernels(monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    """Every forward kernel the launch paths ask for during the test (no plan is memoized
    when it starts): (mask, layout, workload, the loaded kernel) of each request."""
    asked: list[Request] = []
    forward_kernel = launcher.forward_kernel

    def recording(
        device, head_dim, dtype, mask, layout=DENSE, workload=Workload.DEFAULT, head_dim_v=None,
        out_dtype=None, cache_dtype=None,
    ):  # fmt: skip
        kernel = forward_kernel(
            device, head_dim, dtype, mask, layout, workload, head_dim_v, out_dtype, cache_dtype
        )
        asked.append((mask, layout, workload, kernel))
        return kernel

    monkeypatch.setattr(launcher, "forward_kernel", recording)
    return asked


def make_qkv(b, sq, sk, h, hkv, d, dtype, *, bhsd_storage=False, seed=0):
    """Fresh random inputs; with `bhsd_storage`, (B, S, H, D) views of (B, H, S, D) tensors."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def make(s, n):
        if bhsd_storage:
            t = torch.randn(b, n, s, d, device="cuda", dtype=dtype, generator=gen)
            return t.transpose(1, 2)
        return torch.randn(b, s, n, d, device="cuda", dtype=dtype, generator=gen)

    return make(sq, h), make(sk, hkv), make(sk, hkv)


def sdpa_in_dtype(q, k, v, causal, top_left):
    """torch SDPA in the inputs' dtype, BSHD in/out, either causal alignment."""
    if causal and top_left:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, enable_gqa=q.shape[2] != k.shape[2]
        )
        return out.transpose(1, 2)
    return api._sdpa_bshd(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]))


def check_close(out, q, k, v, causal, top_left, lse=None):
    ref, ref_lse = reference_attention(
        q, k, v, causal=causal, causal_top_left=top_left, compute_dtype=torch.float64
    )
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    err = (out.double() - ref).abs().max().item()
    sdpa_out = sdpa_in_dtype(q, k, v, causal, top_left).double()
    # SDPA leaves NaN in fully masked rows on some backends; the contract there is 0.
    err_sdpa = (torch.nan_to_num(sdpa_out, nan=0.0) - ref).abs().max().item()
    bound = 2 * err_sdpa + ATOL[q.dtype]
    assert err <= bound, f"max error {err:.3e} > {bound:.3e} (sdpa error {err_sdpa:.3e})"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-3, rtol=1e-3)


@pytest.fixture(params=["planned", "no_one_wave"])
def one_wave(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """ "planned": each shape takes the workload `dense.dense_workload` plans (most SHAPES
    fit in one wave: `Workload.ONE_WAVE`); "no_one_wave": as if the GPU had no SM to spare,
    so the same shapes run the DEFAULT (and LONG_Q) kernels. Returns whether one-wave
    kernels may be planned. (No plan or loaded kernel is memoized when a test starts:
    tests/conftest.py empties the memos; kernels stay loaded in the cache.)"""
    if request.param == "planned":
        return True
    plan = dense.dense_workload
    monkeypatch.setattr(dense, "dense_workload", lambda b, sq, h, c, sms: plan(b, sq, h, c, 0))
    return False


def run_checked(q, k, v, causal, top_left) -> None:
    """`sparsek.attention` (bottom-right, with LSE) or, for top-left causal, the SDPA
    drop-in on (B, H, S, D) views; checked against the reference."""
    if top_left:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = sparsek.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        check_close(out.transpose(1, 2), q, k, v, True, top_left=True)
    else:
        out, lse = sparsek.attention(q, k, v, causal=causal, return_lse=True)
        check_close(out, q, k, v, causal, top_left=False, lse=lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize(("b", "sq", "sk", "h", "hkv", "causal"), SHAPES)
def test_attention_bottom_right(
    b, sq, sk, h, hkv, causal, d, dtype, one_wave, forward_kernels
) -> None:
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, seed=sq * 7 + sk)
    out, lse = sparsek.attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    check_close(out, q, k, v, causal, top_left=False, lse=lse)
    if causal and sq > sk:
        assert (out[:, : sq - sk] == 0).all()
    # (One query per sequence runs as KV-cache decode, see test_single_queries_as_decode.)
    fits = b * h * math.ceil(sq / tuning.ONE_WAVE_TILE_M) <= launcher.num_sms(q.device.index)
    ran = any(workload is Workload.ONE_WAVE for _, _, workload, _ in forward_kernels)
    assert ran == (one_wave and fits and sq > 1), "one-wave problems run one-wave kernels"


# One query per sequence (batch, seqlen_k, num_heads, num_kv_heads): planned as KV-cache
# decode over the dense K/V (`dense.decode_route`: heads grouped per KV head, split-KV).
DECODE_SHAPES = [(1, 4096, 32, 8), (3, 1031, 8, 8), (8, 200, 16, 1), (2, 33000, 4, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("mode", ["full", "causal", "causal_top_left"])
@pytest.mark.parametrize(("b", "sk", "h", "hkv"), DECODE_SHAPES)
def test_single_queries_as_decode(b, sk, h, hkv, mode, d, dtype) -> None:
    causal, top_left = mode != "full", mode == "causal_top_left"
    q, k, v = make_qkv(b, 1, sk, h, hkv, d, dtype, bhsd_storage=top_left, seed=sk + h)
    run_checked(q, k, v, causal, top_left)  # top-left: a causal query sees key 0 only
    plan = dense.dense_plan(q, k, v, CAUSAL if causal else NO_MASK, d**-0.5, top_left)
    assert plan.decode is not None, "planned as decode"


# Causal requests of >= tuning.LONG_SEQLEN_Q queries: the LONG_Q kernels, whose
# persistent CTAs count their tiles out (more tiles than SMs, so CTAs take several).
LONG_SHAPES = [
    (2, 4097, 4097, 4, 2, False),  # bottom-right = top-left, GQA 2:1
    (1, 4096, 5003, 3, 1, False),  # Sq < Sk, MQA
    (1, 5001, 4100, 4, 4, False),  # Sq > Sk: the first 901 rows fully masked
    (1, 4100, 4100, 4, 2, True),  # top-left, strided (BHSD storage)
    (1, 12289, 12289, 10, 5, False),  # heads in several L2 groups, the last one partial
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize(("b", "sq", "sk", "h", "hkv", "top_left"), LONG_SHAPES)
def test_long_causal_queries(b, sq, sk, h, hkv, top_left, d, dtype, forward_kernels) -> None:
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, bhsd_storage=top_left, seed=sq + d)
    run_checked(q, k, v, True, top_left)
    [(mask, layout, workload, kernel)] = forward_kernels  # the request's kernel
    assert (mask, layout, workload) == (registry.mask_of(True), DENSE, Workload.LONG_Q)
    # Head dims with a LONG_CAUSAL row take their tiles from a counter; d192 and d256 are
    # not persistent (one CTA per tile, no counter).
    counted = ("sm_90a", d) in tuning.LONG_CAUSAL
    assert kernel.takes_tile_counter == counted, "long causal: a counter iff a LONG_CAUSAL row"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize(
    ("b", "sq", "sk", "h", "hkv", "causal"), [s for s in SHAPES if s[5]] + [SHAPES[3]]
)
def test_sdpa_drop_in_top_left_strided(b, sq, sk, h, hkv, causal, d, dtype) -> None:
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, bhsd_storage=True, seed=sq + sk)
    out = sparsek.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        enable_gqa=h != hkv,
    )
    check_close(out.transpose(1, 2), q, k, v, causal, top_left=True)


def test_custom_scale_and_unaligned_inputs() -> None:
    q, k, v = make_qkv(2, 77, 93, 4, 2, 128, torch.bfloat16)
    # A view whose base is 2 bytes off 16-byte alignment: TMA cannot read it, so the op
    # must copy it and still be right.
    flat = torch.randn(q.numel() + 1, device="cuda", dtype=q.dtype)
    q_odd = flat[1:].view(q.shape).copy_(q)
    out = sparsek.attention(q_odd, k, v, causal=True, softmax_scale=0.05)
    ref, _ = reference_attention(
        q, k, v, causal=True, softmax_scale=0.05, compute_dtype=torch.float64
    )
    assert (out.double() - ref).abs().max().item() < 2e-2


def test_repeated_signature_fresh_values_and_pointers() -> None:
    """Calls after the first of a signature take its memoized plan (`api._SERVED`): fresh
    values each time, and views of one signature whose bases are 16-byte aligned or not
    (the misaligned one is copied), are each right."""
    shape = (2, 77, 4, 128)
    flat = torch.empty(math.prod(shape) + 8, device="cuda", dtype=torch.bfloat16)
    for seed, offset in ((1, 0), (2, 1), (3, 0), (4, 8), (5, 3)):
        q, k, v = make_qkv(2, 77, 93, 4, 2, 128, torch.bfloat16, seed=seed)
        view = flat[offset : offset + q.numel()].view(shape).copy_(q)
        out, lse = sparsek.attention(view, k, v, causal=True, return_lse=True)
        check_close(out, q, k, v, True, top_left=False, lse=lse)
    signature = api._eager_signature(view, k, v, None, True)
    assert signature in api._SERVED


def test_deterministic() -> None:
    q, k, v = make_qkv(2, 1031, 1031, 8, 2, 128, torch.bfloat16)
    first = sparsek.attention(q, k, v, causal=True)
    again = sparsek.attention(q, k, v, causal=True)
    assert torch.equal(first, again)


def test_zero_sizes_do_not_launch() -> None:
    q, k, v = make_qkv(0, 16, 16, 4, 4, 64, torch.float16)
    assert sparsek.attention(q, k, v).shape == q.shape
    q, k, v = make_qkv(2, 16, 0, 4, 4, 64, torch.float16)
    out, lse = sparsek.attention(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_opcheck_cuda() -> None:
    q, k, v = make_qkv(2, 129, 200, 4, 2, 64, torch.float16, bhsd_storage=True)
    torch.library.opcheck(torch.ops.sparsek.attention, (q, k, v, True, 0.125, False))


def test_torch_compile_cuda_one_graph() -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def f(q, k, v):
        return sparsek.attention(q, k, v, causal=True) * 2

    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    for s in (129, 256, 1031):
        q, k, v = make_qkv(2, s, s, 8, 2, 128, torch.bfloat16, seed=s)
        assert torch.equal(compiled(q, k, v), f(q, k, v))
    assert counter.frame_count == 1


def test_cuda_graph_capture_and_replay() -> None:
    q, k, v = make_qkv(2, 300, 300, 8, 2, 64, torch.float16)
    sparsek.attention(q, k, v, causal=True)  # warm-up: compile/load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparsek.attention(q, k, v, causal=True)
    for seed in (1, 2):
        fresh = make_qkv(2, 300, 300, 8, 2, 64, torch.float16, seed=seed)
        for dst, src in zip((q, k, v), fresh, strict=True):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, sparsek.attention(q, k, v, causal=True))


@pytest.mark.parametrize("seqlen_q", [1, 300], ids=["decode", "dense"])
def test_plan_first_made_during_cuda_graph_capture(seqlen_q: int) -> None:
    """The kernels are loaded (by a request one key shorter), but this request's launch
    plan is first made inside the capture, where device work is recorded, not run: the
    eager calls after the capture and the graph's replays must both be right."""
    sparsek.attention(*make_qkv(3, seqlen_q, 299, 8, 2, 64, torch.float16), causal=True)
    torch.cuda.synchronize()
    q, k, v = make_qkv(3, seqlen_q, 300, 8, 2, 64, torch.float16, seed=7)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sparsek.attention(q, k, v, causal=True)
    eager = sparsek.attention(q, k, v, causal=True)
    torch.cuda.synchronize()
    check_close(eager, q, k, v, causal=True, top_left=False)
    graph.replay()
    torch.cuda.synchronize()
    check_close(captured, q, k, v, causal=True, top_left=False)


@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_nan_out(where: str, causal: bool) -> None:
    """One NaN element in q or k: exactly the outputs and LSEs the float64 reference makes
    NaN are NaN (q: its row; k: every row that sees that key), and every other element is
    still right."""
    q, k, v = make_qkv(2, 300, 300, 8, 2, 64, torch.bfloat16, seed=9)
    {"q": q, "k": k}[where][1, 137, 1, 5] = float("nan")
    out, lse = sparsek.attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, causal=causal, compute_dtype=torch.float64)
    assert torch.isnan(ref).any() and torch.isnan(ref_lse).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    finite = ~torch.isnan(ref)
    assert (out.double()[finite] - ref[finite]).abs().max().item() < 2e-2


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_v(causal: bool) -> None:
    """One NaN element v[b, j, kv_head, c]: channel c of every row (of that KV head's query
    heads) that sees key j is NaN; the LSE stays finite; nothing outside channel c of those
    heads is NaN. A row the causal mask hides key j from may also be NaN in channel c when
    it shares a tile with rows that see it (its zero probability times NaN in the P.V
    product); where it is not, it equals the reference with that element set to 0."""
    b, j, kv_head, c, group = 1, 137, 1, 5, 4
    q, k, v = make_qkv(2, 300, 300, 8, 2, 64, torch.bfloat16, seed=9)
    clean = v.clone()
    clean[b, j, kv_head, c] = 0.0
    v[b, j, kv_head, c] = float("nan")
    out, lse = sparsek.attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = reference_attention(q, k, clean, causal=causal, compute_dtype=torch.float64)
    heads = slice(kv_head * group, (kv_head + 1) * group)
    sees = torch.arange(300, device=q.device) >= (j if causal else 0)
    assert torch.isnan(out[b, sees, heads, c]).all()
    may_be_nan = torch.zeros_like(out, dtype=torch.bool)
    may_be_nan[b, :, heads, c] = True
    assert not torch.isnan(out[~may_be_nan]).any()
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=1e-3)
    finite = ~torch.isnan(out)
    assert (out.double()[finite] - ref[finite]).abs().max().item() < 2e-2


def test_kv_expanded_over_heads() -> None:
    """K/V of one head expanded over 8 (stride 0, read in place as MQA) give what the
    materialised copies give, through the API and the SDPA drop-in."""
    q, k1, v1 = make_qkv(2, 300, 257, 8, 1, 128, torch.bfloat16, seed=21)
    k, v = k1.expand(2, 257, 8, 128), v1.expand(2, 257, 8, 128)
    out = sparsek.attention(q, k, v, causal=True)
    check_close(out, q, k.contiguous(), v.contiguous(), causal=True, top_left=False)
    sdpa = sparsek.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    check_close(sdpa.transpose(1, 2), q, k.contiguous(), v.contiguous(), causal=True, top_left=True)


def test_unsupported_head_dim_falls_back_or_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = make_qkv(1, 64, 64, 4, 4, 96, torch.float16)
    with pytest.raises(sparsek.UnsupportedError, match="head_dim=96"):
        sparsek.attention(q, k, v)
    monkeypatch.delenv("SPARSEK_STRICT")
    out = sparsek.attention(q, k, v)
    check_close(out, q, k, v, causal=False, top_left=False)
