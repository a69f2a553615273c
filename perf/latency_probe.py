"""Per-call host cost of each layer of the launch path (GPU): raw kernel, torch op, API, SDPA.

Run on the GPU machine: `python perf/latency_probe.py`. B1 S512 H8 D64 bf16; each number
is the median over 20 bursts of 200 back-to-back calls, synchronized after each burst.
"""

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import sparsek
from sparsek import ops


def per_call_us(fn: Callable[[], object], calls: int = 200, bursts: int = 20) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(bursts):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[len(times) // 2]


def main() -> None:
    q = torch.randn(1, 512, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    kernel = ops._launcher(q.device, 64, q.dtype, False)
    out, lse = torch.empty_like(q), torch.empty(1, 8, 512, device="cuda")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    rows = {
        "raw kernel call": lambda: kernel(q, k, v, out, lse, 0.125, 0),
        "torch.ops op": lambda: torch.ops.sparsek.attention(q, k, v, False, 0.125, False),
        "sparsek.attention": lambda: sparsek.attention(q, k, v),
        "torch sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt),
    }
    for name, fn in rows.items():
        print(f"{name:<22}{per_call_us(fn):.1f} us")


if __name__ == "__main__":
    main()
