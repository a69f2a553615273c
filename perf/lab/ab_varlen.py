"""Same-process A/B of the packed varlen kernels against another version of the device code,
beside sparsek's dense kernel on the same problem and FlashAttention-4's varlen path.

    # base: the device code of an earlier commit, its kernels compiled into a cache (CPU ok)
    git archive <commit> cutedsl_kernels | tar x -C /tmp/base
    PYTHONPATH=/tmp/base:. CUTE_DSL_ARCH=sm_90a SPARSEK_ARCH=sm_90a \\
        python perf/lab/ab_varlen.py --base /tmp/base --base-cache /tmp/base-cache --compile
    # GPU: both versions in one process
    python perf/lab/ab_varlen.py --base /tmp/base --base-cache /tmp/base-cache

The base must take the tree's kernel configs and calling convention (`FmhaFwdConfig`,
`cutedsl_kernels/abi.py`): its kernel is compiled from the config the tree serves the
request with (`sparsek.launch.launcher.forward_kernel`).

d128 bf16, Hkv = H, cold L2, median (`perf.timing.time_kernel`). `base` and `new` launch
the base's and the tree's packed kernel directly, with the arguments and fresh outputs
`sparsek.attention_varlen` gives its own (`cutedsl_kernels.abi.call_fmha_fwd`); `new` is
timed before and after `base` and averaged, and its output must equal the API's. `api` is
`sparsek.attention_varlen` itself (the whole call). `new+fill` is `new` after a zero fill
of a buffer the size of out and a -inf fill of one the size of the LSE, the work the host
did on every call before the kernels wrote the rows past the last sequence themselves
(perf/NOTES.md #39). Rows: equal lengths (where the dense kernel serves the same problem),
the suite's mixed lengths, many short sequences. Prints a markdown table of TFLOP/s and
ratios; `err` is max |new - base|.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

# Appended, not prepended: with --compile, PYTHONPATH puts the base's cutedsl_kernels first.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

from cutedsl_kernels.abi import call_fmha_fwd  # noqa: E402
from cutedsl_kernels.config import PACKED, FmhaFwdConfig  # noqa: E402
from sparsek.cache import KernelCache, dsl_toolchain  # noqa: E402
from sparsek.launch import launcher  # noqa: E402
from sparsek.launch.launcher import ForwardKernel  # noqa: E402
from sparsek.registry import lookup, mask_of  # noqa: E402

ARCH = "sm_90a"
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


def packed_config(causal: bool) -> FmhaFwdConfig:
    """The registered bf16 d128 packed kernel config on ARCH."""
    return lookup(ARCH, HEAD_DIM, "bfloat16", mask_of(causal), PACKED)


def packed_launch(
    kernel: ForwardKernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    top: int,
) -> Callable[[], torch.Tensor]:
    """`kernel` launched on packed, contiguous q/k/v (`cu`: the sequence bounds of both,
    `top`: the longest) as `sparsek.launch.varlen.attention_varlen` launches the registered
    one: fresh outputs, a fresh tile counter if it takes one, every row written."""
    total, heads, head_dim = q.shape
    dev = q.device
    q1, k1, v1 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)

    def run() -> torch.Tensor:
        out = launcher.empty((total, heads, head_dim), q.dtype, dev)
        lse = launcher.empty((heads, total), torch.float32, dev)
        counter = launcher.zeroed_counter(dev) if kernel.takes_tile_counter else None
        with launcher.device_guard(dev):
            call_fmha_fwd(
                kernel.fn, q1, k1, v1, out.unsqueeze(0), lse.unsqueeze(0),
                cu_seqlens_q=cu, cu_seqlens_k=cu, tile_counter=counter,
                softmax_scale=head_dim**-0.5, max_seqlen_q=top,
                num_ctas=launcher.num_sms(dev.index),
            )  # fmt: skip
        return out

    return run


COLUMNS = ("dense", "api", "base", "new", "new+fill", "fa4")


def row(lens: list[int], h: int, causal: bool, base: KernelCache, fa4: object) -> str:
    """One markdown row: TFLOP/s of each column and the ratios of `new` (of `api` against
    the other APIs)."""
    import sparsek
    from perf.timing import time_kernel

    dev = torch.device("cuda")
    total, top = sum(lens), max(lens)
    torch.manual_seed(0)
    q, k, v = (torch.randn(total, h, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in "qkv")
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    flops = sum(4 * h * n * n * HEAD_DIM / (2 if causal else 1) for n in lens)

    def api() -> torch.Tensor:
        out = sparsek.attention_varlen(q, k, v, cu, cu, top, top, causal=causal)
        assert isinstance(out, torch.Tensor)
        return out

    def tflops(fn: Callable[[], object]) -> float:
        return flops / time_kernel(fn, dev) / 1e9

    served = launcher.forward_kernel(dev, HEAD_DIM, torch.bfloat16, mask_of(causal), PACKED)
    config = served.config
    new = packed_launch(served, q, k, v, cu, top)
    old = packed_launch(ForwardKernel(base.get_kernel(config), config), q, k, v, cu, top)
    out_new, out_base = new(), old()
    if not torch.equal(out_new, api()):
        print(f"warning: {config.name} launched here differs from the API's", file=sys.stderr)
    t = {"new": tflops(new), "base": tflops(old)}
    t["new"] = (t["new"] + tflops(new)) / 2
    t["api"] = tflops(api)
    out_fill = torch.empty_like(q)
    lse_fill = torch.empty(h, total, device=dev)

    def new_after_fills() -> None:
        out_fill.zero_()
        lse_fill.fill_(float("-inf"))
        new()

    t["new+fill"] = tflops(new_after_fills)
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
        f"{t[a] / t[b]:.3f}" if b in t else "-"
        for a, b in (("new", "base"), ("new", "new+fill"), ("api", "dense"), ("api", "fa4"))
    ]
    tag = f"{lens[0]}x{len(lens)}" if len(set(lens)) == 1 else f"mixed{len(lens)}"
    return "| " + " | ".join([tag, str(h), str(causal), *cells, *ratios, f"{err:.2g}"]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="dir holding cutedsl_kernels/")
    parser.add_argument("--base-cache", type=Path, required=True)
    parser.add_argument("--compile", action="store_true", help="only build the base kernels")
    args = parser.parse_args()
    cache = base_cache(args.base, args.base_cache)
    if args.compile:
        for causal in (False, True):
            cache.get_kernel(packed_config(causal))
        return
    try:
        from flash_attn.cute.interface import flash_attn_varlen_func as fa4
    except ImportError:
        fa4 = None
    head = ["lens", "H", "causal", *COLUMNS, "new/base", "new/new+fill", "api/dense", "api/fa4"]
    head.append("err")
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for lens, h in CASES:
        for causal in (False, True):
            print(row(lens, h, causal, cache, fa4), flush=True)


if __name__ == "__main__":
    main()
