"""Time one decode step of sparsek's vLLM backend, on the GPU, without vLLM.

The step is what `SparseKImpl.do_kv_cache_update` + `SparseKImpl.forward` run per layer:
`store_kv` (the new token's K/V into the paged cache) then `paged_attention`, on a cache in
vLLM's default layout (LBNHC). Timed eagerly (host wall time per step, 200 steps after
warm-up; `store_kv` alone too) and as a CUDA-graph replay (how vLLM runs decode batches
with FULL graphs). bf16, H32 Hkv8 d128, block 16. Prints a markdown table.

    python perf/lab/vllm_step.py > vllm_step.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from sparsek.integrations.vllm import kernels as vllm_kernels  # noqa: E402

SHAPES = ((1, 1024), (1, 32768), (8, 4096), (32, 4096), (128, 4096))
STEPS = 200


def per_call_us(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / STEPS * 1e6


def row(batch: int, context: int, block: int = 16, h: int = 32, hkv: int = 8, d: int = 128) -> str:
    dev, dtype = "cuda", torch.bfloat16
    blocks_per_seq = -(-(context + 1) // block)
    num_blocks = batch * blocks_per_seq + 1  # block 0: vLLM's null block
    kv_cache = torch.randn(num_blocks, block, hkv, 2 * d, device=dev, dtype=dtype).transpose(1, 2)
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, d)
    ids = torch.randperm(num_blocks - 1, device=dev)[: batch * blocks_per_seq] + 1
    table = ids.int().view(batch, blocks_per_seq)
    q = torch.randn(batch, h, d, device=dev, dtype=dtype)
    k, v = torch.randn(2, batch, hkv, d, device=dev, dtype=dtype)
    seq_lens = torch.full((batch,), context + 1, device=dev, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    slots = table[:, context // block].long() * block + context % block
    out = torch.empty_like(q)

    def store() -> None:
        vllm_kernels.store_kv(k, v, k_cache, v_cache, slots)

    def step() -> None:
        store()
        vllm_kernels.paged_attention(
            q, k_cache, v_cache, query_start_loc, seq_lens, table, 1, 1 / math.sqrt(d), out
        )

    for _ in range(3):
        step()
    eager, eager_store = per_call_us(step), per_call_us(store)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    replay = per_call_us(graph.replay)
    gbytes = 2 * batch * context * hkv * d * 2 / 1e9
    return (
        f"| {batch} | {context} | {block} | {eager:.1f} | {eager_store:.1f} | {replay:.1f} "
        f"| {gbytes / (replay * 1e-6):.0f} |"
    )


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}; bf16, H32 Hkv8 d128; {STEPS} steps per cell\n")
    columns = ("B", "context", "block", "eager step us", "eager store_kv us", "graph step us")
    print("| " + " | ".join((*columns, "graph GB/s")) + " |")
    print("|---|---|---|---|---|---|---|")
    for batch, context in SHAPES:
        print(row(batch, context), flush=True)


if __name__ == "__main__":
    main()
