"""Same-process A/B of the K/V pipeline depth (`num_stages`) of the dense kernels (GPU).

    # CPU: build every candidate into the kernel cache first
    CUTE_DSL_ARCH=sm_90a SPARSEK_ARCH=sm_90a python perf/lab/ab_stages.py --compile
    # GPU
    python perf/lab/ab_stages.py [--stages 3 4]

Rows: the dense grid (`perf.lab.ab_persistent.shapes`; cold L2, TFLOP/s) and the small
problems of `ab_persistent.latency_shapes` (CUDA-graph replay, us), each served by the
kernel `sparsek.launch.dense` plans for it (registered `num_stages`) and by the same config with
each candidate depth that fits its shared memory (`limits.can_implement`); rows with no
fitting candidate are left out (d128 128-row tiles: 2 stages fill it). Outputs are checked
against cuDNN SDPA's. The registered kernel is timed first and last (mean), candidates
between. KV-cache decode tiles: `perf/lab/ab_decode_tuning.py --num-stages`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from cutedsl_kernels.config import DENSE, FmhaFwdConfig  # noqa: E402
from cutedsl_kernels.hopper.limits import can_implement  # noqa: E402
from perf.lab.ab_persistent import Shape, dense_runs, latency_shapes, shapes  # noqa: E402
from perf.timing import time_graph, time_kernel  # noqa: E402
from sparsek.cache import compile_into_cache  # noqa: E402
from sparsek.launch import dense, launcher  # noqa: E402
from sparsek.registry import lookup, mask_of  # noqa: E402

ARCH = "sm_90a"
H200_SMS = 132


def configs(
    shape: Shape, dtype: torch.dtype, stages: list[int], sms: int
) -> dict[str, FmhaFwdConfig]:
    """The planned config of a dense request (`s<N>` by its depth) and its fitting candidates."""
    b, sq, _, h, _, d, causal = shape
    workload = dense.dense_workload(b, sq, h, causal, sms)
    base = lookup(ARCH, d, dtype, mask_of(causal), DENSE, workload)
    found = {f"s{base.num_stages}": base}
    for n in stages:
        candidate = replace(base, num_stages=n)
        if n != base.num_stages and not can_implement(candidate):
            found[f"s{n}"] = candidate
    return found


def measure(shape: Shape, dtype: torch.dtype, stages: list[int], graph: bool) -> str:
    """One markdown row: each depth's TFLOP/s (cold L2) or graph-replay us, and cuDNN's."""
    b, sq, sk, h, hkv, d, causal = shape
    device = torch.device("cuda")
    found = configs(shape, dtype, stages, launcher.num_sms(device.index))
    base = next(iter(found))
    fns, err = dense_runs(shape, dtype, dict(found))

    def once(name: str) -> float:
        if graph:
            return time_graph(fns[name], device) * 1e3
        flops = 4 * b * h * sq * sk * d // (2 if causal else 1)
        return flops / time_kernel(fns[name], device) / 1e9

    first = once(base)
    values = {name: once(name) for name in found if name != base}
    values[base] = (first + once(base)) / 2
    cudnn = once("cudnn")
    best = (min if graph else max)(values, key=values.__getitem__)
    gain = values[best] / values[base] if not graph else values[base] / values[best]
    cells = " | ".join(f"{values[f's{n}']:.2f}" if f"s{n}" in values else "-" for n in (2, 3, 4))
    return (
        f"| {'graph us' if graph else 'TFLOP/s'} | {b} | {sq} | {sk} | {h} | {hkv} | {d} "
        f"| {causal} | {found[base].tile_m}x{found[base].tile_n} | {cells} | {cudnn:.2f} "
        f"| {best} | {gain:.3f} | {err:.3g} |"
    )


HEADER = (
    "| metric | B | Sq | Sk | H | Hkv | D | causal | tile | 2 stages | 3 stages | 4 stages "
    "| cuDNN | best | best / registered | max err |\n" + "|---" * 16 + "|"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 4], help="candidate depths")
    parser.add_argument("--compile", action="store_true", help="only build the candidates (CPU)")
    parser.add_argument("--only", choices=("grid", "latency"), help="one of the two row sets")
    args = parser.parse_args()
    dtype = torch.bfloat16
    rows = [(s, False) for s in shapes()] + [
        (s, True)
        for s in latency_shapes()
        if s[1] > 1  # single queries: the decode path
    ]
    rows = [
        (s, graph)
        for s, graph in rows
        if args.only in (None, "latency" if graph else "grid")
        and len(configs(s, dtype, args.stages, H200_SMS)) > 1
    ]
    if args.compile:
        found = [configs(s, dtype, args.stages, H200_SMS) for s, _ in rows]
        for config in {c for each in found for c in each.values()}:
            print(config.name, compile_into_cache(config), flush=True)
        return
    lines = [HEADER]
    print(HEADER, flush=True)
    for shape, graph in rows:
        lines.append(measure(shape, dtype, args.stages, graph))
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
