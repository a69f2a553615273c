"""Sliding window, softcap and sinks on the Hopper kernels, through `sparsek.attention`.

Compared against: the float64 reference (`sparsek.reference`, which implements
`sparsek.masks`). Tolerance, as the other GPU suites, relative to the error of a peer in
the same dtype; no PyTorch kernel has softcap or sinks, so the peer is the reference
with its probabilities rounded to the input dtype before the PV product (what the
kernels do):
    max|out - ref| <= 2 * max|peer_out - ref| + atol   (atol 1e-3 fp16, 2e-3 bf16)
LSE: -inf exactly where a row sees no key, elsewhere atol 2e-3, rtol 1e-3. Outputs are
poisoned with NaN before each launch; fallbacks are disabled (`SPARSEK_STRICT=1`), so each
case runs a kernel.
"""

from __future__ import annotations

import pytest
import torch

import sparsek
from sparsek.launch import launcher
from sparsek.masks import make_mask, reference_scores, reference_softmax, visible
from sparsek.reference import causal_offset, reference_attention

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

ATOL = {torch.float16: 1e-3, torch.bfloat16: 2e-3}

# (batch, seqlen_q, seqlen_k, heads, kv_heads, causal, window, softcap, sinks)
CASES = [
    (2, 300, 300, 4, 2, True, (64, -1), 0.0, False),  # causal window, GQA
    (1, 1031, 1031, 8, 2, False, (100, 37), 0.0, False),  # two-sided, odd length
    (2, 100, 333, 4, 4, False, (50, 0), 0.0, False),  # Sq < Sk, window aligned bottom-right
    (2, 333, 100, 4, 1, True, (20, -1), 0.0, False),  # Sq > Sk: early rows see nothing
    (1, 257, 257, 4, 4, False, (0, 0), 0.0, False),  # each row its diagonal key only
    (1, 200, 200, 4, 4, True, (5000, -1), 0.0, False),  # window wider than the sequence
    (1, 513, 513, 4, 4, False, (-1, 64), 0.0, False),  # right side only
    (2, 257, 257, 8, 2, True, (-1, -1), 30.0, False),  # softcap
    (2, 129, 500, 4, 4, False, (-1, -1), 5.0, False),  # strong softcap, Sq < Sk
    (2, 300, 300, 8, 2, True, (-1, -1), 0.0, True),  # sinks
    (1, 1031, 1031, 8, 1, False, (-1, -1), 0.0, True),  # sinks, MQA
    (2, 333, 300, 8, 2, True, (128, -1), 20.0, True),  # all of them, GQA, Sq > Sk
    (1, 4096, 4096, 4, 4, True, (1024, -1), 0.0, False),  # long: band << sequence
]


@pytest.fixture(autouse=True)
def _strict_and_poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEK_STRICT", "1")

    def poisoned(shape, dtype, device, stride=None):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launcher, "empty", poisoned)


def peer_attention(q, k, v, causal, window, softcap, sinks, scale):
    """The reference with P rounded to q's dtype before PV (a same-dtype peer)."""
    mask = make_mask(causal, window, softcap, sinks is not None)
    group = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = reference_scores(torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale, mask.softcap)
    rows = torch.arange(q.shape[1], device=q.device).unsqueeze(1)
    cols = torch.arange(k.shape[1], device=q.device).unsqueeze(0)
    shown = visible(rows, cols, causal_offset(q.shape[1], k.shape[1], False), mask)
    if shown is not None:
        scores = scores.masked_fill(~shown, float("-inf"))
    probs, _ = reference_softmax(scores, None if sinks is None else sinks.view(-1, 1))
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(q.dtype).float(), vf)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    ("b", "sq", "sk", "h", "hkv", "causal", "window", "softcap", "with_sinks"), CASES
)
def test_masks_match_the_reference(
    b, sq, sk, h, hkv, causal, window, softcap, with_sinks, head_dim, dtype
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(sq * 7 + sk)
    q = torch.randn(b, sq, h, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(b, sk, hkv, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b, sk, hkv, head_dim, device="cuda", dtype=dtype, generator=gen)
    sinks = torch.randn(h, device="cuda", generator=gen) * 2 if with_sinks else None
    scale = head_dim**-0.5
    out, lse = sparsek.attention(
        q, k, v, causal=causal, window_size=window, softcap=softcap, sinks=sinks,
        return_lse=True,
    )  # fmt: skip
    ref, ref_lse = reference_attention(
        q, k, v, causal=causal, softmax_scale=scale, window_size=window, softcap=softcap,
        sinks=sinks, compute_dtype=torch.float64,
    )  # fmt: skip
    peer = peer_attention(q, k, v, causal, window, softcap, sinks, scale)
    bound = 2 * (peer.double() - ref).abs().max().item() + ATOL[dtype]
    err = (out.double() - ref).abs().max().item()
    assert not out.isnan().any()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=2e-3, rtol=1e-3)
    assert (out.transpose(1, 2)[empty] == 0).all()  # rows without keys: exactly 0


def test_a_window_visits_only_its_band() -> None:
    """S = 16k with a (1024, 0) window runs in under half the time of full causal
    attention: the tiles outside the band are skipped, not masked (a smoke check; speed
    against peers is measured under perf/, not in tests)."""
    q = torch.randn(1, 16384, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)

    def time_ms(fn) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 5

    causal = time_ms(lambda: sparsek.attention(q, k, v, causal=True))
    windowed = time_ms(lambda: sparsek.attention(q, k, v, causal=True, window_size=(1024, -1)))
    assert windowed < 0.5 * causal, (windowed, causal)
