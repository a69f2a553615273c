"""`sparsek.integrations.xformers.SparseKAttention` on CPU (sparsek's reference path).

Compared against: a float64 softmax over q k^T * scale plus the bias's own
`materialize(...)` (xFormers' definition of each mask), with the tolerance relative to
PyTorch SDPA's error in the same dtype: max|out - ref| <= 2 * max|sdpa - ref| + 1e-3.
Local (sliding-window) biases are compared the same way, with windows smaller and larger
than the sequences, and their conversion to sparsek's window is also checked exactly
(boolean masks over every small shape) and shown to matter (a window one key off fails
the comparison). Also checked: the operator's declared capabilities, `not_supported_reasons`
for each unsupported input, that expanded (stride-0) GQA/MQA K/V reach sparsek without a copy, the
fake-CUDA head-dim / capability checks, torch.compile, and the ImportError without xFormers.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

xops = pytest.importorskip("xformers.ops", reason="xformers is not installed")

from xformers.ops.fmha import attn_bias as ab  # noqa: E402
from xformers.ops.fmha.common import AttentionFwOpBase, Inputs  # noqa: E402

from sparsek.integrations import xformers as sx  # noqa: E402
from sparsek.integrations.xformers import SparseKAttention  # noqa: E402

ATOL = 1e-3
SUPPORTED_BIASES = [None, ab.LowerTriangularMask(), ab.LowerTriangularFromBottomRightMask()]
BIAS_IDS = ["none", "top_left", "bottom_right"]
# Dense local biases: windows of one key (the diagonal alone), a few keys, one-sided, and
# wider than every sequence below.
LOCAL_BIASES = [
    ab.LocalAttentionFromBottomRightMask(window_left=0, window_right=0),
    ab.LocalAttentionFromBottomRightMask(window_left=1, window_right=2),
    ab.LocalAttentionFromBottomRightMask(window_left=3, window_right=0),
    ab.LocalAttentionFromBottomRightMask(window_left=0, window_right=4),
    ab.LocalAttentionFromBottomRightMask(window_left=200, window_right=200),
    ab.LowerTriangularFromBottomRightLocalAttentionMask(1),
    ab.LowerTriangularFromBottomRightLocalAttentionMask(2),
    ab.LowerTriangularFromBottomRightLocalAttentionMask(5),
    ab.LowerTriangularFromBottomRightLocalAttentionMask(200),
]


def bias_id(bias: object) -> str:
    """Test id: the bias type and, for a local bias, its window as xFormers states it."""
    name = type(bias).__name__
    if hasattr(bias, "window_left"):
        return f"{name}({bias.window_left},{bias.window_right})"
    if hasattr(bias, "_window_size"):
        return f"{name}({bias._window_size})"
    return name


LOCAL_IDS = [bias_id(b) for b in LOCAL_BIASES]


def folded(t: torch.Tensor) -> torch.Tensor:
    """BMHK or BMGHK -> (B, M, heads, K), materializing expanded heads."""
    return t.reshape(*t.shape[:2], -1, t.shape[-1]) if t.ndim == 5 else t


def reference(q, k, v, bias, scale=None):
    """float64 attention with xFormers' materialized bias -> (out like q, lse (B, heads, Mq))."""
    qf, kf, vf = (folded(t).double() for t in (q, k, v))
    scale = qf.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if bias is not None:
        scores = scores + bias.materialize(scores.shape, dtype=torch.float64)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # no visible key -> 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out.reshape(*q.shape[:-1], v.shape[-1]), lse


def sdpa_error(q, k, v, bias, ref) -> float:
    """max|SDPA - ref| with SDPA in the inputs' dtype and the materialized bias as mask."""
    qt, kt, vt = (folded(t).transpose(1, 2) for t in (q, k, v))
    mask = None
    if bias is not None:
        mask = bias.materialize((qt.shape[2], kt.shape[2]), dtype=q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    out = torch.nan_to_num(out.transpose(1, 2).double(), nan=0.0).reshape(ref.shape)
    return (out - ref).abs().max().item()


def check(out, q, k, v, bias, lse=None, scale=None) -> None:
    ref, ref_lse = reference(q, k, v, bias, scale)
    assert out.shape == ref.shape and out.dtype == q.dtype
    err = (out.double() - ref).abs().max().item()
    bound = 2 * sdpa_error(q, k, v, bias, ref) + ATOL if scale is None else 4e-3
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"
    if lse is not None:
        ref_lse = ref_lse.reshape(lse.shape)
        assert lse.dtype == torch.float32
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-3, rtol=1e-3)


