"""The mask arguments (sliding window, softcap, sinks): their checks, canonical form and the
reference's semantics.

Compared against: a per-element loop over (query, key) in float64 written from the
definitions in `sparsek/masks.py` (FlashAttention's window convention), independent of the
reference's vectorized masking.
"""

from __future__ import annotations

import math

import pytest
import torch

from cutedsl_kernels.config import MaskSpec
from sparsek.masks import CAUSAL, NO_MASK, Mask, check_mask_args, make_mask
from sparsek.reference import reference_attention


def loop_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    window: tuple[int, int],
    softcap: float,
    sinks: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one batch entry, (seqlen, heads, dim), one score at a time."""
    seqlen_q, heads, _ = q.shape
    seqlen_k, kv_heads, dim_v = v.shape
    group = heads // kv_heads
    left, right = window
    if causal:
        right = 0
    out = torch.zeros(seqlen_q, heads, dim_v, dtype=torch.float64)
    lse = torch.full((heads, seqlen_q), -math.inf, dtype=torch.float64)
    for h in range(heads):
        for i in range(seqlen_q):
            diagonal = i + seqlen_k - seqlen_q
            logits, values = [], []
            for j in range(seqlen_k):
                if right >= 0 and j > diagonal + right:
                    continue
                if left >= 0 and j < diagonal - left:
                    continue
                s = scale * float(q[i, h] @ k[j, h // group])
                if softcap > 0:
                    s = softcap * math.tanh(s / softcap)
                logits.append(s)
                values.append(v[j, h // group])
            if not logits:
                continue
            terms = logits + ([float(sinks[h])] if sinks is not None else [])
            top = max(terms)
            total = sum(math.exp(t - top) for t in terms)
            lse[h, i] = top + math.log(total)
            for s, value in zip(logits, values, strict=True):
                out[i, h] += math.exp(s - lse[h, i]) * value
    return out, lse


CASES = [
    # (seqlen_q, seqlen_k, causal, window, softcap, with sinks)
    (7, 7, False, (2, 1), 0.0, False),
    (5, 9, True, (3, -1), 0.0, False),  # causal window, Sq < Sk
    (9, 5, False, (-1, 0), 0.0, False),  # = causal, Sq > Sk: early rows see nothing
    (6, 11, False, (0, 0), 0.0, False),  # each row sees its diagonal key only
    (6, 6, False, (20, 20), 0.0, False),  # wider than the sequence
    (8, 8, True, (-1, -1), 5.0, False),  # softcap
    (7, 10, False, (-1, -1), 0.0, True),  # sinks
    (9, 4, True, (1, -1), 2.0, True),  # all of them, some rows without keys
]


@pytest.mark.parametrize(("sq", "sk", "causal", "window", "softcap", "with_sinks"), CASES)
def test_reference_matches_the_definitions(
    sq: int, sk: int, causal: bool, window: tuple[int, int], softcap: float, with_sinks: bool
) -> None:
    gen = torch.Generator().manual_seed(sq * 100 + sk)
    heads, kv_heads, dim = 4, 2, 8
    q = torch.randn(1, sq, heads, dim, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(1, sk, kv_heads, dim, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(1, sk, kv_heads, dim, generator=gen, dtype=torch.float64)
    sinks = torch.randn(heads, generator=gen) if with_sinks else None
    scale = dim**-0.5
    out, lse = reference_attention(
        q, k, v, causal=causal, softmax_scale=scale, window_size=window, softcap=softcap,
        sinks=sinks, compute_dtype=torch.float64,
    )  # fmt: skip
    want_out, want_lse = loop_attention(q[0], k[0], v[0], causal, window, softcap, sinks, scale)
    torch.testing.assert_close(out[0], want_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse[0], want_lse, atol=1e-12, rtol=1e-10)
    if sq > sk and (causal or window == (-1, 0)):
        assert torch.isneginf(lse[0, :, 0]).all() and (out[0, 0] == 0).all()


def test_sinks_take_probability_from_the_values() -> None:
    """A sink far above every score leaves almost nothing for the values; -inf sinks are
    no sinks at all."""
    q, k, v = (torch.randn(1, 5, 2, 8, dtype=torch.float64) for _ in range(3))
    plain, plain_lse = reference_attention(q, k, v, compute_dtype=torch.float64)
    none, none_lse = reference_attention(
        q, k, v, sinks=torch.full((2,), -math.inf), compute_dtype=torch.float64
    )
    torch.testing.assert_close(none, plain)
    torch.testing.assert_close(none_lse, plain_lse)
    big, big_lse = reference_attention(
        q, k, v, sinks=torch.full((2,), 50.0), compute_dtype=torch.float64
    )
    assert big.abs().max() < 1e-15
    torch.testing.assert_close(big_lse, torch.full_like(big_lse, 50.0))


@pytest.mark.parametrize(
    ("causal", "window", "softcap", "sinks", "want"),
    [
        (False, (-1, -1), 0.0, False, NO_MASK),
        (True, (-1, -1), 0.0, False, CAUSAL),
        (False, (-1, 0), 0.0, False, CAUSAL),  # FlashAttention: (-1, 0) is causal
        (True, (-1, 7), 0.0, False, CAUSAL),  # causal sets right to 0
        (True, (4, -1), 0.0, False, Mask(window_left=4, window_right=0)),
        (False, (4, 2), 0.0, False, Mask(window_left=4, window_right=2)),
        (True, (-1, -1), 30.0, True, Mask(causal=True, softcap=30.0, sinks=True)),
    ],
)
def test_make_mask_is_canonical(
    causal: bool, window: tuple[int, int], softcap: float, sinks: bool, want: Mask
) -> None:
    assert make_mask(causal, window, softcap, sinks) == want


def test_mask_spec_names_the_kernel_features() -> None:
    assert make_mask(True, (128, -1), 30.0, True).spec == MaskSpec(
        window=True, softcap=True, sinks=True
    )
    assert make_mask(False, (-1, -1)).spec == MaskSpec()
    assert CAUSAL.spec == MaskSpec(causal=True) and CAUSAL.is_plain


@pytest.mark.parametrize(
    ("window", "softcap", "sinks", "error", "fragment"),
    [
        ((-2, 0), 0.0, None, ValueError, r"window_size=\(-2, 0\)"),
        ((1,), 0.0, None, TypeError, "window_size must be a pair"),
        ((1.5, 2), 0.0, None, TypeError, "window_size must be a pair"),
        ((True, 2), 0.0, None, TypeError, "window_size must be a pair"),
        ((-1, -1), -1.0, None, ValueError, "softcap=-1.0"),
        ((-1, -1), math.inf, None, ValueError, "softcap=inf"),
        ((-1, -1), "30", None, TypeError, "softcap must be a real number"),
        ((-1, -1), 0.0, [0.0] * 4, TypeError, "sinks must be a float32 tensor"),
        ((-1, -1), 0.0, torch.zeros(4, dtype=torch.float16), TypeError, "sinks must be float32"),
        ((-1, -1), 0.0, torch.zeros(3), ValueError, r"\(num_heads,\) = \(4,\)"),
    ],
)
def test_bad_mask_arguments_name_the_argument(
    window: object, softcap: object, sinks: object, error: type, fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        check_mask_args(window, softcap, sinks, num_heads=4, device=torch.device("cpu"))


def test_good_mask_arguments_pass() -> None:
    got = check_mask_args([3, -1], 30, torch.zeros(4), num_heads=4, device=torch.device("cpu"))
    assert got == ((3, -1), 30.0)


# ---------------------------------------------------------------------------- entry points


def test_attention_on_cpu_takes_the_mask_arguments() -> None:
    """`sparsek.attention` on CPU tensors runs the op's reference with the masks: window,
    softcap and sinks reach it (against the per-element loop), the LSE includes the sink."""
    import sparsek

    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 6, 4, 8, generator=gen)
    k, v = torch.randn(1, 9, 2, 8, generator=gen), torch.randn(1, 9, 2, 8, generator=gen)
    sinks = torch.randn(4, generator=gen)
    out, lse = sparsek.attention(
        q, k, v, causal=True, window_size=(2, -1), softcap=3.0, sinks=sinks, return_lse=True
    )
    want_out, want_lse = loop_attention(
        q[0].double(), k[0].double(), v[0].double(), True, (2, -1), 3.0, sinks, 8**-0.5
    )
    torch.testing.assert_close(out[0].double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0].double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"window_size": (-3, 0)}, ValueError, "window_size"),
        ({"window_size": 4}, TypeError, "window_size must be a pair"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"sinks": torch.zeros(3)}, ValueError, "sinks has shape"),
        ({"sinks": torch.zeros(4, dtype=torch.float64)}, TypeError, "sinks must be float32"),
    ],
)
def test_attention_rejects_bad_mask_arguments(kwargs: dict, error: type, fragment: str) -> None:
    import sparsek

    q = torch.randn(1, 5, 4, 8)
    with pytest.raises(error, match=fragment):
        sparsek.attention(q, q[:, :, :2], q[:, :, :2], **kwargs)


def test_the_op_takes_sinks_as_an_input_under_compile() -> None:
    """torch.compile(fullgraph=True) traces the op with a sinks tensor (a graph input: new
    values change the result without a recompile)."""
    import sparsek

    q = torch.randn(1, 5, 2, 8)
    fn = torch.compile(
        lambda q, s: sparsek.attention(q, q, q, window_size=(1, 1), sinks=s), fullgraph=True
    )
    first = fn(q, torch.zeros(2))
    second = fn(q, torch.full((2,), 30.0))
    want = sparsek.attention(q, q, q, window_size=(1, 1), sinks=torch.full((2,), 30.0))
    torch.testing.assert_close(second, want)
    assert not torch.allclose(first, second)


def test_op_schema_and_fake_of_the_mask_arguments() -> None:
    from torch.library import opcheck

    import sparsek.ops  # noqa: F401

    q = torch.randn(1, 5, 4, 8)
    k = torch.randn(1, 7, 2, 8)
    args = (q, k, k, True, 0.25, False, 3, -1, 2.0, torch.randn(4))
    opcheck(torch.ops.sparsek.attention.default, args)
    out, lse = torch.ops.sparsek.attention(q, k, k, False, 0.25, False)  # defaults: no mask
    assert out.shape == q.shape and lse.shape == (1, 4, 5)


# ----------------------------------------------------------- varlen and KV cache


def _sequences(gen: torch.Generator, q_lens: list[int], k_lens: list[int], heads: int = 4):
    """Per-sequence (q, k, v) in (1, len, heads|2, 8) and their packed forms."""
    seqs = [
        (
            torch.randn(1, sq, heads, 8, generator=gen),
            torch.randn(1, sk, 2, 8, generator=gen),
            torch.randn(1, sk, 2, 8, generator=gen),
        )
        for sq, sk in zip(q_lens, k_lens, strict=True)
    ]
    return seqs, [torch.cat([s[i][0] for s in seqs]) for i in range(3)]


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


MASK_KWARGS = [
    {"causal": True, "window_size": (2, -1), "softcap": 3.0, "with_sinks": True},
    {"causal": False, "window_size": (3, 1), "softcap": 0.0, "with_sinks": False},
    {"causal": False, "window_size": (-1, -1), "softcap": 0.0, "with_sinks": True},
]


@pytest.mark.parametrize("case", MASK_KWARGS, ids=str)
def test_attention_varlen_on_cpu_takes_the_mask_arguments(case: dict) -> None:
    """Each sequence of a packed batch is masked as its own dense problem (bottom-right per
    sequence, the per-element loop); empty sequences and rows without keys give 0 / -inf."""
    import sparsek

    gen = torch.Generator().manual_seed(3)
    q_lens, k_lens = [4, 0, 6, 3], [7, 5, 6, 0]
    seqs, (q, k, v) = _sequences(gen, q_lens, k_lens)
    sinks = torch.randn(4, generator=gen) if case["with_sinks"] else None
    mask = {"window_size": case["window_size"], "softcap": case["softcap"], "sinks": sinks}
    out, lse = sparsek.attention_varlen(
        q, k, v, _cu(q_lens), _cu(k_lens), max(q_lens), max(k_lens),
        causal=case["causal"], return_lse=True, **mask,
    )  # fmt: skip
    row = 0
    for (qs, ks, vs), n in zip(seqs, q_lens, strict=True):
        want_out, want_lse = loop_attention(
            qs[0].double(), ks[0].double(), vs[0].double(), case["causal"],
            case["window_size"], case["softcap"], sinks, 8**-0.5,
        )  # fmt: skip
        torch.testing.assert_close(out[row : row + n].double(), want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:, row : row + n].double(), want_lse, atol=1e-5, rtol=1e-5)
        row += n


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", MASK_KWARGS, ids=str)
def test_attention_with_kvcache_on_cpu_takes_the_mask_arguments(paged: bool, case: dict) -> None:
    """Decode and chunked prefill against a cache: the new queries are the last tokens, the
    mask aligned to each sequence's cache length (the per-element loop)."""
    from test_kvcache import make_caches

    import sparsek

    gen = torch.Generator().manual_seed(5)
    lens, q_lens = [9, 1, 14], [3, 1, 5]
    (k, v), (kp, vp, table), seqlens = make_caches(lens, 16, hkv=2, d=8)
    caches = (kp, vp, seqlens, table) if paged else (k, v, seqlens)
    sinks = torch.randn(4, generator=gen) if case["with_sinks"] else None
    mask = {"window_size": case["window_size"], "softcap": case["softcap"], "sinks": sinks}
    q = torch.randn(sum(q_lens), 4, 8, generator=gen)
    out, lse = sparsek.attention_with_kvcache(
        q, *caches, cu_seqlens_q=_cu(q_lens), max_seqlen_q=max(q_lens), causal=case["causal"],
        return_lse=True, **mask,
    )  # fmt: skip
    row = 0
    for b, (n, length) in enumerate(zip(q_lens, lens, strict=True)):
        want_out, want_lse = loop_attention(
            q[row : row + n].double(), k[b, :length].double(), v[b, :length].double(),
            case["causal"], case["window_size"], case["softcap"], sinks, 8**-0.5,
        )  # fmt: skip
        torch.testing.assert_close(out[row : row + n].double(), want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:, row : row + n].double(), want_lse, atol=1e-5, rtol=1e-5)
        row += n
    decode_q = torch.randn(3, 1, 4, 8, generator=gen)
    out = sparsek.attention_with_kvcache(decode_q, *caches, causal=case["causal"], **mask)
    for b, length in enumerate(lens):
        want_out, _ = loop_attention(
            decode_q[b].double(), k[b, :length].double(), v[b, :length].double(),
            case["causal"], case["window_size"], case["softcap"], sinks, 8**-0.5,
        )  # fmt: skip
        torch.testing.assert_close(out[b].double(), want_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"window_size": (0, -2)}, ValueError, "window_size"),
        ({"softcap": float("nan")}, ValueError, "softcap"),
        ({"sinks": torch.zeros(2)}, ValueError, "sinks has shape"),
    ],
)
def test_varlen_and_kvcache_reject_bad_mask_arguments(
    kwargs: dict, error: type, fragment: str
) -> None:
    import sparsek

    q, k = torch.randn(5, 4, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(error, match=fragment):
        sparsek.attention_varlen(q, k, k, cu, cu, 5, 5, **kwargs)
    cache = torch.randn(1, 8, 2, 8)
    with pytest.raises(error, match=fragment):
        sparsek.attention_with_kvcache(
            q[:1, None], cache, cache, torch.tensor([5], dtype=torch.int32), **kwargs
        )


def test_varlen_and_kvcache_op_schemas_take_the_mask_arguments() -> None:
    from test_kvcache import make_caches
    from torch.library import opcheck

    import sparsek.ops  # noqa: F401

    q, k = torch.randn(9, 4, 8), torch.randn(11, 2, 8)
    cu_q, cu_k = _cu([4, 5]), _cu([6, 5])
    opcheck(
        torch.ops.sparsek.attention_varlen.default,
        (q, k, k, cu_q, cu_k, 5, 6, True, 0.25, 2, -1, 3.0, torch.randn(4)),
    )
    (kc, vc), _, seqlens = make_caches([6, 5], 8, hkv=2, d=8)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    opcheck(
        torch.ops.sparsek.attention_with_kvcache.default,
        (q, kc, vc, seqlens, None, cu_q, 5, True, 0.25, 0, 3, 1, 2.0, torch.randn(4)),
    )


def test_varlen_and_kvcache_trace_with_masks_under_compile() -> None:
    """torch.compile(fullgraph=True) of both calls with a window, softcap and a sinks
    tensor as a graph input: new sink values change the result without a recompile."""
    from test_kvcache import make_caches
    from torch._dynamo.testing import CompileCounterWithBackend

    import sparsek

    q, k = torch.randn(9, 4, 8), torch.randn(11, 2, 8)
    cu_q, cu_k = _cu([4, 5]), _cu([6, 5])
    (kc, vc), _, seqlens = make_caches([6, 5], 8, hkv=2, d=8)
    counter = CompileCounterWithBackend("eager")

    @torch.compile(backend=counter, fullgraph=True)
    def both(q, k, sinks):
        varlen = sparsek.attention_varlen(
            q, k, k, cu_q, cu_k, 5, 6, causal=True, window_size=(2, -1), softcap=3.0, sinks=sinks
        )
        cached = sparsek.attention_with_kvcache(
            q, kc, vc, seqlens, cu_seqlens_q=cu_q, max_seqlen_q=5, window_size=(3, -1),
            softcap=2.0, sinks=sinks,
        )  # fmt: skip
        return varlen, cached

    low, high = torch.full((4,), -30.0), torch.full((4,), 30.0)
    first = both(q, k, low)
    second = both(q, k, high)
    assert counter.frame_count == 1
    for got, eager in zip(
        second,
        (
            sparsek.attention_varlen(
                q, k, k, cu_q, cu_k, 5, 6, causal=True, window_size=(2, -1), softcap=3.0,
                sinks=high,
            ),
            sparsek.attention_with_kvcache(
                q, kc, vc, seqlens, cu_seqlens_q=cu_q, max_seqlen_q=5, window_size=(3, -1),
                softcap=2.0, sinks=high,
            ),
        ),
        strict=True,
    ):  # fmt: skip
        torch.testing.assert_close(got, eager)
    assert not torch.allclose(first[0], second[0]) and not torch.allclose(first[1], second[1])


def test_default_mask_arguments_trace_once_under_compile() -> None:
    """The three entry points with their default mask arguments under
    torch.compile(fullgraph=True, dynamic=True) and a backend that runs AOT autograd: one
    trace each over several lengths. A float default (softcap=0.0) is a symbolic input
    there; the argument checks specialize it and dynamo traces the frame a second time."""
    from test_kvcache import make_caches
    from torch._dynamo.testing import CompileCounterWithBackend

    import sparsek

    (kc, vc), _, seqlens = make_caches([6, 5], 8, hkv=2, d=8)

    def dense(q, k):
        return sparsek.attention(q, k, k, causal=True)

    def varlen(q, k):
        cu = _cu([q.shape[0] - 3, 3])
        return sparsek.attention_varlen(q, k, k, cu, cu, q.shape[0], q.shape[0], causal=True)

    def cached(q, k):
        return sparsek.attention_with_kvcache(q, kc, vc, seqlens)

    for fn, shapes in (
        (dense, lambda s: ((2, s, 4, 8), (2, s, 2, 8))),
        (varlen, lambda s: ((s, 4, 8), (s, 2, 8))),
        (cached, lambda s: ((2, s, 4, 8), (1, 1, 1, 8))),
    ):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
        for s in (5, 7, 11):
            q_shape, k_shape = shapes(s)
            q, k = torch.randn(q_shape), torch.randn(k_shape)
            torch.testing.assert_close(compiled(q, k), fn(q, k))
        assert counter.frame_count == 1, fn.__name__
