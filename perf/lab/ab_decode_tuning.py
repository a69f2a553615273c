"""Same-process A/B of the decode kernels' tuning (d128, or `--head-dim 64`) against a
candidate, per split count, beside torch SDPA's cuDNN backend. The candidate applies the
flags' changes to both decode rows (`sparsek.tuning.DECODE`, and `DECODE_FILLS_GPU` for
batches that fill the GPU), swapped in for the duration of each measurement with
`sparsek.tuning.override`; with `--every-batch` both sides serve every batch with the first
row's tiles (as the #31 experiment did).

    # CPU (no GPU needed): compile the candidate's decode kernels into the cache
    CUTE_DSL_ARCH=sm_90a SPARSEK_ARCH=sm_90a \\
        python perf/lab/ab_decode_tuning.py --tile-n 64 --ctas-per-sm 2 --compile
    # GPU: both tunings through sparsek.attention_with_kvcache in one process
    python perf/lab/ab_decode_tuning.py --tile-n 64 --ctas-per-sm 2

Paged decode, H32 Hkv8 bf16, block 16 (`--block`, one or more), pages in random
order. Each call is timed as a CUDA-graph replay after an L2 flush
(`perf.timing.time_kernel(graph=True)`), median, in us; the current tuning is timed before
and after the candidate and averaged. Cells: current / candidate us at the automatic split
count (`num_splits=0`, each tuning's own choice) and at the best of 1, 2, 4, 8, 16, 32
splits (`--auto-only`: the automatic count only); `err` is max |candidate - current|.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from cutedsl_kernels.config import FmhaFwdConfig, Layout  # noqa: E402
from perf import timing  # noqa: E402
from perf.lab.decode_splits import SPLITS, paged_decode  # noqa: E402
from sparsek import cache, registry, tuning  # noqa: E402
from sparsek.tuning import Tuning, Workload  # noqa: E402

ARCH = "sm_90a"
HEAD_DIM = 128  # `--head-dim`
CASES = [
    (1, 1024), (1, 4096), (1, 16384), (8, 1024), (8, 4096), (8, 16384), (8, 32768),
    (32, 1024), (32, 4096), (32, 16384), (128, 1024), (128, 4096),
]  # fmt: skip
# A tuning of the decode kernels: (`tuning.DECODE` row, `tuning.DECODE_FILLS_GPU` row).
Tunings = tuple[Tuning, Tuning]


def registered_tunings() -> Tunings:
    """The registered decode rows of (ARCH, HEAD_DIM) (the first row where the second has
    none)."""
    first = tuning.DECODE[(ARCH, HEAD_DIM)]
    return first, tuning.DECODE_FILLS_GPU.get((ARCH, HEAD_DIM), first)


@contextlib.contextmanager
def using(tunings: Tunings) -> Iterator[None]:
    """Within the block, `tunings` are the decode rows of (ARCH, HEAD_DIM) (both
    restored afterwards); `tuning.override` forgets every kernel, plan and config looked
    up under the rows it replaces, on entry and on exit."""
    with (
        tuning.override("decode", ARCH, HEAD_DIM, tunings[0]),
        tuning.override("decode_fills_gpu", ARCH, HEAD_DIM, tunings[1]),
    ):
        yield


def decode_configs() -> list[FmhaFwdConfig]:
    """The bf16 decode kernels of the current tuning (every precompiled layout)."""
    return [
        registry.lookup(
            ARCH, HEAD_DIM, "bfloat16", registry.mask_of(False), Layout(False, kv, page, split),
            Workload.DECODE_FILLS_GPU if fills else Workload.DECODE,
        )
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
        with using(tunings[name]):
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    current = registered_tunings()
    if args.every_batch:
        current = (current[0], current[0])
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
        with using(tunings["candidate"]):
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
