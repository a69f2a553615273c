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
"""

from __future__ import annotations

import math

import pytest
import torch
from test_varlen_gpu import (
    DEVICE,
    GARBAGE_SCALE,
    as_packed,
    check_close,
    expected,
    generator,
    int32,
    randn,
    strict_and_poisoned,  # noqa: F401  (autouse fixture: strict mode, NaN outputs)
)
from torch import Tensor

from sparsek.integrations.vllm import kernels as vllm_kernels

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

# KVCacheLayout: physical axis k is logical axis ORDER[k] of (L, B, H, N, C).
LAYOUTS = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4)}
NUM_LAYERS, LAYER = 2, 1


def vllm_layer_cache(layout: str, num_blocks: int, hkv: int, block_size: int, d: int, dtype, gen):
    """(raw buffer, layer view (num_blocks, Hkv, block_size, 2D)) as vLLM lays them out."""
    logical = (NUM_LAYERS, num_blocks, hkv, block_size, 2 * d)
    order = LAYOUTS[layout]
    raw = randn(gen, *(logical[i] for i in order), dtype=dtype) * GARBAGE_SCALE
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


def write(step: Step, k_cache, v_cache, table, block_size: int, which: str, pad: int = 0):
    """store_kv the contexts ("context") or the new tokens ("new", + `pad` slots of -1)."""
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
    vllm_kernels.store_kv(key, value, k_cache, v_cache, slot_mapping)
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


def check_store(before, raw, kv_cache, k_cache, v_cache, step: Step, slot_list) -> None:
    """The new tokens' rows at their slots, bit for bit; nothing else changed."""
    block_size = k_cache.shape[1]
    want = before.clone()
    # Rebuild the same layer view on the copy and write the expected rows through it.
    offset = kv_cache.storage_offset() - raw.storage_offset()
    want_view = want.as_strided(kv_cache.shape, kv_cache.stride(), want.storage_offset() + offset)
    wk, wv = vllm_kernels.split_kv_cache(want_view, k_cache.shape[-1])
    rows_k = torch.cat([kb[c:] for kb, c in zip(step.ks, step.contexts, strict=True)])
    rows_v = torch.cat([vb[c:] for vb, c in zip(step.vs, step.contexts, strict=True)])
    for i, slot in enumerate(s for s in slot_list if s >= 0):
        wk[slot // block_size, slot % block_size] = rows_k[i]
        wv[slot // block_size, slot % block_size] = rows_v[i]
    assert torch.equal(raw.view(torch.int16), want.view(torch.int16)), "store_kv wrote wrong bytes"


def test_store_kv_with_only_padding_writes_nothing() -> None:
    gen = generator(1)
    raw, kv_cache = vllm_layer_cache("LBNHC", 6, 2, 16, 64, torch.bfloat16, gen)
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, 64)
    before = raw.clone()
    key = randn(gen, 4, 2, 64, dtype=torch.bfloat16)
    slot_mapping = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    vllm_kernels.store_kv(key, key, k_cache, v_cache, slot_mapping)
    assert torch.equal(raw.view(torch.int16), before.view(torch.int16))


def test_decode_step_replays_in_a_cuda_graph() -> None:
    """FULL-graph decode, as vLLM captures it: padded requests (query 0..3 rows, seq_len 0),
    static metadata buffers rewritten between replays, output of each replay checked."""
    dtype, d, h, hkv, block_size = torch.bfloat16, 128, 32, 8, 16
    real, padded = 5, 8
    capacity_blocks = 80
    num_blocks = padded * capacity_blocks + 1
    gen = generator(21)
    _, kv_cache = vllm_layer_cache("LBNHC", num_blocks, hkv, block_size, d, dtype, gen)
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

    def step_fn() -> None:
        vllm_kernels.store_kv(k_buf, v_buf, k_cache, v_cache, slot_buf)
        vllm_kernels.paged_attention(
            q_buf, k_cache, v_cache, qsl_buf, seq_buf, table, 1, scale, out_buf
        )

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
    vllm_kernels.store_kv(keys, values, k_cache, v_cache, torch.tensor(ctx_slots, device=DEVICE))

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
        out_buf.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expect = as_packed(expected(qs, step.ks, step.vs, True, scale))
        check_close(out_buf[:real], expect)
        assert (out_buf[real:] == 0).all(), "padded requests (seq_len 0) must give 0"
