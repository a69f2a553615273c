"""GQA against the same problem with K/V expanded to every query head, and FA4 with and
without its query-head packing (GPU, FlashAttention-4 importable).

    python perf/lab/gqa_probe.py

B4 S4k H32 Hkv8 d128 bf16, causal and not, one process, cold L2, median
(`perf.timing.time_kernel`); each output is checked against sparsek on the expanded K/V.
Prints a markdown table of TFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import sparsek  # noqa: E402
from perf.timing import time_kernel  # noqa: E402

COLUMNS = {
    "sk_gqa": "sparsek GQA",
    "sk_mha": "sparsek MHA-expanded",
    "fa4_pack": "FA4 GQA (pack)",
    "fa4_nopack": "FA4 GQA no pack",
    "fa4_mha": "FA4 MHA-expanded",
}


def row(causal: bool, flash_attn_func: Callable[..., object]) -> str:
    """One markdown row: TFLOP/s of each column for B4 S4k H32 Hkv8 d128 bf16."""
    dev = torch.device("cuda")
    b, s, h, hkv, d = 4, 4096, 32, 8, 128
    torch.manual_seed(0)
    q = torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(b, s, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    ke, ve = (t.repeat_interleave(h // hkv, dim=2) for t in (k, v))
    ref = sparsek.attention(q, ke, ve, causal=causal)
    assert isinstance(ref, torch.Tensor)
    fns: dict[str, Callable[[], object]] = {
        "sk_gqa": lambda: sparsek.attention(q, k, v, causal=causal),
        "sk_mha": lambda: sparsek.attention(q, ke, ve, causal=causal),
        "fa4_pack": lambda: flash_attn_func(q, k, v, causal=causal, pack_gqa=True),
        "fa4_nopack": lambda: flash_attn_func(q, k, v, causal=causal, pack_gqa=False),
        "fa4_mha": lambda: flash_attn_func(q, ke, ve, causal=causal),
    }
    for name, fn in fns.items():
        result = fn()
        out = result[0] if isinstance(result, tuple) else result
        assert isinstance(out, torch.Tensor)
        err = (out.float() - ref.float()).abs().max().item()
        assert err < 2e-2, (name, err)
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    tflops = {name: flops / time_kernel(fn, dev) / 1e9 for name, fn in fns.items()}
    return f"| {causal} | " + " | ".join(f"{tflops[n]:.0f}" for n in COLUMNS) + " |"


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    from flash_attn.cute.interface import flash_attn_func

    print("| causal | " + " | ".join(COLUMNS.values()) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for causal in (False, True):
        print(row(causal, flash_attn_func), flush=True)


if __name__ == "__main__":
    main()
