"""Query/key head dim 192 with value head dim 128 (DeepSeek-style MLA prefill) on the Hopper
kernels: dense (the decode route for one query included), packed varlen and KV caches,
with and without masks.

Compared against: the float64 reference (`sparsek.reference`), with the tolerance rule of
tests/gpu/test_masks_gpu.py (twice the error of the reference with its probabilities
rounded to the input dtype, plus atol). Outputs are poisoned with NaN before each launch;
fallbacks are disabled (`SPARSEK_STRICT=1`), so each case runs a kernel.
"""

from __future__ import annotations

import pytest
import torch
from test_masks_gpu import (
    ATOL,
    SEQ_MASKS,
    check_cache_queries,
    check_sequences,
    mask_inputs,
    peer_attention,
)

import sparsek
from sparsek.reference import reference_attention

pytestmark = [pytest.mark.gpu, pytest.mark.sm90, pytest.mark.usefixtures("strict_and_poisoned")]

D, DV = 192, 128
DTYPES = [torch.float16, torch.bfloat16]
PLAIN = [(False, (-1, -1), 0.0, False), (True, (-1, -1), 0.0, False)]
# (batch, seqlen_q, seqlen_k, heads, kv_heads)
SHAPES = [
    (2, 300, 300, 8, 2),  # GQA
    (1, 1031, 1031, 8, 1),  # MQA, odd length
    (2, 100, 333, 4, 4),  # Sq < Sk
    (2, 333, 100, 4, 1),  # Sq > Sk: causal rows without keys
    (3, 1, 700, 8, 2),  # one query: the decode kernels
]


def rand(gen, dtype, *shape):
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", PLAIN + SEQ_MASKS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_matches_the_reference(shape, case, dtype) -> None:
    b, sq, sk, h, hkv = shape
    gen = torch.Generator(device="cuda").manual_seed(sq * 7 + sk)
    q, k = rand(gen, dtype, b, sq, h, D), rand(gen, dtype, b, sk, hkv, D)
    v = rand(gen, dtype, b, sk, hkv, DV)
    causal, window, softcap, sinks = mask_inputs(case, h, gen)
    out, lse = sparsek.attention(
        q, k, v, causal=causal, window_size=window, softcap=softcap, sinks=sinks,
        return_lse=True,
    )  # fmt: skip
    assert out.shape == (b, sq, h, DV)
    scale = D**-0.5
    ref, ref_lse = reference_attention(
        q, k, v, causal=causal, softmax_scale=scale, window_size=window, softcap=softcap,
        sinks=sinks, compute_dtype=torch.float64,
    )  # fmt: skip
    peer = peer_attention(q, k, v, causal, window, softcap, sinks, scale)
    bound = 2 * (peer.double() - ref).abs().max().item() + ATOL[dtype]
    err = (out.double() - ref).abs().max().item()
    assert not out.isnan().any() and err <= bound, f"max error {err:.3g} > {bound:.3g}"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", PLAIN + SEQ_MASKS, ids=str)
def test_varlen_matches_the_reference(case, dtype) -> None:
    """Packed sequences (an empty one, Sq != Sk, odd lengths), NaN K/V past the last one."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    q_lens, k_lens, h, hkv = [130, 0, 257, 1, 64], [300, 40, 257, 77, 0], 8, 2
    mask_args = mask_inputs(case, h, gen)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q = rand(gen, dtype, total_q + 3, h, D)
    k, v = rand(gen, dtype, total_k + 50, hkv, D), rand(gen, dtype, total_k + 50, hkv, DV)
    k[total_k:], v[total_k:] = float("nan"), float("nan")
    causal, window, softcap, sinks = mask_args
    out, lse = sparsek.attention_varlen(
        q, k, v, cu_q.cuda(), cu_k.cuda(), max(q_lens), max(k_lens), causal=causal,
        window_size=window, softcap=softcap, sinks=sinks, return_lse=True,
    )  # fmt: skip
    assert out.shape == (total_q + 3, h, DV)
    pieces = []
    for i, (nq, nk) in enumerate(zip(q_lens, k_lens, strict=True)):
        if nq:
            rows = torch.arange(int(cu_q[i]), int(cu_q[i]) + nq, device="cuda")
            keys = slice(int(cu_k[i]), int(cu_k[i]) + nk)
            pieces.append((q[rows][None], k[keys][None], v[keys][None], rows))
    check_sequences(out, lse, pieces, mask_args, dtype)
    assert (out[total_q:] == 0).all() and torch.isneginf(lse[:, total_q:]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("num_splits", [1, 3], ids=["no-split", "3-splits"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", PLAIN[1:] + SEQ_MASKS[-1:], ids=str)
def test_kvcache_matches_the_reference(case, paged, num_splits, dtype) -> None:
    """Decode and packed queries over a contiguous or paged cache (NaN past each length),
    split or not: the partials and the combine are 128 wide."""
    gen = torch.Generator(device="cuda").manual_seed(13)
    lens, h = [700, 1, 129, 1024, 33], 8
    mask_args = mask_inputs(case, h, gen)
    check_cache_queries(paged, lens, h, D, dtype, gen, mask_args, num_splits, dv=DV)