def randn(*shape, seed=0, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def bmhk(b=2, sq=17, sk=23, h=4, d=64, seed=0):
    return (
        randn(b, sq, h, d, seed=seed),
        randn(b, sk, h, d, seed=seed + 1),
        randn(b, sk, h, d, seed=seed + 2),
    )


def gqa_bmghk(b, sq, sk, g, h, d, seed=0):
    """xFormers' GQA: query (B, M, G, H, K), K/V (B, M, G, 1, K) expanded along H."""
    q = randn(b, sq, g, h, d, seed=seed)
    k = randn(b, sk, g, 1, d, seed=seed + 1).expand(b, sk, g, h, d)
    v = randn(b, sk, g, 1, d, seed=seed + 2).expand(b, sk, g, h, d)
    return q, k, v


def varlen_biases() -> list[object]:
    block = ab.BlockDiagonalMask.from_seqlens([3, 5], [4, 6], device=torch.device("cpu"))
    padded = ab.BlockDiagonalPaddedKeysMask.from_seqlens(
        [3, 5], 8, [4, 6], device=torch.device("cpu")
    )
    offset = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [3, 5], 8, [4, 6], device=torch.device("cpu")
    )
    gappy = ab.BlockDiagonalGappyKeysMask.from_seqlens(
        [3, 5], [0, 8, 16], [4, 6], device=torch.device("cpu")
    )
    tables = torch.arange(4, dtype=torch.int32).view(2, 2)
    return [
        block,
        block.make_causal(),
        block.make_causal_from_bottomright(),
        block.make_local_attention(2),
        padded,
        offset,
        padded.make_paged(tables, 4, ab.PagedBlockDiagonalPaddedKeysMask),
        offset.make_paged(tables, 4, ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask),
        gappy,
        gappy.make_paged(tables, 4, 8, ab.PagedBlockDiagonalGappyKeysMask),
    ]


# ---------------------------------------------------------------------------- declarations


def test_capabilities() -> None:
    op = SparseKAttention
    assert issubclass(op, AttentionFwOpBase)
    assert op.NAME == "sparsekF" and op.OPERATOR is torch.ops.sparsek.attention
    assert op.is_available()
    assert {"cuda", "cpu"} == op.SUPPORTED_DEVICES
    assert {torch.float16, torch.bfloat16} == op.SUPPORTED_DTYPES
    assert op.CUDA_MINIMUM_COMPUTE_CAPABILITY == (9, 0)
    assert op.SUPPORTS_CUSTOM_SCALE and op.SUPPORTS_BMGHK
    assert not (op.SUPPORTS_DROPOUT or op.SUPPORTS_DIFFERENT_VALUE_EMBED)
    assert not (op.SUPPORTS_OUTPUT_DTYPE or op.SUPPORTS_PARTIAL)
    paged = {
        ab.PagedBlockDiagonalPaddedKeysMask,
        ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    }
    assert (
        set(op.SUPPORTED_ATTN_BIAS_TYPES)
        == {type(b) for b in SUPPORTED_BIASES + LOCAL_BIASES}
        | {type(b) for b, _ in block_diagonal_cases()}
        | paged
    )
    for bias in varlen_biases()[-2:]:  # gappy keys
        assert type(bias) not in op.SUPPORTED_ATTN_BIAS_TYPES


@pytest.mark.parametrize("bias", SUPPORTED_BIASES + LOCAL_BIASES, ids=BIAS_IDS + LOCAL_IDS)
def test_supported_inputs_have_no_reasons(bias) -> None:
    assert SparseKAttention.not_supported_reasons(Inputs(*bmhk(), attn_bias=bias)) == []


