"""`SparseKAttention` (sparsek's xFormers operator) on an H100, through xFormers' own API.

Compared against: a float64 softmax over q k^T * scale plus the bias's `materialize(...)`
(xFormers' definition of each mask; for the local biases this checks the window's
conversion to sparsek's (left, right), with windows of one key, around a tile's width and
wider than the sequences). Tolerance is relative to PyTorch's own error in the
same dtype: max|out - ref| <= 2 * max|sdpa - ref| + atol (atol 1e-3 fp16, 2e-3 bf16), where
sdpa is torch SDPA with the materialized bias as its mask. Outputs are poisoned with NaN
before each launch (through `sparsek.launch.launcher.empty`) so unwritten elements fail.

xFormers' own C++/CUDA extension need not load here (its operators then refuse CUDA
inputs); sparsek's operator does not use it.
"""

from __future__ import annotations

import pytest
import torch

xops = pytest.importorskip("xformers.ops", reason="xformers is not installed")

from xformers.ops.fmha import attn_bias as ab  # noqa: E402
from xformers.ops.fmha.common import Inputs  # noqa: E402

from sparsek import registry  # noqa: E402
from sparsek.integrations.xformers import SparseKAttention  # noqa: E402
from sparsek.launch import dense, launcher  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

ATOL = {torch.float16: 1e-3, torch.bfloat16: 2e-3}
BIASES = [
    None,
    ab.LowerTriangularMask(),
    ab.LowerTriangularFromBottomRightMask(),
    ab.LocalAttentionFromBottomRightMask(window_left=0, window_right=0),
    ab.LocalAttentionFromBottomRightMask(window_left=129, window_right=63),
    ab.LocalAttentionFromBottomRightMask(window_left=5000, window_right=5000),
    ab.LowerTriangularFromBottomRightLocalAttentionMask(1),
    ab.LowerTriangularFromBottomRightLocalAttentionMask(128),
    ab.LowerTriangularFromBottomRightLocalAttentionMask(3000),
]
BIAS_IDS = [
    "none",
    "top_left",
    "bottom_right",
    "local0-0",
    "local129-63",
    "local5000-5000",
    "causal_local1",
    "causal_local128",
    "causal_local3000",
]

# query shape (B, Mq, H, K) or (B, Mq, G, H, K), seqlen_k. 5-D cases pass K/V as xFormers
# writes GQA: (B, Mk, G, 1, K) expanded along H.
SHAPES = [
    ((2, 129, 4, 128), 129),
    ((1, 1031, 8, 128), 777),  # odd lengths, Sq > Sk
    ((2, 77, 4, 64), 300),  # Sq < Sk
    ((2, 255, 2, 4, 128), 255),  # GQA 4:1
    ((2, 300, 4, 2, 128), 100),  # GQA 2:1, Sq > Sk
    ((1, 1, 1, 8, 64), 517),  # MQA decode
]
# d64 runs in fp16 only: each (head_dim, dtype, causal) is a kernel compile (~5 s cold).
CASES = [
    pytest.param(shape, sk, dtype, id=f"{'x'.join(map(str, shape))}-sk{sk}-{str(dtype)[6:]}")
    for shape, sk in SHAPES
    for dtype in (torch.float16, torch.bfloat16)
    if not (shape[-1] == 64 and dtype == torch.bfloat16)
]


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape, dtype, device, stride=None):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launcher, "empty", poisoned)


def make_qkv(q_shape, sk, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)

    b, _, *heads, d = q_shape
    q = randn(*q_shape)
    if len(heads) == 1:
        return q, randn(b, sk, heads[0], d), randn(b, sk, heads[0], d)
    g, h = heads
    k = randn(b, sk, g, 1, d).expand(b, sk, g, h, d)
    v = randn(b, sk, g, 1, d).expand(b, sk, g, h, d)
    return q, k, v


def folded(t):
    return t.reshape(*t.shape[:2], -1, t.shape[-1]) if t.ndim == 5 else t


