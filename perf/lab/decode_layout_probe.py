"""Where the long-context decode rows' last few percent go (GPU): bandwidth of sparsek's
paged decode against torch SDPA's cuDNN backend as the CTA count and the memory layout of
the same keys change, every column timed in one process, rounds in alternating order.

    python perf/lab/decode_layout_probe.py [--rounds 2]

H32 Hkv8 d128 bf16, one query per sequence. Two tables:

- occupancy: batch 30..33 at one context; B x 8 KV heads is the CTA count of the
  2-CTAs-per-SM decode tile, 264 slots on 132 SMs. If the kernel were limited per CTA
  (not by DRAM), B33 would read ~3% more bytes per second than B32.
- layout: the same keys read as vLLM's paged cache (pages in random order: the suite's
  case), the same cache with pages in order, with pages in random order within each 2 MiB
  of a sequence's pages (the regions in random order), pages stored head-major ((pages,
  Hkv, block, d) permuted to vLLM's shape, so one head's rows of a page are contiguous),
  cuDNN on the suite's dense copy ((B, Hkv, S, d) contiguous) and on a token-major copy
  ((B, S, Hkv, d) transposed: each head's rows 2 KiB apart, like the paged cache), and,
  TIMING ONLY (wrong output), "all-heads": CTAs that each read every KV head of a
  sequence (whole pages), as an MQA problem over pages of block x Hkv rows; its kernels
  (pages of 128 / 512 rows) compile at first use.

Cells: us per call (CUDA-graph replay after an L2 flush, median, mean over rounds) and
GB/s of K + V read. Every other column's output is checked against the first's. The
header line also gives the copy bandwidth and torch's sum over 4 GiB.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import sparsek  # noqa: E402
from perf import timing  # noqa: E402
from perf.lab.ab_decode_tuning import ARCH  # noqa: E402
from sparsek import tuning  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
Call = Callable[[], torch.Tensor]


def sparsek_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor) -> Call:
    seqlens = torch.full((q.shape[0],), table.shape[1] * k.shape[1], device=q.device)
    seqlens = seqlens.to(torch.int32)

    def call() -> torch.Tensor:
        out = sparsek.attention_with_kvcache(q, k, v, seqlens, table)
        assert isinstance(out, torch.Tensor)
        return out

    return call


def all_heads_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    splits: int,
    two_ctas: bool,
) -> Call:
    """TIMING ONLY (wrong output): the same cache read by CTAs that each take every KV head
    of a sequence, as an MQA problem over pages of block x Hkv rows (whole pages
    contiguous), split `splits` ways; `two_ctas`: with the 2-CTAs-per-SM decode tile (the
    `DECODE_FILLS_GPU` row swapped into `DECODE` for the call, `tuning.override`)."""
    pages, block = k.shape[:2]
    k8, v8 = (c.view(pages, block * KV_HEADS, 1, HEAD_DIM) for c in (k, v))
    seqlens = torch.full((q.shape[0],), table.shape[1] * k8.shape[1], device=q.device)
    seqlens = seqlens.to(torch.int32)
    first = tuning.DECODE[(ARCH, HEAD_DIM)]
    fills = tuning.DECODE_FILLS_GPU[(ARCH, HEAD_DIM)]

    def call() -> torch.Tensor:
        with tuning.override("decode", ARCH, HEAD_DIM, fills if two_ctas else first):
            out = sparsek.attention_with_kvcache(q, k8, v8, seqlens, table, num_splits=splits)
        assert isinstance(out, torch.Tensor)
        return out

    return call


def cudnn_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Call:
    """SDPA's cuDNN backend; k, v (batch, kv_heads, context, head_dim), any strides."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt = q.transpose(1, 2)

    def call() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, k, v, enable_gqa=True).transpose(1, 2)

    return call


