"""The kernel calls of sparsek's vLLM backend on an H100, without vLLM (they need only
sparsek and torch; vLLM 0.33 pins torch 2.14): `sparsek.integrations.vllm.kernels`, which
`SparseKImpl.do_kv_cache_update` / `SparseKImpl.forward` call unchanged.

The cache is built the way vLLM 0.33 allocates it: one buffer per group of layers, viewed
per layer as (num_blocks, num_kv_heads, block_size, 2 * head_size) in a `KVCacheLayout`
physical order (LBNHC, vLLM's default; LBHNC and BLNHC too), so K/V are strided views. It is
filled the way vLLM fills it: `store_kv` with a slot mapping over shuffled blocks (block 0,
vLLM's null block, never assigned), padding slots -1. Each step's batch mixes what vLLM's
scheduler sends: decodes, chunked prefills over a context and whole prefills.

Compared against: float64 attention of each sequence's new queries over all its tokens
(bottom-right causal), computed from the dense per-sequence K/V generated before they were
written (so the expected values never read the cache layout); tolerances and helpers from
test_varlen_gpu.py. `store_kv` is checked bit for bit: the new rows at their slots, every
other byte of the buffer (other layer, null block, padding) unchanged. Outputs are poisoned
with NaN; fallbacks are off (`SPARSEK_STRICT=1`).

Layers with vLLM's mask arguments (sliding_window, logits_soft_cap, sinks) are compared
against float64 attention with vLLM's definition of them, written out here
(`masked_reference`: the query at position p sees j iff j <= p and p - j <
sliding_window), not sparsek's window arguments; the tolerance's peer is that reference
with its probabilities rounded to the input dtype before the PV product (no PyTorch kernel
has softcap or sinks; as tests/gpu/test_masks_gpu.py). A windowed layer's batch runs over
a block table where the blocks before every query's window point at vLLM's null block
(block 0, zeros), as vLLM's sliding-window manager leaves them.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from attention_oracle import reference_f64, sdpa_in_dtype
from test_varlen_gpu import (
    DEVICE,
    GARBAGE_SCALE,
    as_packed,
    check_close,
    expected,
    generator,
    int32,
    randn,
)
from torch import Tensor

from sparsek.fp8 import FP8_DTYPE as FP8
from sparsek.fp8 import quantize
from sparsek.integrations.vllm import kernels as vllm_kernels
from sparsek.launch import launcher

pytestmark = [pytest.mark.gpu, pytest.mark.sm90, pytest.mark.usefixtures("strict_and_poisoned")]

# KVCacheLayout: physical axis k is logical axis ORDER[k] of (L, B, H, N, C).
LAYOUTS = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4)}
NUM_LAYERS, LAYER = 2, 1


def vllm_layer_cache(layout: str, num_blocks: int, hkv: int, block_size: int, d: int, dtype, gen):
    """(raw buffer, layer view (num_blocks, Hkv, block_size, 2D)) as vLLM lays them out;
    an FP8 cache's buffer holds finite E4M3 garbage."""
    logical = (NUM_LAYERS, num_blocks, hkv, block_size, 2 * d)
    order = LAYOUTS[layout]
    shape = [logical[i] for i in order]
    if dtype == FP8:
        raw = quantize(randn(gen, *shape, dtype=torch.float32), torch.ones(1, device=DEVICE))
    else:
        raw = randn(gen, *shape, dtype=dtype) * GARBAGE_SCALE
    inverse = sorted(range(5), key=lambda i: order[i])
    return raw, raw.permute(*inverse)[LAYER]


class Step:
    """One scheduler step: per sequence (context tokens already cached, new tokens)."""

    def __init__(self, contexts: list[int], new: list[int], hkv: int, d: int, dtype, seed: int):
        self.contexts, self.new = contexts, new
        self.lens = [c + n for c, n in zip(contexts, new, strict=True)]
        gen = generator(seed)
        self.ks = [randn(gen, n, hkv, d, dtype=dtype) for n in self.lens]
        self.vs = [randn(gen, n, hkv, d, dtype=dtype) for n in self.lens]