# ---------------------------------------------------------------------------- refusals


# (index into varlen_biases(), words every reason list must contain)
REFUSED_BLOCK_DIAGONAL = [
    (1, "as many queries as keys"),  # top-left causal, blocks of unequal q/k lengths
    (3, "as many queries as keys"),  # top-left causal local, blocks of unequal lengths
    (6, "page_size=4"),
    (7, "page_size=4"),
    (8, "not supported"),  # gappy keys
    (9, "not supported"),
]


@pytest.mark.parametrize(("index", "words"), REFUSED_BLOCK_DIAGONAL)
def test_unsupported_block_diagonal_biases_refused(index, words) -> None:
    bias = varlen_biases()[index]
    q, k, v = bmhk(b=1, sq=8, sk=16)
    reasons = SparseKAttention.not_supported_reasons(Inputs(q, k, v, attn_bias=bias))
    assert any(words in r for r in reasons), reasons
    with pytest.raises(ValueError, match=words.split("=")[0]):
        xops.memory_efficient_attention_forward(q, k, v, bias, op=SparseKAttention)


def test_top_left_local_refusal_names_the_bottom_right_bias() -> None:
    bias = varlen_biases()[3]
    q, k, v = bmhk(b=1, sq=8, sk=10)
    reasons = SparseKAttention.not_supported_reasons(Inputs(q, k, v, attn_bias=bias))
    assert any("BlockDiagonalCausalLocalAttentionFromBottomRightMask" in r for r in reasons)


def block_diagonal_cases() -> list[tuple[object, tuple[int, int]]]:
    """(bias, (query rows, key rows)) for every supported block-diagonal bias type; the
    local ones with windows of one key, a few keys and wider than every block, over
    blocks with fewer, as many and more queries than keys, and empty blocks."""
    cpu = torch.device("cpu")
    block = ab.BlockDiagonalMask.from_seqlens([3, 17, 0, 9], [5, 17, 4, 1], device=cpu)
    keys_ge_queries = ab.BlockDiagonalMask.from_seqlens([3, 17, 0, 9], [5, 17, 4, 11], device=cpu)
    square = ab.BlockDiagonalMask.from_seqlens([3, 17, 9], device=cpu)
    padded = ab.BlockDiagonalPaddedKeysMask.from_seqlens([3, 5, 1], 32, [20, 0, 32], device=cpu)
    offset = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [3, 5, 1], 32, [20, 7, 32], device=cpu
    )
    # Local padded-key blocks: more queries than keys (8 vs 3), none, fewer, no keys.
    local_padded = ab.BlockDiagonalPaddedKeysMask.from_seqlens(
        [8, 0, 5, 4], 24, [3, 6, 24, 0], device=cpu
    )
    local_offset = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [8, 5, 4], 24, [3, 24, 11], device=cpu
    )
    return [
        (block, (29, 27)),
        (keys_ge_queries.make_causal_from_bottomright(), (29, 37)),
        (square.make_causal(), (29, 29)),
        (padded, (9, 96)),
        (offset, (9, 96)),
        *(
            (keys_ge_queries.make_local_attention_from_bottomright(w), (29, 37))
            for w in (1, 3, 100)
        ),
        *((square.make_local_attention(w), (29, 29)) for w in (1, 4, 100)),
        *(
            (local_padded.make_local_attention(left, right), (17, 96))
            for left, right in ((0, 0), (2, 1), (0, 3), (100, 100))
        ),
        *(
            (
                ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask(
                    q_seqinfo=local_offset.q_seqinfo,
                    k_seqinfo=local_offset.k_seqinfo,
                    _window_size=w,
                ),
                (17, 72),
            )
            for w in (1, 3, 100)
        ),
    ]


