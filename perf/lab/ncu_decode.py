"""A profiling target for Nsight Compute: sparsek's paged decode and torch SDPA's cuDNN
backend on the same problems, each run once between cudaProfilerStart/Stop after warm-up.

    ncu --clock-control none --profile-from-start off --set full -o decode \
        python perf/lab/ncu_decode.py

H32 Hkv8 d128 bf16 (`perf.lab.decode_splits.paged_decode`): batch 8 with 4k-token contexts in
16-token blocks (split-KV), batch 32 with 16k-token contexts in 64-token blocks (the
two-CTAs-per-SM tiles). Result: `perf/results/h200/ncu_decode_647f716.md`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from perf.lab.decode_splits import paged_decode  # noqa: E402

CASES = [(8, 4096, 16), (32, 16384, 64)]  # (batch, context, block)


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    calls = []
    for batch, context, block in CASES:
        case = paged_decode(batch, context, block)
        cudnn = case.cudnn()
        for _ in range(3):
            case.run(0)
            cudnn()
        calls.append((case, cudnn))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()  # type: ignore[no-untyped-call]
    for case, cudnn in calls:
        case.run(0)
        cudnn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