def check_close(out, q, k, v, bias, lse=None):
    qt, kt, vt = (folded(t).transpose(1, 2) for t in (q, k, v))
    scores = (qt.double() @ kt.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = None
    if bias is not None:
        scores = scores + bias.materialize(scores.shape, dtype=torch.float64, device="cuda")
        mask = bias.materialize((qt.shape[2], kt.shape[2]), dtype=q.dtype, device="cuda")
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # no visible key -> 0
    ref = (probs @ vt.double()).transpose(1, 2).reshape(out.shape)
    sdpa = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    sdpa = torch.nan_to_num(sdpa.transpose(1, 2).double(), nan=0.0).reshape(out.shape)

    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    err = (out.double() - ref).abs().max().item()
    bound = 2 * (sdpa - ref).abs().max().item() + ATOL[q.dtype]
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"
    if lse is not None:
        ref_lse = torch.logsumexp(scores, dim=-1).reshape(lse.shape)
        assert lse.dtype == torch.float32
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("bias", BIASES, ids=BIAS_IDS)
@pytest.mark.parametrize(("q_shape", "sk", "dtype"), CASES)
def test_forward_matches_reference(q_shape, sk, dtype, bias, monkeypatch) -> None:
    q, k, v = make_qkv(q_shape, sk, dtype, seed=sum(q_shape) + sk)
    copied: list[bool] = []
    original = dense.tma_compatible

    def recording(t):
        result = original(t)
        copied.append(result is not t)
        return result

    monkeypatch.setattr(dense, "tma_compatible", recording)
    assert SparseKAttention.not_supported_reasons(Inputs(q, k, v, bias)) == []
    out = xops.memory_efficient_attention_forward(q, k, v, bias, op=SparseKAttention)
    assert out.shape == q.shape and out.dtype == dtype
    check_close(out, q, k, v, bias)
    # Q, K and V (GQA K/V included: narrowed from their stride-0 expansion) are read in
    # place: `tma_compatible`, where every copy is made, made none (a call planned as
    # readable with aligned bases skips it).
    assert not any(copied)


@pytest.mark.parametrize("bias", BIASES, ids=BIAS_IDS)
def test_lse_and_autograd_free_entry_point(bias) -> None:
    q, k, v = make_qkv((2, 200, 2, 4, 128), 333, torch.bfloat16, seed=5)
    out, lse = xops.memory_efficient_attention_forward_requires_grad(
        q, k, v, bias, op=SparseKAttention
    )
    assert lse.shape == (2, 2, 4, 200)
    check_close(out, q, k, v, bias, lse=lse)
    again = xops.memory_efficient_attention(q, k, v, bias, op=(SparseKAttention, None))
    assert torch.equal(again, out)


def test_unregistered_head_dim_refused() -> None:
    assert 80 not in registry.registered_head_dims("sm_90a")
    q, k, v = make_qkv((1, 64, 4, 80), 64, torch.float16)
    reasons = SparseKAttention.not_supported_reasons(Inputs(q, k, v))
    assert any("head_dim=80" in r for r in reasons)
    with pytest.raises(ValueError, match="head_dim=80"):
        xops.memory_efficient_attention_forward(q, k, v, op=SparseKAttention)


def block_diagonal_biases():
    """One bias of each supported block-diagonal type (odd lengths, an empty block)."""
    cuda = torch.device("cuda")
    q_lens, k_lens = [3, 200, 0, 129, 1], [5, 300, 4, 129, 77]
    block = ab.BlockDiagonalMask.from_seqlens(q_lens, k_lens, device=cuda)
    square = ab.BlockDiagonalMask.from_seqlens(q_lens, device=cuda)
    padded = ab.BlockDiagonalPaddedKeysMask.from_seqlens(q_lens, 320, k_lens, device=cuda)
    offset = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_lens, 320, k_lens, device=cuda
    )
    table = torch.randperm(5 * 20, device=cuda, generator=torch.Generator("cuda").manual_seed(1))
    table = table.to(torch.int32).view(5, 20)
    return [
        block,
        block.make_causal_from_bottomright(),
        square.make_causal(),
        padded,
        offset,
        padded.make_paged(table, 16, ab.PagedBlockDiagonalPaddedKeysMask),
        offset.make_paged(table, 16, ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask),
        # Local forms: windows of one key, around a tile's width, wider than the blocks.
        block.make_local_attention_from_bottomright(64),
        block.make_local_attention_from_bottomright(1000),
        square.make_local_attention(1),
        square.make_local_attention(100),
        padded.make_local_attention(70, 10),
        padded.make_local_attention(0, 200),
        ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask(
            q_seqinfo=offset.q_seqinfo, k_seqinfo=offset.k_seqinfo, _window_size=33
        ),
    ]


@pytest.mark.parametrize("index", range(14), ids=lambda i: f"bias{i}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_block_diagonal_biases(index, dtype, monkeypatch) -> None:
    """Each block-diagonal bias against float64 with its materialized mask (paged: keys
    scattered into the table's pages, compared in their padded order)."""
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    bias = block_diagonal_biases()[index]
    gen = torch.Generator(device="cuda").manual_seed(index)
    mq = bias.q_seqinfo.seqstart_py[-1]
    paged = hasattr(bias, "block_tables")
    mk = (
        5 * 320 if (paged or hasattr(bias.k_seqinfo, "padding")) else bias.k_seqinfo.seqstart_py[-1]
    )
    q = torch.randn(1, mq, 2, 4, 128, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(1, mk, 2, 1, 128, device="cuda", dtype=dtype, generator=gen).expand(
        1, mk, 2, 4, 128
    )
    v = torch.randn(1, mk, 2, 1, 128, device="cuda", dtype=dtype, generator=gen).expand(
        1, mk, 2, 4, 128
    )
    k_in, v_in = k, v
    if paged:  # logical slot s of sequence b lives in page table[b, s // 16]
        table = bias.block_tables.long()
        src = torch.arange(mk, device="cuda")
        dst = table.view(-1)[src // 16] * 16 + src % 16
        k_in, v_in = torch.empty_like(k[:, :, :, :1]), torch.empty_like(v[:, :, :, :1])
        k_in[0, dst], v_in[0, dst] = k[0, src, :, :1], v[0, src, :, :1]
        k_in, v_in = k_in.expand(1, mk, 2, 4, 128), v_in.expand(1, mk, 2, 4, 128)
    assert SparseKAttention.not_supported_reasons(Inputs(q, k_in, v_in, bias)) == []
    out, lse = xops.memory_efficient_attention_forward_requires_grad(
        q, k_in, v_in, bias, op=SparseKAttention
    )
    assert lse.shape == (1, 2, 4, mq)
    reference_bias = bias
    if paged:  # the same mask over the logical (padded) key order
        reference_bias = (
            ab.BlockDiagonalPaddedKeysMask
            if type(bias) is ab.PagedBlockDiagonalPaddedKeysMask
            else ab.BlockDiagonalCausalWithOffsetPaddedKeysMask
        )(bias.q_seqinfo, bias.k_seqinfo)
    check_close(out, q, k, v, reference_bias, lse=lse)