@pytest.mark.parametrize("case", block_diagonal_cases(), ids=lambda c: bias_id(c[0]) + str(c[1]))
@pytest.mark.parametrize("layout", ["bmhk", "bmghk"])
def test_block_diagonal_numerics(case, layout) -> None:
    bias, (mq, mk) = case
    if layout == "bmhk":
        q, k, v = bmhk(1, mq, mk, 3, 64, seed=mq)
    else:
        q, k, v = gqa_bmghk(1, mq, mk, 2, 3, 64, seed=mq)
    assert SparseKAttention.not_supported_reasons(Inputs(q, k, v, attn_bias=bias)) == []
    out, lse = xops.memory_efficient_attention_forward_requires_grad(
        q, k, v, bias, op=SparseKAttention
    )
    assert lse.shape == (1, *q.shape[2:-1], mq)
    check(out, q, k, v, bias, lse=lse)


@pytest.mark.parametrize("index", [3, 4], ids=["padded", "causal_offset"])
def test_paged_block_diagonal_matches_padded(index) -> None:
    """Keys scattered into shuffled 16-row pages give the padded bias's result exactly."""
    padded, (mq, mk) = block_diagonal_cases()[index]
    q, k, v = bmhk(1, mq, mk, 2, 64, seed=7)
    pages_per_seq, page = 2, 16
    order = torch.randperm(3 * pages_per_seq, generator=torch.Generator().manual_seed(0))
    tables = order.view(3, pages_per_seq).to(torch.int32)
    k_paged, v_paged = torch.zeros_like(k), torch.zeros_like(v)
    for slot, block_id in enumerate(order.tolist()):
        rows = slice(block_id * page, (block_id + 1) * page)
        k_paged[0, rows] = k[0, slot * page : (slot + 1) * page]
        v_paged[0, rows] = v[0, slot * page : (slot + 1) * page]
    paged_type = (
        ab.PagedBlockDiagonalPaddedKeysMask
        if index == 3
        else ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask
    )
    paged = padded.make_paged(tables, page, paged_type)
    assert SparseKAttention.not_supported_reasons(Inputs(q, k_paged, v_paged, paged)) == []
    want = xops.memory_efficient_attention_forward(q, k, v, padded, op=SparseKAttention)
    got = xops.memory_efficient_attention_forward(q, k_paged, v_paged, paged, op=SparseKAttention)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


class OtherLocalMask(ab.LocalAttentionFromBottomRightMask):
    """A local bias type the operator does not know (a user's subclass)."""


@pytest.mark.parametrize(
    ("bias", "words"),
    [
        (torch.zeros(2, 4, 17, 23, dtype=torch.float16), "tensor"),
        (ab.LowerTriangularMaskWithTensorBias(torch.zeros(2, 4, 17, 23)), "tensor"),
        (OtherLocalMask(window_left=2, window_right=1), "local"),
    ],
    ids=["tensor", "causal_plus_tensor", "other_local"],
)
def test_other_biases_refused(bias, words) -> None:
    reasons = SparseKAttention.not_supported_reasons(Inputs(*bmhk(), attn_bias=bias))
    assert any(type(bias).__name__ in r and words in r for r in reasons), reasons


def test_dropout_dtype_scale_output_dtype_refused() -> None:
    q, k, v = bmhk()
    reasons = SparseKAttention.not_supported_reasons
    assert any("dropout" in r for r in reasons(Inputs(q, k, v, p=0.1)))
    assert any("dtype=torch.float32" in r for r in reasons(Inputs(q.float(), k.float(), v.float())))
    # As in xFormers' own operators, bfloat16 is refused off the GPU.
    assert any("bf16" in r for r in reasons(Inputs(*(t.bfloat16() for t in (q, k, v)))))
    assert any("scale=-1.0" in r for r in reasons(Inputs(q, k, v, scale=-1.0)))
    assert reasons(Inputs(q, k, v, output_dtype=torch.float32))
    assert any("value" in r for r in reasons(Inputs(q, k, v[..., :32])))


def test_inputs_requiring_grad_refused_with_reason() -> None:
    q, k, v = bmhk()
    q.requires_grad_(True)
    reasons = SparseKAttention.not_supported_reasons(Inputs(q, k, v))
    assert any("backward is not provided" in r for r in reasons)
    with pytest.raises(ValueError, match="backward is not provided"):
        xops.memory_efficient_attention(q, k, v, op=(SparseKAttention, None))


