"""Same-process A/B of the decode kernels' tuning (d128, or `--head-dim 64`) against a
candidate, per split count, beside torch SDPA's cuDNN backend. The candidate applies the
flags' changes to both decode rows (`registry._DECODE_TUNING`, and
`_DECODE_FILLS_GPU_TUNING` for batches that fill the GPU); with `--every-batch` both sides
serve every batch with the first row's tiles (as the #31 experiment did).

    # CPU (no GPU needed): compile the candidate's decode kernels into the cache
    CUTE_DSL_ARCH=sm_90a SPARSEK_ARCH=sm_90a \
        python perf/ab_decode_tuning.py --tile-n 64 --ctas-per-sm 2 --compile
    # GPU: both tunings through sparsek.attention_with_kvcache in one process
    python perf/ab_decode_tuning.py --tile-n 64 --ctas-per-sm 2

Paged decode, H32 Hkv8 bf16, block 16 (`--block`, one or more), pages in random
order. Each call is timed as a CUDA-graph replay after an L2 flush
(`perf.timing.time_kernel(graph=True)`), median, in us; the current tuning is timed before
and after the candidate and averaged. Cells: current / candidate us at the automatic split
count (`num_splits=0`, each tuning's own choice) and at the best of 1, 2, 4, 8, 16, 32
splits (`--auto-only`: the automatic count only); `err` is max |candidate - current|.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from cutedsl_kernels.config import FmhaFwdConfig  # noqa: E402
from perf import timing  # noqa: E402
from perf.decode_splits import SPLITS, paged_decode  # noqa: E402
from sparsek import cache, ops, ops_kvcache_cuda, ops_varlen_cuda, registry  # noqa: E402
from sparsek.registry import Tuning, Variant  # noqa: E402

ARCH = "sm_90a"
HEAD_DIM = 128  # `--head-dim`
CASES = [
    (1, 1024), (1, 4096), (1, 16384), (8, 1024), (8, 4096), (8, 16384), (8, 32768),
    (32, 1024), (32, 4096), (32, 16384), (128, 1024), (128, 4096),
]  # fmt: skip
# A tuning of the decode kernels: (`_DECODE_TUNING` row, `_DECODE_FILLS_GPU_TUNING` row).
Tunings = tuple[Tuning, Tuning]


def use_tuning(tuning: Tunings) -> None:
    """Make `tuning` the d128 decode tiles (both rows) and forget every kernel, plan and
    config that was looked up under the previous one."""
    registry._DECODE_TUNING[(ARCH, HEAD_DIM)] = tuning[0]
    registry._DECODE_FILLS_GPU_TUNING[(ARCH, HEAD_DIM)] = tuning[1]
    registry.find.cache_clear()
    ops._LAUNCHERS.clear()
    ops_kvcache_cuda._PLANS.clear()
    ops_varlen_cuda._CONFIGS.clear()


def decode_configs() -> list[FmhaFwdConfig]:
    """The bf16 decode kernels of the current d128 tuning (every precompiled layout)."""
    return [
        registry.lookup(ARCH, HEAD_DIM, "bfloat16", False, Variant(kv_layout=kv, page_size=page,
                        split_kv=split, decode=True, fills_gpu=fills))
        for kv, page in (("cache", 0), ("paged", 16), ("paged", 64))
        for split, fills in ((False, False), (True, False), (False, True))
    ]  # fmt: skip


def row(
    batch: int, context: int, block: int, tunings: dict[str, Tunings], splits: tuple[int, ...]
) -> str:
    """One markdown row: us of each tuning, auto and best of `splits` split counts (best:
    auto when `splits` is empty), and cuDNN's."""
    dev = torch.device("cuda")
    case = paged_decode(batch, context, block, HEAD_DIM)

    def measure(name: str) -> tuple[dict[int, float], int | str, torch.Tensor]:
        use_tuning(tunings[name])
        out = case.run(0)
        times = {
            s: timing.time_kernel(functools.partial(case.run, s), dev, graph=True) * 1e3
            for s in (0, *splits)
        }
        return times, case.auto_splits(), out

    first, auto, out_current = measure("current")
    second, auto_candidate, out_candidate = measure("candidate")
    again, _, _ = measure("current")
    current = {s: (first[s] + again[s]) / 2 for s in first}
    cudnn_us = timing.time_kernel(case.cudnn(), dev, graph=True) * 1e3
    best = {name: min(t, key=t.__getitem__) for name, t in (("a", current), ("b", second))}
    err = (out_candidate.float() - out_current.float()).abs().max().item()
    cells = [
        f"{current[0]:.1f} ({auto})", f"{second[0]:.1f} ({auto_candidate})",
        f"{current[best['a']]:.1f} ({best['a']})", f"{second[best['b']]:.1f} ({best['b']})",
        f"{current[0] / second[0]:.3f}", f"{cudnn_us:.1f}", f"{cudnn_us / second[0]:.2f}",
        f"{err:.2g}",
    ]  # fmt: skip
    return f"| {batch} | {context} | {block} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tile-n", type=int, help="candidate tile_n")
    parser.add_argument("--num-stages", type=int, help="candidate num_stages")
    parser.add_argument("--ctas-per-sm", type=int, help="candidate ctas_per_sm")
    parser.add_argument(
        "--kv-evict-first", action="store_true", help="candidate loads K/V evict-first"
    )
    parser.add_argument("--head-dim", type=int, choices=(64, 128), default=128)
    parser.add_argument("--every-batch", action="store_true", help="one row for all batches")
    parser.add_argument(
        "--block", type=int, nargs="+", default=[16], help="paged block sizes (tokens)"
    )
    parser.add_argument("--auto-only", action="store_true", help="time the automatic split only")
    parser.add_argument("--compile", action="store_true", help="only build the candidate")
    parser.add_argument(
        "--l2-flush",
        choices=timing.L2_FLUSHES,
        default=timing.L2_FLUSH,
        help="how the L2 is emptied before each timed call (perf.timing.L2_FLUSH)",
    )
    args = parser.parse_args()
    timing.L2_FLUSH = args.l2_flush
    global HEAD_DIM
    HEAD_DIM = args.head_dim
    first = registry._DECODE_TUNING[(ARCH, HEAD_DIM)]
    current = (first, registry._DECODE_FILLS_GPU_TUNING.get((ARCH, HEAD_DIM), first))
    if args.every_batch:
        current = (first, first)
    changes = {
        field: value
        for field, value in (
            ("tile_n", args.tile_n),
            ("num_stages", args.num_stages),
            ("ctas_per_sm", args.ctas_per_sm),
            ("kv_evict_first", args.kv_evict_first or None),
        )
        if value is not None
    }
    candidate = tuple(dataclasses.replace(t, **changes) for t in current)
    tunings = {"current": current, "candidate": (candidate[0], candidate[1])}
    print(f"current {tunings['current']}\ncandidate {tunings['candidate']}")
    if args.compile:
        use_tuning(tunings["candidate"])
        for config in decode_configs():
            print(config.name, cache.compile_into_cache(config))
        return
    head = [
        "B", "context", "block", "current auto (splits)", "candidate auto (splits)",
        "current best", "candidate best", "current/candidate (auto)", "cudnn us",
        "cudnn/candidate", "err",
    ]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for block in args.block:
        for batch, context in CASES:
            splits = () if args.auto_only else SPLITS
            print(row(batch, context, block, tunings, splits), flush=True)


if __name__ == "__main__":
    main()
