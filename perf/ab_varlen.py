"""Same-process A/B of the packed varlen kernels against another version of the device code,
beside sparsek's dense kernel on the same problem and FlashAttention-4's varlen path.

    # base: the device code of an earlier commit, its kernels compiled into a cache (CPU ok)
    git archive <commit> cutedsl_kernels | tar x -C /tmp/base
    PYTHONPATH=/tmp/base:. CUTE_DSL_ARCH=sm_90a SPARSEK_ARCH=sm_90a \
        python perf/ab_varlen.py --base /tmp/base --base-cache /tmp/base-cache --compile
    # GPU: both versions through sparsek.attention_varlen in one process
    python perf/ab_varlen.py --base /tmp/base --base-cache /tmp/base-cache

d128 bf16, Hkv = H, cold L2, median (`perf.timing.time_kernel`); `new` is timed before and
after `base` and averaged. `new+fill` is `new` after a zero fill of a buffer the size of
out and a -inf fill of one the size of the LSE, the work the host did on every call
before the kernels wrote the rows past the last sequence themselves (perf/NOTES.md #39).
Rows: equal lengths (where the dense kernel serves the same problem), the suite's mixed
lengths, many short sequences. Prints a markdown table of TFLOP/s and ratios; `err` is
max |new - base|.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from sparsek.cache import KernelCache, dsl_toolchain
from sparsek.registry import PACKED, lookup

MIXED = [990, 110, 902, 1162, 100, 4096, 1517, 1032, 778, 1365, 63, 1024, 1120, 1330, 751, 44]
CASES = [
    ([1024] * 16, 16),
    ([1000] * 16, 16),
    (MIXED, 16),
    (MIXED, 32),
    ([128] * 128, 16),
    ([300] * 50, 16),
]
HEAD_DIM = 128


def base_cache(base: Path, root: Path) -> KernelCache:
    """The kernel cache of the device code under `base` (keyed by its own sources)."""
    files = sorted(
        p for p in (base / "cutedsl_kernels").rglob("*.py") if "__pycache__" not in p.parts
    )
    return KernelCache(root=root, toolchain=replace(dsl_toolchain(), source_files=lambda: files))


COLUMNS = ("dense", "base", "new", "new+fill", "fa4")


def row(lens: list[int], h: int, causal: bool, base: KernelCache, fa4: object) -> str:
    """One markdown row: TFLOP/s of each column and the ratios of `new`."""
    import sparsek
    from perf.timing import time_kernel
    from sparsek import ops

    dev = torch.device("cuda")
    total, top = sum(lens), max(lens)
    torch.manual_seed(0)
    q, k, v = (torch.randn(total, h, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in "qkv")
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    flops = sum(4 * h * n * n * HEAD_DIM / (2 if causal else 1) for n in lens)

    def run() -> torch.Tensor:
        out = sparsek.attention_varlen(q, k, v, cu, cu, top, top, causal=causal)
        assert isinstance(out, torch.Tensor)
        return out

    def tflops(fn: Callable[[], object]) -> float:
        return flops / time_kernel(fn, dev) / 1e9

    key = (dev.index or 0, HEAD_DIM, torch.bfloat16, causal, PACKED)
    out_new = run()
    new_kernel = ops._LAUNCHERS[key]
    t = {"new": tflops(run)}
    ops._LAUNCHERS[key] = base.get_kernel(lookup("sm_90a", HEAD_DIM, "bfloat16", causal, PACKED))
    out_base = run()
    t["base"] = tflops(run)
    ops._LAUNCHERS[key] = new_kernel
    t["new"] = (t["new"] + tflops(run)) / 2
    out_fill = torch.empty_like(q)
    lse_fill = torch.empty(h, total, device=dev)

    def run_after_fills() -> None:
        out_fill.zero_()
        lse_fill.fill_(float("-inf"))
        run()

    t["new+fill"] = tflops(run_after_fills)
    if len(set(lens)) == 1:
        qd, kd, vd = (x.view(len(lens), lens[0], h, HEAD_DIM) for x in (q, k, v))
        t["dense"] = tflops(lambda: sparsek.attention(qd, kd, vd, causal=causal))
    if callable(fa4):
        t["fa4"] = tflops(
            lambda: fa4(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=top, max_seqlen_k=top,
                causal=causal,
            )
        )  # fmt: skip
    err = (out_new.float() - out_base.float()).abs().max().item()
    cells = [f"{t[n]:.0f}" if n in t else "-" for n in COLUMNS]
    ratios = [
        f"{t['new'] / t[n]:.3f}" if n in t else "-" for n in ("base", "new+fill", "dense", "fa4")
    ]
    tag = f"{lens[0]}x{len(lens)}" if len(set(lens)) == 1 else f"mixed{len(lens)}"
    return "| " + " | ".join([tag, str(h), str(causal), *cells, *ratios, f"{err:.2g}"]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="dir holding cutedsl_kernels/")
    parser.add_argument("--base-cache", type=Path, required=True)
    parser.add_argument("--compile", action="store_true", help="only build the base kernels")
    args = parser.parse_args()
    cache = base_cache(args.base, args.base_cache)
    if args.compile:
        for causal in (False, True):
            cache.get_kernel(lookup("sm_90a", HEAD_DIM, "bfloat16", causal, PACKED))
        return
    try:
        from flash_attn.cute.interface import flash_attn_varlen_func as fa4
    except ImportError:
        fa4 = None
    head = ["lens", "H", "causal", *COLUMNS, "new/base", "new/new+fill", "new/dense", "new/fa4"]
    head.append("err")
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for lens, h in CASES:
        for causal in (False, True):
            print(row(lens, h, causal, cache, fa4), flush=True)


if __name__ == "__main__":
    main()