def test_fake_cuda_inputs_checked_against_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA inputs (fake tensors, no GPU): compute capability and registered head dims."""
    from cutedsl_kernels import build

    monkeypatch.setattr(build, "can_implement", lambda config: [])
    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])

    def reasons(d: int, dtype=torch.bfloat16, bias=None) -> list[str]:
        with FakeTensorMode():
            q = torch.empty(2, 33, 4, d, dtype=dtype, device="cuda")
            k = torch.empty(2, 40, 4, d, dtype=dtype, device="cuda")
        return SparseKAttention.not_supported_reasons(Inputs(q, k, k, attn_bias=bias))

    # xFormers' own CUDA extension does not load here; sparsek does not need it.
    assert reasons(128) == []
    assert reasons(64, torch.float16, ab.LowerTriangularMask()) == []
    assert reasons(128, bias=ab.LocalAttentionFromBottomRightMask(3, 2)) == []
    assert reasons(64, torch.float16, ab.LowerTriangularFromBottomRightLocalAttentionMask(8)) == []
    assert any("head_dim=80" in r and "64, 96, 128" in r for r in reasons(80))
    capability[0] = (8, 0)
    monkeypatch.setenv("SPARSEK_ARCH", "sm_80")
    assert any("too old" in r for r in reasons(128))


# ---------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("bias", SUPPORTED_BIASES + LOCAL_BIASES, ids=BIAS_IDS + LOCAL_IDS)
@pytest.mark.parametrize(
    ("b", "sq", "sk", "h", "d"),
    [(2, 17, 17, 4, 64), (1, 33, 70, 2, 128), (2, 45, 13, 3, 64), (1, 1, 31, 2, 48)],
    ids=["square", "sq<sk", "sq>sk", "decode_d48"],
)
def test_bmhk_numerics(bias, b, sq, sk, h, d) -> None:
    q, k, v = bmhk(b, sq, sk, h, d, seed=sq + sk)
    out = xops.memory_efficient_attention_forward(q, k, v, bias, op=SparseKAttention)
    check(out, q, k, v, bias)
    assert torch.equal(
        out, xops.memory_efficient_attention(q, k, v, bias, op=(SparseKAttention, None))
    )
    out2, lse = xops.memory_efficient_attention_forward_requires_grad(
        q, k, v, bias, op=SparseKAttention
    )
    assert lse.shape == (b, h, sq) and torch.equal(out2, out)
    check(out2, q, k, v, bias, lse=lse)


def test_custom_scale_and_bmk() -> None:
    q, k, v = (t[:, :, 0] for t in bmhk(h=1))  # (B, M, K): xFormers' legacy layout
    out = xops.memory_efficient_attention_forward(q, k, v, scale=0.3, op=SparseKAttention)
    check(out.unsqueeze(2), q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), None, scale=0.3)


@pytest.mark.parametrize("bias", SUPPORTED_BIASES + LOCAL_BIASES, ids=BIAS_IDS + LOCAL_IDS)
@pytest.mark.parametrize(
    ("sq", "sk", "g", "h"),
    [(19, 19, 2, 3), (9, 40, 1, 4), (40, 9, 3, 1)],
    ids=["gqa", "mqa", "mha"],
)
def test_bmghk_gqa_numerics(bias, sq, sk, g, h) -> None:
    q, k, v = gqa_bmghk(2, sq, sk, g, h, 64, seed=sq)
    out, lse = xops.memory_efficient_attention_forward_requires_grad(
        q, k, v, bias, op=SparseKAttention
    )
    assert out.shape == q.shape and lse.shape == (2, g, h, sq)
    check(out, q, k, v, bias, lse=lse)


def test_bmghk_unexpanded_kv() -> None:
    """BMGHK with distinct K/V per (group, head): plain multi-head attention."""
    q, k, v = (randn(2, 21, 2, 3, 64, seed=s) for s in (1, 2, 3))
    out = xops.memory_efficient_attention_forward(q, k, v, op=SparseKAttention)
    check(out, q, k, v, None)


def record_op(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, ...]]:
    calls: list[tuple[torch.Tensor, ...]] = []
    original = sx._attention_bshd

    def recording(q, k, v, *args):
        calls.append((q, k, v))
        return original(q, k, v, *args)

    monkeypatch.setattr(sx, "_attention_bshd", recording)
    return calls


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize(("g", "h"), [(2, 4), (1, 8)], ids=["gqa", "mqa"])
def test_expanded_kv_reach_sparsek_without_copy(monkeypatch: pytest.MonkeyPatch, g, h) -> None:
    calls = record_op(monkeypatch)
    q, k, v = gqa_bmghk(1, 16, 24, g, h, 64)
    out = xops.memory_efficient_attention_forward(q, k, v, op=SparseKAttention)
    ((sq, sk, sv),) = calls
    assert sq.shape == (1, 16, g * h, 64) and same_memory(sq, q)
    assert sk.shape == sv.shape == (1, 24, g, 64)
    assert same_memory(sk, k) and same_memory(sv, v)
    assert all(s > 0 for s in sk.stride()) and all(s > 0 for s in sv.stride())
    check(out, q, k, v, None)


def test_bmhk_mqa_expanded_kv_without_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_op(monkeypatch)
    q = randn(2, 16, 6, 64)
    k = randn(2, 24, 1, 64, seed=1).expand(2, 24, 6, 64)
    v = randn(2, 24, 1, 64, seed=2).expand(2, 24, 6, 64)
    bias = ab.LowerTriangularFromBottomRightMask()
    out = xops.memory_efficient_attention_forward(q, k, v, bias, op=SparseKAttention)
    ((_, sk, sv),) = calls
    assert sk.shape == sv.shape == (2, 24, 1, 64) and sk.stride() == (24 * 64, 64, 64, 1)
    assert same_memory(sk, k) and same_memory(sv, v)
    check(out, q, k, v, bias)


# ---------------------------------------------------------------------------- windows


def visible_keys(bias, mq: int, mk: int) -> torch.Tensor:
    """Which keys each query sees through the operator, exactly: equal scores (q = k = 0)
    and one-hot values (value j = e_j) make out[i, j] = 1 / (keys row i sees) when row i
    sees key j, else 0. -> bool (mq, mk)."""
    q = torch.zeros(1, mq, 1, mk, dtype=torch.float16)
    v = torch.eye(mk, dtype=torch.float16).view(1, mk, 1, mk)
    out = xops.memory_efficient_attention_forward(
        q, q.new_zeros(v.shape), v, bias, op=SparseKAttention
    )
    return out[0, :, 0] > 0


def materialized(bias, mq: int, mk: int) -> torch.Tensor:
    return bias.materialize((mq, mk), dtype=torch.float32).isfinite()


def dense_local_biases(size: int) -> list[object]:
    bands = itertools.product(range(size), repeat=2)
    return [ab.LocalAttentionFromBottomRightMask(left, right) for left, right in bands] + [
        ab.LowerTriangularFromBottomRightLocalAttentionMask(w) for w in range(1, size + 1)
    ]


@pytest.mark.parametrize("sk", range(1, 8), ids=lambda n: f"sk{n}")
def test_dense_local_masks_exact(sk) -> None:
    """Every (Sq, Sk) up to 7 x 7 and every window up to 6 keys each side (beyond the
    longest sequence): the keys the operator lets each query see are exactly the
    finite entries of the bias's own `materialize(...)`."""
    for sq, bias in itertools.product(range(1, 8), dense_local_biases(7)):
        got = visible_keys(bias, sq, sk)
        assert torch.equal(got, materialized(bias, sq, sk)), (bias_id(bias), sq, sk)


