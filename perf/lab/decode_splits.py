"""Paged decode per split count: sparsek's `attention_with_kvcache` at each `num_splits`
beside the automatic choice and torch SDPA's cuDNN backend, in one process (GPU).

    python perf/lab/decode_splits.py [--block 64]

H32 Hkv8 d128 bf16, one query per sequence, pages in random order. Each call is timed as
a CUDA-graph replay after an L2 flush (`perf.timing.time_kernel(graph=True)`), median, in
us; cuDNN reads a dense copy of the cache and is timed the same way. Every split count's
output is compared with `num_splits=1` (a cell reads `ERR <max diff>` past 2e-2). Prints a
markdown table: the evidence for (or against) the split heuristic `choose_splits`.

`--breakdown` times, for batch 1 at each split count, the whole call beside its two
kernels alone (launched from the call's plan, `sparsek.launch.kvcache.kvcache_plan`, with
the call's allocations and views, the other launch skipped) and an empty call (one tiny
kernel): where the time of a latency-bound decode step goes.

Also importable: `paged_decode` is the decode problem of `ab_decode_tuning.py` and
`ncu_decode.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import sparsek  # noqa: E402
from cutedsl_kernels.abi import call_combine, call_fmha_fwd  # noqa: E402
from perf.timing import time_kernel  # noqa: E402
from sparsek.launch import kvcache, launcher  # noqa: E402
from sparsek.masks import CAUSAL  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SPLITS = (1, 2, 4, 8, 16, 32)
CASES = [(1, 1024), (1, 4096), (1, 16384), (1, 32768), (8, 1024), (8, 4096), (8, 16384)]


@dataclasses.dataclass(frozen=True)
class PagedDecode:
    """One decode request over a paged cache (pages in random order), all bf16 on the GPU."""

    q: torch.Tensor  # (batch, 1, HEADS, HEAD_DIM)
    k_cache: torch.Tensor  # (pages, block, KV_HEADS, HEAD_DIM)
    v_cache: torch.Tensor
    table: torch.Tensor  # (batch, context // block) int32
    seqlens: torch.Tensor  # (batch,) int32, all `context`

    def run(self, splits: int = 0) -> torch.Tensor:
        """sparsek's output at `num_splits=splits`."""
        out = sparsek.attention_with_kvcache(
            self.q, self.k_cache, self.v_cache, self.seqlens, self.table, num_splits=splits
        )
        assert isinstance(out, torch.Tensor)
        return out

    def plan(self, splits: int = 0) -> kvcache.KvcachePlan | str:
        """The launch plan of `run(splits)` (or why no kernel serves the request)."""
        return kvcache.kvcache_plan(
            self.q, self.k_cache, self.v_cache, self.seqlens, self.table, None, None, CAUSAL, splits
        )

    def auto_splits(self) -> int | str:
        """The split count `num_splits=0` picks (or why no kernel serves the request)."""
        plan = self.plan(0)
        return plan.splits if isinstance(plan, kvcache.KvcachePlan) else plan

    def cudnn(self) -> Callable[[], torch.Tensor]:
        """torch SDPA's cuDNN backend on a dense copy of the cache (the same problem)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        batch, context = self.table.shape[0], self.table.shape[1] * self.k_cache.shape[1]
        rows = self.table.flatten().long()
        k, v = (
            c[rows].view(batch, context, KV_HEADS, c.shape[-1]).transpose(1, 2)
            for c in (self.k_cache, self.v_cache)
        )
        qt = self.q.transpose(1, 2)

        def call() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, k, v, enable_gqa=True)

        return call


def paged_decode(batch: int, context: int, block: int, head_dim: int = HEAD_DIM) -> PagedDecode:
    """H32 Hkv8 decode (d128 unless `head_dim`), every sequence `context` keys long (seeded:
    the same inputs in every script and run)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(batch, 1, HEADS, head_dim, device=dev, dtype=torch.bfloat16)
    pages = batch * context // block
    k_cache = torch.randn(pages, block, KV_HEADS, head_dim, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(pages, device=dev, dtype=torch.int32).view(batch, context // block)
    seqlens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    return PagedDecode(q, k_cache, v_cache, table, seqlens)


def row(batch: int, context: int, block: int) -> str:
    """One markdown row: the automatic split count, then us per call of each column."""
    dev = torch.device("cuda")
    case = paged_decode(batch, context, block)
    ref = case.run(1).float()
    cells = []
    for splits in (0, *SPLITS):
        try:
            err = (case.run(splits).float() - ref).abs().max().item()
            us = time_kernel(functools.partial(case.run, splits), dev, graph=True) * 1e3
            cells.append(f"{us:.1f}" + ("" if err < 2e-2 else f" ERR {err:.2g}"))
        except Exception as exc:  # a split count the kernels refuse: say so, go on
            cells.append(type(exc).__name__)
    cudnn_us = time_kernel(case.cudnn(), dev, graph=True) * 1e3
    auto = case.auto_splits()
    return f"| {batch} | {context} | {auto} | " + " | ".join(cells) + f" | {cudnn_us:.1f} |"


def one_kernel(case: PagedDecode, splits: int, skip: str) -> Callable[[], None]:
    """`case.run(splits)`'s launches without its split-KV kernel (`skip="split"`) or its
    combine (`skip="combine"`): the kernels of its plan, called with the allocations,
    views and arguments `sparsek.launch.kvcache.attention_with_kvcache` gives them for a
    split decode request (batched q, no LSE staging)."""
    plan = case.plan(splits)
    assert isinstance(plan, kvcache.KvcachePlan), plan
    kernel, combine = plan.kernel, plan.combine
    q_view, out_view, lse_view = plan.q_view, plan.out_view, plan.lse_view
    assert kernel is not None and combine is not None, "a split request"
    assert q_view is not None and out_view is not None and lse_view is not None, "decode"
    assert plan.lse_staging is None and not plan.packed_rows, "batched q"
    q, dev = case.q, case.q.device
    scale = q.shape[-1] ** -0.5

    def call() -> None:
        out = plan.empty("out", q.dtype, dev)
        lse = plan.empty("lse", torch.float32, dev)
        o_part = plan.empty("o_part", torch.float32, dev)
        lse_part = plan.empty("lse_part", torch.float32, dev)
        with launcher.device_guard(dev):
            if skip != "split":
                call_fmha_fwd(
                    kernel.fn, q_view.of(q), case.k_cache, case.v_cache, o_part, lse_part,
                    seqused_k=case.seqlens, page_table=case.table, softmax_scale=scale,
                    max_seqlen_q=plan.rows, num_splits=plan.splits, num_ctas=0,
                )  # fmt: skip
            if skip != "combine":
                call_combine(combine, o_part, lse_part, out_view.of(out), lse_view.of(lse))

    return call


def breakdown(context: int, block: int) -> str:
    """Batch-1 rows: us per call for the whole call, the split kernel alone, the combine
    alone, per split count; the empty-call floor of the timing method last."""
    dev = torch.device("cuda")
    case = paged_decode(1, context, block)
    cells = []
    for splits in (2, 4, 8, 16):
        call = functools.partial(case.run, splits)
        times = [time_kernel(call, dev, graph=True)]
        for skip in ("combine", "split"):
            times.append(time_kernel(one_kernel(case, splits, skip), dev, graph=True))
        cells.append(" / ".join(f"{t * 1e3:.1f}" for t in times))
    tiny = torch.zeros(1, device=dev)
    floor = time_kernel(tiny.zero_, dev, graph=True) * 1e3
    return f"| {context} | " + " | ".join(cells) + f" | {floor:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--block", type=int, default=64, help="paged block size (tokens)")
    parser.add_argument("--breakdown", action="store_true", help="batch-1 time per kernel")
    args = parser.parse_args()
    if args.breakdown:
        print("Batch 1, us per call: whole / split kernel alone / combine alone")
        head = ["context", *(f"s={s}" for s in (2, 4, 8, 16)), "empty call"]
        print("| " + " | ".join(head) + " |")
        print("|---" * len(head) + "|")
        for context in (1024, 4096, 16384):
            print(breakdown(context, args.block), flush=True)
        return
    head = ["B", "context", "auto splits", "auto us", *(f"s={s}" for s in SPLITS), "cudnn us"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for batch, context in CASES:
        print(row(batch, context, args.block), flush=True)


if __name__ == "__main__":
    main()