def columns(batch: int, context: int, block: int, layouts: bool) -> dict[str, Call]:
    """The calls to time for one case (seeded inputs)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    pages = batch * context // block
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k_cache = torch.randn(pages, block, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(pages, device=dev, dtype=torch.int32).view(batch, -1)
    rows = table.flatten().long()
    token_major = [c[rows].view(batch, context, KV_HEADS, HEAD_DIM) for c in (k_cache, v_cache)]
    head_major = [t.transpose(1, 2).contiguous() for t in token_major]
    cols = {
        "sparsek": sparsek_call(q, k_cache, v_cache, table),
        "cudnn": cudnn_call(q, *head_major),
    }
    if layouts:
        ordered = torch.arange(pages, device=dev, dtype=torch.int32).view(batch, -1)
        k_in_order, v_in_order = (t.view(pages, block, KV_HEADS, HEAD_DIM) for t in token_major)
        # (pages, Hkv, block, d) storage seen as (pages, block, Hkv, d): same table.
        k_hm, v_hm = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache))
        cols["sparsek pages in order"] = sparsek_call(q, k_in_order, v_in_order, ordered)
        # Each sequence's own pages, in random order within each 2 MiB of them and the
        # 2 MiB regions in random order (TLB-friendly, DRAM-random): same keys per sequence.
        region = max(1, (2 << 20) // k_cache[0].nbytes)
        per_seq = pages // batch
        if per_seq % region == 0:
            within = torch.rand(batch, per_seq // region, region, device=dev).argsort(dim=2)
            order = torch.rand(batch, per_seq // region, device=dev).argsort(dim=1)
            local = within + (order * region)[:, :, None] + ordered[:, :1, None]
            cols["sparsek pages shuffled in 2 MiB"] = sparsek_call(
                q, k_in_order, v_in_order, local.view(batch, -1).to(torch.int32)
            )
        cols["sparsek head-major pages"] = sparsek_call(q, k_hm, v_hm, table)
        cols["cudnn token-major"] = cudnn_call(q, *(t.transpose(1, 2) for t in token_major))
        # ~128 CTAs of the 1-CTA-per-SM tile, ~256 of the 2-CTAs-per-SM one.
        for splits, two_ctas in ((max(1, 128 // batch), False), (max(1, 256 // batch), True)):
            name = f"all-heads s{splits}{' c2' if two_ctas else ''}"
            cols[name] = all_heads_call(q, k_cache, v_cache, table, splits, two_ctas)
    return cols


def read_bandwidth_gbps(device: torch.device, nbytes: int) -> float:
    """GB/s of torch's sum over `nbytes`: a read-only stream (on the H200 it reads slower
    than the decode kernels do, so it is no ceiling for them)."""
    words = torch.ones(nbytes // 4, dtype=torch.int32, device=device)
    ms = timing.time_kernel(lambda: words.sum(dtype=torch.int32), device)
    return nbytes / (ms * 1e-3) / 1e9


def measure(batch: int, context: int, block: int, layouts: bool, rounds: int) -> str:
    dev = torch.device("cuda")
    cols = columns(batch, context, block, layouts)
    first = next(iter(cols.values()))()
    errs = {name: (fn().float() - first.float()).abs().max().item() for name, fn in cols.items()}
    times: dict[str, list[float]] = {name: [] for name in cols}
    for r in range(rounds):
        for name in list(cols)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timing.time_kernel(cols[name], dev, graph=True) * 1e3)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
    cells = []
    for name, ts in times.items():
        us = sum(ts) / len(ts)
        flag = "" if errs[name] < 2e-2 or name.startswith("all-heads") else " ERR"
        cells.append(f"{name}: {us:.1f} us {kv_bytes / us / 1e3:.0f} GB/s{flag}")
    return f"| {batch} | {context} | {block} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--context", type=int, default=16384, help="occupancy table context")
    parser.add_argument("--layout-only", action="store_true", help="skip the occupancy table")
    parser.add_argument(
        "--cases",
        default="32x16384,32x32768",
        help="layout table cases, comma list of BATCHxCONTEXT",
    )
    args = parser.parse_args()
    dev = torch.device("cuda")
    copy = timing.copy_bandwidth_gbps(dev, 1 << 30)
    read = read_bandwidth_gbps(dev, 4 << 30)
    print(f"copy bandwidth {copy:.0f} GB/s (read + write); read-only (sum) {read:.0f} GB/s")
    print("## occupancy\n| B | context | block | columns |\n|---|---|---|---|")
    for block in () if args.layout_only else (16, 64):
        for batch in (30, 31, 32, 33):
            print(measure(batch, args.context, block, False, args.rounds), flush=True)
            torch.cuda.empty_cache()
    print("## layout\n| B | context | block | columns |\n|---|---|---|---|")
    for case in args.cases.split(","):
        batch, context = (int(x) for x in case.split("x"))
        for block in (16, 64):
            print(measure(batch, context, block, True, args.rounds), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