def assign_blocks(lens: list[int], block_size: int, num_blocks: int, seed: int):
    """Shuffled block ids per sequence (never block 0) and the (B, width) block table."""
    perm = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    used = [-(-n // block_size) for n in lens]
    width = max(used) + 1
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    start = 0
    for b, n in enumerate(used):
        table[b, :n] = perm[start : start + n]
        start += n
    assert start <= num_blocks - 1, "pool too small"
    return table.to(DEVICE)


def slots(table: Tensor, block_size: int, seq: int, positions: range) -> list[int]:
    return [int(table[seq, p // block_size]) * block_size + p % block_size for p in positions]


def write(
    step: Step, k_cache, v_cache, table, block_size: int, which: str, pad: int = 0, scales=None
):
    """store_kv the contexts ("context") or the new tokens ("new", + `pad` slots of -1);
    `scales`: an FP8 cache's (k_scale, v_scale)."""
    keys, values, slot_list = [], [], []
    for b, (c, n) in enumerate(zip(step.contexts, step.new, strict=True)):
        rows = range(0, c) if which == "context" else range(c, c + n)
        keys.append(step.ks[b][rows.start : rows.stop])
        values.append(step.vs[b][rows.start : rows.stop])
        slot_list += slots(table, block_size, b, rows)
    key, value = torch.cat(keys), torch.cat(values)
    if pad:  # CUDA-graph padding tokens: garbage rows, slot -1
        key = torch.cat([key, torch.full_like(key[:pad], 7.0)])
        value = torch.cat([value, torch.full_like(value[:pad], 7.0)])
        slot_list += [-1] * pad
    slot_mapping = torch.tensor(slot_list, dtype=torch.int64, device=DEVICE)
    vllm_kernels.store_kv(key, value, k_cache, v_cache, slot_mapping, scales)
    return slot_list


def queries(step: Step, h: int, d: int, dtype, seed: int) -> list[Tensor]:
    gen = generator(seed + 1)
    return [randn(gen, n, h, d, dtype=dtype) for n in step.new]


def run_step(step: Step, qs, k_cache, v_cache, table, scale: float, pad_rows: int = 0):
    """paged_attention over the step's batch; returns (output, expected)."""
    q = torch.cat(qs)
    starts = [0]
    for n in step.new:
        starts.append(starts[-1] + n)
    out = torch.full(
        (q.shape[0] + pad_rows, *q.shape[1:]), float("nan"), dtype=q.dtype, device=DEVICE
    )
    vllm_kernels.paged_attention(
        q,
        k_cache,
        v_cache,
        int32(starts),
        int32(step.lens),
        table,
        max(step.new),
        scale,
        out[: q.shape[0]],
    )
    expect = as_packed(expected(qs, step.ks, step.vs, True, scale))
    return out, expect


CASES = [
    # (dtype, d, h, hkv, block_size, layout)
    pytest.param(torch.bfloat16, 128, 32, 8, 16, "LBNHC", id="bf16-d128-gqa4-b16-LBNHC"),
    pytest.param(torch.float16, 64, 8, 1, 16, "LBNHC", id="fp16-d64-mqa-b16-LBNHC"),
    pytest.param(torch.bfloat16, 128, 16, 2, 32, "LBHNC", id="bf16-d128-b32-LBHNC"),
    pytest.param(torch.bfloat16, 64, 8, 8, 64, "BLNHC", id="bf16-d64-mha-b64-BLNHC"),
]


@pytest.mark.parametrize(("dtype", "d", "h", "hkv", "block_size", "layout"), CASES)
def test_mixed_batch_over_vllm_cache(dtype, d, h, hkv, block_size, layout) -> None:
    """Decodes, chunked prefills and prefills in one batch, cache written by store_kv."""
    # (context, new): decode at 1k, a first token, chunked prefill, prefill, odd lengths,
    # decode over a long context, a chunk of one, a 3-token speculative-style chunk.
    contexts = [1023, 0, 300, 0, 17, 4999, 64, 129]
    new = [1, 1, 77, 513, 3, 1, 1, 3]
    step = Step(contexts, new, hkv, d, dtype, seed=7)
    num_blocks = sum(-(-n // block_size) for n in step.lens) + 9
    gen = generator(11)
    raw, kv_cache = vllm_layer_cache(layout, num_blocks, hkv, block_size, d, dtype, gen)
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, d)
    assert k_cache.data_ptr() == kv_cache.data_ptr(), "K must be a view, not a copy"
    table = assign_blocks(step.lens, block_size, num_blocks, seed=3)
    # What the backend's metadata builder does when vLLM creates it: every kernel loads.
    vllm_kernels.load_kernels(torch.device(DEVICE), d, dtype, block_size)

    write(step, k_cache, v_cache, table, block_size, "context")
    before = raw.clone()
    slot_list = write(step, k_cache, v_cache, table, block_size, "new", pad=5)
    check_store(before, raw, kv_cache, k_cache, v_cache, step, slot_list)

    scale = 1 / math.sqrt(d)
    out, expect = run_step(
        step, queries(step, h, d, dtype, 5), k_cache, v_cache, table, scale, pad_rows=4
    )
    check_close(out[: expect.out.shape[0]], expect)


def check_store(
    before, raw, kv_cache, k_cache, v_cache, step: Step, slot_list, scales=None
) -> None:
    """The new tokens' rows at their slots, bit for bit (an FP8 cache: `fp8.quantize` of
    them by `scales`); nothing else changed."""
    block_size = k_cache.shape[1]
    want = before.clone()
    # Rebuild the same layer view on the copy and write the expected rows through it.
    offset = kv_cache.storage_offset() - raw.storage_offset()
    want_view = want.as_strided(kv_cache.shape, kv_cache.stride(), want.storage_offset() + offset)
    wk, wv = vllm_kernels.split_kv_cache(want_view, k_cache.shape[-1])
    rows_k = torch.cat([kb[c:] for kb, c in zip(step.ks, step.contexts, strict=True)])
    rows_v = torch.cat([vb[c:] for vb, c in zip(step.vs, step.contexts, strict=True)])
    if scales is not None:
        rows_k, rows_v = (quantize(r, s) for r, s in zip((rows_k, rows_v), scales, strict=True))
    for i, slot in enumerate(s for s in slot_list if s >= 0):
        wk[slot // block_size, slot % block_size] = rows_k[i]
        wv[slot // block_size, slot % block_size] = rows_v[i]
    bits = torch.uint8 if raw.element_size() == 1 else torch.int16
    assert torch.equal(raw.view(bits), want.view(bits)), "store_kv wrote wrong bytes"


FP8_CASES = [
    # (dtype, d, h, hkv, block_size, layout)
    pytest.param(torch.bfloat16, 128, 32, 8, 16, "LBNHC", id="bf16-d128-gqa4-b16-LBNHC"),
    pytest.param(torch.float16, 64, 8, 2, 32, "LBHNC", id="fp16-d64-gqa4-b32-LBHNC"),
]


@pytest.mark.parametrize(("dtype", "d", "h", "hkv", "block_size", "layout"), FP8_CASES)
def test_mixed_batch_over_an_fp8_vllm_cache(dtype, d, h, hkv, block_size, layout) -> None:
    """vLLM's kv_cache_dtype="fp8": store_kv writes E4M3 of each new key / k_scale and
    value / v_scale (bit for bit `sparsek.fp8.quantize`, padding slots skipped), and a
    batch of decodes, chunked prefills and prefills over that cache, with the same
    scales as descales, runs the FP8-cache kernels (fallbacks refused). Reference:
    float64 attention over the exactly dequantized keys and values (E4M3 value x scale);
    the tolerance's peer is SDPA in the queries' dtype over them rounded to that dtype."""
    contexts = [1023, 0, 300, 0, 17, 4999, 64, 129]
    new = [1, 1, 77, 513, 3, 1, 1, 3]
    step = Step(contexts, new, hkv, d, dtype, seed=17)
    num_blocks = sum(-(-n // block_size) for n in step.lens) + 9
    raw, kv_cache = vllm_layer_cache(layout, num_blocks, hkv, block_size, d, FP8, generator(13))
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, d)
    table = assign_blocks(step.lens, block_size, num_blocks, seed=5)
    # keys and values ~ N(0, 1): |x| / scale stays below 448 but for far outliers
    scales = (torch.tensor([0.011], device=DEVICE), torch.tensor([0.017], device=DEVICE))
    vllm_kernels.load_kernels(torch.device(DEVICE), d, dtype, block_size, cache_dtype=FP8)

    write(step, k_cache, v_cache, table, block_size, "context", scales=scales)
    before = raw.clone()
    slot_list = write(step, k_cache, v_cache, table, block_size, "new", pad=5, scales=scales)
    check_store(before, raw, kv_cache, k_cache, v_cache, step, slot_list, scales)

    scale = 1 / math.sqrt(d)
    qs = queries(step, h, d, dtype, 9)
    q = torch.cat(qs)
    out = torch.full((q.shape[0] + 4, h, d), float("nan"), dtype=dtype, device=DEVICE)
    starts = list(itertools.accumulate(new, initial=0))
    vllm_kernels.paged_attention(q, k_cache, v_cache, int32(starts), int32(step.lens), table,
                                 max(new), scale, out[: q.shape[0]], descales=scales)  # fmt: skip
    exact = [
        [quantize(t, sc).double() * sc.double() for t in ts]
        for ts, sc in zip((step.ks, step.vs), scales, strict=True)
    ]
    per_seq = [
        (*reference_f64(qb, kb, vb, True, scale),
         sdpa_in_dtype(qb, kb.to(dtype), vb.to(dtype), True, scale))
        for qb, kb, vb in zip(qs, *exact, strict=True)
    ]  # fmt: skip
    check_close(out[: q.shape[0]], as_packed(per_seq))
    assert out[q.shape[0] :].isnan().all(), "padding rows must not be written"


def masked_reference(q, k, v, scale: float, sliding_window, softcap, sinks, *, peer=False):
    """One sequence's new queries q (n, H, D) over all its tokens k/v (L, Hkv, D) with a
    layer's mask as vLLM defines it: the query at position p (the last n of the L) sees
    position j iff j <= p and, with a sliding window, p - j < sliding_window (the window
    counts the query itself); scores s become softcap * tanh(s / softcap); sinks[h] joins
    the softmax denominator of head h. float64 (out (n, H, D), lse (H, n)); `peer`: float32
    with the probabilities rounded to q's dtype before PV, out in q's dtype."""
    n, h, _ = q.shape
    length, hkv, _ = k.shape
    compute = torch.float32 if peer else torch.float64
    kk, vv = (t.to(compute).repeat_interleave(h // hkv, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.to(compute), kk) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    position = torch.arange(n, device=q.device).view(-1, 1) + (length - n)
    key = torch.arange(length, device=q.device).view(1, -1)
    shown = key <= position
    if sliding_window is not None:
        shown &= position - key < sliding_window
    scores = scores.masked_fill(~shown, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # every row sees its own key
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.to(compute).view(-1, 1))
    probs = torch.exp(scores - lse.unsqueeze(-1))
    if peer:
        probs = probs.to(q.dtype).to(compute)
    out = torch.einsum("hqk,khd->qhd", probs, vv)
    return out.to(q.dtype) if peer else (out, lse)


def expected_with_mask(qs, ks, vs, scale: float, sliding_window, softcap, sinks):
    """`expected` (per sequence: float64 out and lse, the peer's out) with a layer's mask."""
    per_seq = []
    for q, k, v in zip(qs, ks, vs, strict=True):
        mask = (sliding_window, softcap, sinks)
        out, lse = masked_reference(q, k, v, scale, *mask)
        per_seq.append((out, lse, masked_reference(q, k, v, scale, *mask, peer=True)))
    return per_seq


def layer_sinks(h: int, seed: int) -> Tensor:
    """Sink logits as a model holds them (bfloat16), read as float32 (the backend's copy)."""
    return (randn(generator(seed), h, dtype=torch.float32) * 2).to(torch.bfloat16).float()


def null_blocks_before_windows(table: Tensor, contexts: list[int], sliding_window, block_size):
    """Point the blocks before every query's window at block 0, as vLLM frees them: the
    first new query of sequence b (position contexts[b]) sees contexts[b] - sliding_window
    + 1 onwards."""
    for b, context in enumerate(contexts):
        table[b, : max(0, context - sliding_window + 1) // block_size] = 0


# vLLM layers (sliding_window, logits_soft_cap, sinks): gpt-oss's (a window and sinks), a
# window with a softcap, each on its own (a strong softcap), a window of one token.
LAYER_MASKS = [
    pytest.param(128, None, True, id="window128-sinks"),
    pytest.param(4096, 50.0, False, id="window4096-softcap50"),
    pytest.param(None, 2.0, False, id="softcap2"),
    pytest.param(None, None, True, id="sinks"),
    pytest.param(100, None, False, id="window100"),
    pytest.param(1, None, False, id="window1"),
    pytest.param(64, 2.0, True, id="window64-softcap2-sinks"),
]


@pytest.mark.parametrize(("sliding_window", "softcap", "with_sinks"), LAYER_MASKS)
@pytest.mark.parametrize(("dtype", "d", "h", "hkv", "block_size", "layout"), CASES[:2])
def test_mixed_batch_with_a_layers_mask(
    dtype, d, h, hkv, block_size, layout, sliding_window, softcap, with_sinks, monkeypatch
) -> None:
    """`test_mixed_batch_over_vllm_cache` for a layer with a sliding window, a logit
    softcap and/or sinks: every kernel the step launches was loaded by load_kernels for
    that mask (nothing compiles or loads during the step)."""
    contexts = [1023, 0, 300, 0, 17, 4999, 64, 129]
    new = [1, 1, 77, 513, 3, 1, 1, 3]
    step = Step(contexts, new, hkv, d, dtype, seed=17)
    num_blocks = sum(-(-n // block_size) for n in step.lens) + 9
    _, kv_cache = vllm_layer_cache(layout, num_blocks, hkv, block_size, d, dtype, generator(12))
    kv_cache[0].zero_()  # vLLM allocates caches zeroed; the null block is never written
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, d)
    table = assign_blocks(step.lens, block_size, num_blocks, seed=4)
    window = vllm_kernels.window_size_of(sliding_window)
    sinks = layer_sinks(h, 6) if with_sinks else None
    vllm_kernels.load_kernels(
        torch.device(DEVICE), d, dtype, block_size, window_size=window,
        softcap=float(softcap or 0), has_sinks=with_sinks,
    )  # fmt: skip

    def no_more_loads(config):
        raise AssertionError(f"kernel loaded during the step: {config}")

    monkeypatch.setattr(launcher, "get_kernel", no_more_loads)
    write(step, k_cache, v_cache, table, block_size, "context")
    write(step, k_cache, v_cache, table, block_size, "new", pad=5)
    if sliding_window is not None:
        null_blocks_before_windows(table, contexts, sliding_window, block_size)

    scale = 1 / math.sqrt(d)
    qs = queries(step, h, d, dtype, 8)
    out = torch.full((sum(new) + 4, h, d), float("nan"), dtype=dtype, device=DEVICE)
    vllm_kernels.paged_attention(
        torch.cat(qs), k_cache, v_cache, int32([0, *itertools.accumulate(new)]),
        int32(step.lens), table, max(new), scale, out[: sum(new)], window_size=window,
        softcap=float(softcap or 0), sinks=sinks,
    )  # fmt: skip
    mask = (sliding_window, softcap, sinks)
    expect = as_packed(expected_with_mask(qs, step.ks, step.vs, scale, *mask))
    check_close(out[: sum(new)], expect)
    assert out[sum(new) :].isnan().all(), "rows past the batch must not be written"


def test_store_kv_with_only_padding_writes_nothing() -> None:
    gen = generator(1)
    raw, kv_cache = vllm_layer_cache("LBNHC", 6, 2, 16, 64, torch.bfloat16, gen)
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, 64)
    before = raw.clone()
    key = randn(gen, 4, 2, 64, dtype=torch.bfloat16)
    slot_mapping = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    vllm_kernels.store_kv(key, key, k_cache, v_cache, slot_mapping)
    assert torch.equal(raw.view(torch.int16), before.view(torch.int16))


GRAPH_MASKS = [
    pytest.param(None, None, False, False, id="plain"),
    pytest.param(64, None, True, False, id="window64-sinks"),  # single-query window decode
    pytest.param(None, 2.0, True, False, id="softcap2-sinks"),  # decode tiles, group sinks
    pytest.param(64, 2.0, False, False, id="window64-softcap2"),
    pytest.param(None, None, False, True, id="plain-fp8-cache"),
    pytest.param(64, 2.0, True, True, id="window64-softcap2-sinks-fp8-cache"),
]


@pytest.mark.parametrize(("sliding_window", "softcap", "with_sinks", "fp8_cache"), GRAPH_MASKS)
def test_decode_step_replays_in_a_cuda_graph(
    sliding_window, softcap, with_sinks, fp8_cache
) -> None:
    """FULL-graph decode, as vLLM captures it: padded requests (query 0..3 rows, seq_len 0),
    static metadata buffers rewritten between replays, output of each replay checked. With
    a layer's mask: the sinks are one persistent float32 tensor, refilled in place before
    the second replay (as the backend does after a weight reload), which reads them. With
    an FP8 cache: the cache update quantizes and attention reads with the layer's
    persistent scales; the reference is over the exactly dequantized keys and values."""
    dtype, d, h, hkv, block_size = torch.bfloat16, 128, 32, 8, 16
    real, padded = 5, 8
    capacity_blocks = 80
    num_blocks = padded * capacity_blocks + 1
    gen = generator(21)
    cache_dtype = FP8 if fp8_cache else dtype
    _, kv_cache = vllm_layer_cache("LBNHC", num_blocks, hkv, block_size, d, cache_dtype, gen)
    scales = None
    if fp8_cache:
        scales = (torch.tensor([0.011], device=DEVICE), torch.tensor([0.017], device=DEVICE))
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, d)
    perm = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0)) + 1
    table = perm[: padded * capacity_blocks].view(padded, capacity_blocks).int().to(DEVICE)

    # Static buffers (vLLM's persistent input buffers).
    q_buf = torch.zeros(padded, h, d, dtype=dtype, device=DEVICE)
    k_buf = torch.zeros(padded, hkv, d, dtype=dtype, device=DEVICE)
    v_buf = torch.zeros_like(k_buf)
    slot_buf = torch.full((padded,), -1, dtype=torch.int64, device=DEVICE)
    qsl_buf = torch.tensor(
        [*range(real + 1), *[padded] * (padded - real)], dtype=torch.int32, device=DEVICE
    )
    seq_buf = torch.zeros(padded, dtype=torch.int32, device=DEVICE)
    out_buf = torch.zeros(padded, h, d, dtype=dtype, device=DEVICE)
    scale = 1 / math.sqrt(d)
    window = vllm_kernels.window_size_of(sliding_window)
    sinks_buf = layer_sinks(h, 60) if with_sinks else None
    mask = dict(window_size=window, softcap=float(softcap or 0), sinks=sinks_buf)

    def step_fn() -> None:
        vllm_kernels.store_kv(k_buf, v_buf, k_cache, v_cache, slot_buf, scales)
        vllm_kernels.paged_attention(
            q_buf, k_cache, v_cache, qsl_buf, seq_buf, table, 1, scale, out_buf, **mask,
            descales=scales,
        )  # fmt: skip

    # Contexts: each real sequence's earlier tokens, written before capture.
    contexts = [100, 1, 1000, 33, 31]
    steps = [Step(contexts, [1] * real, hkv, d, dtype, seed=40)]
    steps.append(Step([c + 1 for c in contexts], [1] * real, hkv, d, dtype, seed=41))
    for b in range(real):  # the second step's sequences extend the first's
        steps[1].ks[b][: contexts[b] + 1] = steps[0].ks[b]
        steps[1].vs[b][: contexts[b] + 1] = steps[0].vs[b]
    full = [range(0, c) for c in contexts]
    first = steps[0]
    keys = torch.cat([first.ks[b][full[b].start : full[b].stop] for b in range(real)])
    values = torch.cat([first.vs[b][full[b].start : full[b].stop] for b in range(real)])
    ctx_slots = [s for b in range(real) for s in slots(table, block_size, b, full[b])]
    ctx_slot_mapping = torch.tensor(ctx_slots, device=DEVICE)
    vllm_kernels.store_kv(keys, values, k_cache, v_cache, ctx_slot_mapping, scales)

    def load(step: Step, seed: int) -> list[Tensor]:
        qs = queries(step, h, d, dtype, seed)
        q_buf.normal_(generator=gen).mul_(100)  # padding rows: garbage
        q_buf[:real] = torch.cat(qs)
        k_buf.fill_(3.0)
        v_buf.fill_(3.0)
        for b in range(real):
            k_buf[b], v_buf[b] = step.ks[b][-1], step.vs[b][-1]
        slot_buf.fill_(-1)
        slot_buf[:real] = torch.tensor(
            [
                slots(table, block_size, b, range(step.lens[b] - 1, step.lens[b]))[0]
                for b in range(real)
            ]
        )
        seq_buf.zero_()
        seq_buf[:real] = int32(step.lens)
        return qs

    load(steps[0], 50)
    step_fn()  # warm-up: loads the kernels (writes what replaying step 0 writes again)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_fn()
    for i, step in enumerate(steps):
        qs = load(step, 50 + i)
        if sinks_buf is not None and i:
            sinks_buf.copy_(layer_sinks(h, 61))  # new values, same tensor
        out_buf.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ks, vs = step.ks, step.vs
        if scales is not None:  # the values the cache holds, exactly
            ks, vs = (
                [quantize(t, sc).double() * sc.double() for t in ts]
                for ts, sc in zip((ks, vs), scales, strict=True)
            )
        if (sliding_window, softcap, with_sinks, fp8_cache) == (None, None, False, False):
            expect = as_packed(expected(qs, ks, vs, True, scale))
        else:
            expect = as_packed(
                expected_with_mask(qs, ks, vs, scale, sliding_window, softcap, sinks_buf)
            )
        check_close(out_buf[:real], expect)
        assert (out_buf[real:] == 0).all(), "padded requests (seq_len 0) must give 0"
