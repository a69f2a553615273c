"""Paged decode per split count: sparsek's `attention_with_kvcache` at each `num_splits`
beside the automatic choice and torch SDPA's cuDNN backend, in one process (GPU).

    python perf/decode_splits.py [--block 64]

H32 Hkv8 d128 bf16, one query per sequence, pages in random order. Each call is timed as
a CUDA-graph replay after an L2 flush (`perf.timing.time_kernel(graph=True)`), median, in
us; cuDNN reads a dense copy of the cache and is timed the same way. Every split count's
output is compared with `num_splits=1` (a cell reads `ERR <max diff>` past 2e-2). Prints a
markdown table: the evidence for (or against) the split heuristic `choose_splits`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import sparsek  # noqa: E402
from perf.timing import time_kernel  # noqa: E402
from sparsek import ops_kvcache_cuda  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SPLITS = (1, 2, 4, 8, 16, 32)
CASES = [(1, 1024), (1, 4096), (1, 16384), (1, 32768), (8, 1024), (8, 4096), (8, 16384)]


def row(batch: int, context: int, block: int) -> str:
    """One markdown row: the automatic split count, then us per call of each column."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    pages = batch * context // block
    k_cache = torch.randn(pages, block, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(pages, device=dev, dtype=torch.int32).view(batch, context // block)
    seqlens = torch.full((batch,), context, device=dev, dtype=torch.int32)

    def run(splits: int) -> torch.Tensor:
        out = sparsek.attention_with_kvcache(q, k_cache, v_cache, seqlens, table, num_splits=splits)
        assert isinstance(out, torch.Tensor)
        return out

    ref = run(1).float()
    cells = []
    for splits in (0, *SPLITS):
        try:
            err = (run(splits).float() - ref).abs().max().item()
            us = time_kernel(functools.partial(run, splits), dev, graph=True) * 1e3
            cells.append(f"{us:.1f}" + ("" if err < 2e-2 else f" ERR {err:.2g}"))
        except Exception as exc:  # a split count the kernels refuse: say so, go on
            cells.append(type(exc).__name__)
    plan = ops_kvcache_cuda.kvcache_plan(q, k_cache, v_cache, seqlens, table, None, None, True, 0)
    auto = plan.splits if isinstance(plan, ops_kvcache_cuda.KvcachePlan) else plan
    rows = table.flatten().long()
    k_dense = k_cache[rows].view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v_dense = v_cache[rows].view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
    qt = q.transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, k_dense, v_dense, enable_gqa=True)

    cudnn_us = time_kernel(cudnn, dev, graph=True) * 1e3
    return f"| {batch} | {context} | {auto} | " + " | ".join(cells) + f" | {cudnn_us:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--block", type=int, default=64, help="paged block size (tokens)")
    args = parser.parse_args()
    head = ["B", "context", "auto splits", "auto us", *(f"s={s}" for s in SPLITS), "cudnn us"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for batch, context in CASES:
        print(row(batch, context, args.block), flush=True)


if __name__ == "__main__":
    main()
