"""Malformed inputs to `sparsek.attention`, and short messages about large bad tensors.

Compared against: the documented error contract (TypeError for wrong kinds of values,
ValueError for wrong shapes/values), with a message that names the offending argument;
for tensors of bad values, a message that lists the first few and counts them. (The SDPA
drop-in raises what torch's SDPA raises: `tests/test_sdpa_parity.py`.)
"""

from __future__ import annotations

from collections.abc import Callable

import malformed
import pytest
import torch

import sparsek


def bshd(b=2, s=8, h=4, d=64, dtype=torch.float32):
    return torch.randn(b, s, h, d, dtype=dtype)


Q, K, V = bshd(), bshd(), bshd()
att = sparsek.attention

MALFORMED: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("q-not-tensor", lambda: att([[1.0]], K, V), TypeError, "q must be a torch.Tensor"),
    ("k-not-tensor", lambda: att(Q, None, V), TypeError, "k must be a torch.Tensor"),
    ("v-numpy-like", lambda: att(Q, K, 3.0), TypeError, "v must be a torch.Tensor"),
    ("q-int-dtype", lambda: att(Q.long(), K, V), TypeError, "q has dtype torch.int64"),
    ("k-bool-dtype", lambda: att(Q, K.bool(), V), TypeError, "k has dtype torch.bool"),
    ("q-sparse", lambda: att(Q.to_sparse(), K, V), TypeError, "q has layout torch.sparse_coo"),
    (
        "k-nested",
        lambda: att(Q, torch.nested.nested_tensor([K[0], K[1, :5]]), V),
        TypeError,
        "k is a nested tensor",
    ),
    ("q-3d", lambda: att(Q[0], K, V), ValueError, "q must be 4-D"),
    ("k-5d", lambda: att(Q, K[None], V), ValueError, "k must be 4-D"),
    ("k-dtype-mismatch", lambda: att(Q, K.double(), V), ValueError, "k.dtype=torch.float64"),
    ("v-dtype-mismatch", lambda: att(Q, K, V.half()), ValueError, "v.dtype=torch.float16"),
    ("k-device-mismatch", lambda: att(Q, K.to("meta"), V), ValueError, "k.device=meta"),
    ("batch-mismatch", lambda: att(Q, bshd(b=3), bshd(b=3)), ValueError, "k batch size 3"),
    ("head-dim-mismatch", lambda: att(Q, bshd(d=32), bshd(d=32)), ValueError, "k head_dim=32"),
    ("v-seqlen-mismatch", lambda: att(Q, K, bshd(s=9)), ValueError, "v shape"),
    ("heads-not-multiple", lambda: att(bshd(h=6), bshd(h=4), bshd(h=4)), ValueError, "num_heads=6"),
    ("zero-kv-heads", lambda: att(Q, bshd(h=0), bshd(h=0)), ValueError, "num_kv_heads=0"),
    ("zero-head-dim", lambda: att(bshd(d=0), bshd(d=0), bshd(d=0)), ValueError, "head_dim must be"),
    ("scale-str", lambda: att(Q, K, V, softmax_scale="0.1"), TypeError, "softmax_scale must be"),
    ("scale-negative", lambda: att(Q, K, V, softmax_scale=-0.1), ValueError, "softmax_scale"),
    ("scale-zero", lambda: att(Q, K, V, softmax_scale=0.0), ValueError, "softmax_scale"),
    ("scale-nan", lambda: att(Q, K, V, softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("scale-inf", lambda: att(Q, K, V, softmax_scale=float("inf")), ValueError, "softmax_scale"),
    (
        "scale-tensor",
        lambda: att(Q, K, V, softmax_scale=torch.tensor(0.1)),
        TypeError,
        "softmax_scale",
    ),
    ("causal-int", lambda: att(Q, K, V, causal=1), TypeError, "causal must be a bool"),
    (
        "return-lse-str",
        lambda: att(Q, K, V, return_lse="yes"),
        TypeError,
        "return_lse must be a bool",
    ),
]


@pytest.mark.parametrize(("call", "error", "fragment"), malformed.params(MALFORMED))
def test_malformed_input_is_rejected(
    call: Callable[[], object], error: type[Exception], fragment: str
) -> None:
    malformed.assert_rejected(call, error, fragment)


def test_enough_distinct_cases() -> None:
    assert len({name for name, *_ in MALFORMED}) >= 15


@pytest.mark.parametrize(
    "q",
    [
        pytest.param(bshd()[..., ::2].contiguous(), id="contiguous-d32"),
        pytest.param(torch.randn(2, 4, 64, 8).transpose(-1, -2), id="last-dim-strided"),
        pytest.param(bshd()[:, ::2], id="every-other-token"),
    ],
)
def test_any_strides_are_accepted(q: torch.Tensor) -> None:
    k = v = torch.randn(q.shape[0], 5, q.shape[2], q.shape[3])
    out = att(q, k, v)
    want = att(q.contiguous(), k, v)
    assert isinstance(out, torch.Tensor) and isinstance(want, torch.Tensor)
    torch.testing.assert_close(out, want)


# ------------------------------------------------------ bad values of large tensors

BATCH = 10_000
i32 = torch.int32


def assert_short(error: pytest.ExceptionInfo[ValueError], *fragments: str) -> None:
    message = str(error.value)
    assert len(message) < 500, f"{len(message)} characters"
    for fragment in fragments:
        assert fragment in message, message


def test_bad_cache_seqlens_of_a_large_batch_make_a_short_message() -> None:
    q = torch.randn(BATCH, 1, 2, 8)
    cache = torch.randn(BATCH, 16, 1, 8)
    seqlens = torch.randint(1, 17, (BATCH,), dtype=i32)
    seqlens[3], seqlens[17], seqlens[20:1251] = 5000, -1, 17  # 1233 bad entries
    with pytest.raises(ValueError) as error:
        sparsek.attention_with_kvcache(q, cache, cache, seqlens)
    assert_short(
        error,
        "cache_seqlens must lie in [0, 16]",
        "cache_seqlens[3]=5000, [17]=-1, [20]=17, ...",
        f"(1233 of {BATCH} entries)",
    )


def test_bad_block_table_of_a_large_batch_makes_a_short_message() -> None:
    q = torch.randn(BATCH, 1, 2, 8)
    blocks = torch.randn(2 * BATCH, 16, 1, 8)
    table = torch.arange(2 * BATCH, dtype=i32).view(BATCH, 2)
    seqlens = torch.full((BATCH,), 20, dtype=i32)  # both blocks of every sequence in use
    table[5:, 1] = 2 * BATCH
    with pytest.raises(ValueError) as error:
        sparsek.attention_with_kvcache(q, blocks, blocks, seqlens, table)
    assert_short(
        error,
        "block_table entries",
        f"block_table[5, 1]={2 * BATCH}, [6, 1]",
        f"({BATCH - 5} of {2 * BATCH} entries in use)",
    )


def test_bad_cu_seqlens_of_a_large_batch_make_a_short_message() -> None:
    q = torch.randn(2 * BATCH, 2, 8)
    cu = torch.arange(BATCH + 1, dtype=i32) * 2
    cu[7] = 1  # below the entry before it
    cu[100:] = -1
    with pytest.raises(ValueError) as error:
        sparsek.attention_varlen(q, q, q, cu, torch.arange(BATCH + 1, dtype=i32), 2, 1)
    assert_short(
        error,
        "cu_seqlens_q must be non-negative and non-decreasing",
        "cu_seqlens_q[7]=1, [100]=-1, [101]=-1, ...",
        f"({BATCH - 98} of {BATCH + 1} entries)",
    )