@pytest.mark.parametrize(
    "case", block_diagonal_cases()[5:], ids=lambda c: bias_id(c[0]) + str(c[1])
)
def test_block_diagonal_local_masks_exact(case) -> None:
    bias, (mq, mk) = case
    assert torch.equal(visible_keys(bias, mq, mk), materialized(bias, mq, mk))


def block_diagonal_case(name: str) -> tuple[object, tuple[int, int]]:
    """The case of `block_diagonal_cases()` whose bias has this `bias_id`."""
    (case,) = (c for c in block_diagonal_cases() if bias_id(c[0]) == name)
    return case


OFF_BY_ONE = [
    (ab.LocalAttentionFromBottomRightMask(window_left=2, window_right=1), (9, 9)),
    (ab.LocalAttentionFromBottomRightMask(window_left=2, window_right=1), (5, 11)),
    (ab.LowerTriangularFromBottomRightLocalAttentionMask(3), (11, 7)),
    block_diagonal_case("BlockDiagonalCausalLocalAttentionFromBottomRightMask(3)"),
    block_diagonal_case("BlockDiagonalCausalLocalAttentionMask(4)"),
    block_diagonal_case("BlockDiagonalLocalAttentionPaddedKeysMask(2,1)"),
    block_diagonal_case("BlockDiagonalCausalLocalAttentionPaddedKeysMask(3)"),
]


def off_by_one_params() -> list[object]:
    """(bias, shape, shift) for each case: the window's left side one key wider and
    narrower, and for a two-sided band its right side too (a causal window's right side
    is the causal mask's)."""
    params = []
    for bias, shape in OFF_BY_ONE:
        sides = [(1, 0), (-1, 0)] + ([(0, 1), (0, -1)] if hasattr(bias, "window_right") else [])
        params += [
            pytest.param(bias, shape, shift, id=f"{bias_id(bias)}{shape}{shift}") for shift in sides
        ]
    return params


@pytest.mark.parametrize(("bias", "shape", "shift"), off_by_one_params())
def test_window_one_key_off_fails_the_comparisons(
    monkeypatch: pytest.MonkeyPatch, bias, shape, shift
) -> None:
    """The tests above catch a window conversion one key off on either side: with the
    window shifted, both the exact mask and the float64 comparison fail."""
    mq, mk = shape
    left, right = sx._window(bias)
    shifted = (left + shift[0], right + shift[1])
    monkeypatch.setattr(sx, "_window", lambda b: shifted)
    assert not torch.equal(visible_keys(bias, mq, mk), materialized(bias, mq, mk))
    q, k, v = bmhk(1, mq, mk, 2, 64, seed=3)
    out, lse = xops.memory_efficient_attention_forward_requires_grad(
        q, k, v, bias, op=SparseKAttention
    )
    with pytest.raises(AssertionError):
        check(out, q, k, v, bias, lse=lse)


# ---------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize(
    "bias",
    [*SUPPORTED_BIASES, LOCAL_BIASES[1], LOCAL_BIASES[7]],
    ids=[*BIAS_IDS, LOCAL_IDS[1], LOCAL_IDS[7]],
)
def test_torch_compile_fullgraph_with_bias_argument(bias) -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def f(q, k, v, attn_bias):
        return (
            xops.memory_efficient_attention_forward(
                q, k, v, attn_bias=attn_bias, op=SparseKAttention
            )
            * 2
        )

    compiled = torch.compile(f, backend=counter, fullgraph=True)
    q, k, v = gqa_bmghk(2, 19, 27, 2, 2, 64)
    assert torch.equal(compiled(q, k, v, bias), f(q, k, v, bias))
    assert counter.frame_count == 1


def test_torch_compile_dynamic_memory_efficient_attention() -> None:
    torch._dynamo.reset()

    def f(q, k, v, attn_bias):
        return xops.memory_efficient_attention(q, k, v, attn_bias, op=(SparseKAttention, None))

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    bias = ab.LowerTriangularMask()
    for s in (17, 40):
        q, k, v = bmhk(2, s, s + 3, 4, 64, seed=s)
        assert torch.equal(compiled(q, k, v, bias), f(q, k, v, bias))


# ---------------------------------------------------------------------------- import


def test_import_without_xformers_says_how_to_install() -> None:
    code = (
        "import sys; sys.modules['xformers'] = None\n"
        "try:\n    import sparsek.integrations.xformers\n"
        "except ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pip install xformers==0.0.35" in result.stdout
    assert "in a sparsek checkout: pip install '.[xformers]'" in result.stdout
