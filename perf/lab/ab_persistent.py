"""Same-process A/B of a registered kernel config against a variant of it (GPU).

    python perf/lab/ab_persistent.py [--dtype bfloat16] [--varlen]  # vs persistent=False
    python perf/lab/ab_persistent.py --against tile_m=128 --head-dim 64 --causal 1
    python perf/lab/ab_persistent.py --against persistent=1 --head-dim 256  # any registered D
    python perf/lab/ab_persistent.py --window 4096 --against dynamic_schedule=1 l2_group_mb=8
    python perf/lab/ab_persistent.py --softcap 30 --against exp2_emulation=4
    python perf/lab/ab_persistent.py --against dynamic_schedule=0 l2_group_mb=0 --causal 1
    python perf/lab/ab_persistent.py --latency  # small problems: planned workload vs DEFAULT

For each row of the perf suite's dense grid (d64/d128 x causal/non-causal, S 512..16k,
B*S = 16k, H = 2048 / D) plus GQA 32:8 at 4k and Sq=1k/Sk=8k (or those of --head-dim /
--causal), the registered config (B; the workload `sparsek.launch.dense` plans for the
shape) and the same with the --against fields replaced (A; default: persistent=False, one
CTA per work tile) are launched directly (`cutedsl_kernels.abi.call_fmha_fwd`, with the
arguments `sparsek.launch.dense` passes), their NaN-poisoned outputs checked against cuDNN
SDPA's, and timed
with the perf suite's timer (cold L2, median) beside cuDNN in the same process. Prints a
markdown table. With --varlen: the perf suite's packed varlen case instead (16 sequences
of 44-4096 tokens, d128, H16 and GQA 32:8, causal and not), checked against the float32
reference, TFLOP/s over each sequence's exact visible pairs. With --latency: small
problems (`latency_shapes`), each timed as a CUDA-graph replay (us, back to back), as
`sparsek.launch.dense` plans it (`Workload.ONE_WAVE` kernels, or KV-cache decode for one
query per sequence) against the kernel that served it before those routes.

Also importable (`perf.lab.ab_stages` times its rows through `dense_runs`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from cutedsl_kernels.abi import call_fmha_fwd  # noqa: E402
from cutedsl_kernels.config import DENSE, PACKED, FmhaFwdConfig  # noqa: E402
from perf.shapes import NO_WINDOW, varlen_seqlens, visible_pairs  # noqa: E402
from perf.timing import time_graph, time_kernel  # noqa: E402
from sparsek.cache import get_kernel  # noqa: E402
from sparsek.launch import dense, launcher  # noqa: E402
from sparsek.masks import make_mask  # noqa: E402
from sparsek.reference_varlen import reference_attention_varlen  # noqa: E402
from sparsek.registry import detect_arch, lookup, mask_of  # noqa: E402
from sparsek.tuning import LONG_SEQLEN_Q, Workload  # noqa: E402

HEADER = (
    "| dtype | B | Sq | Sk | H | Hkv | D | causal | A TFLOP/s | B TFLOP/s "
    "| cuDNN TFLOP/s | B / A | B / cuDNN | max err |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
Against = dict[str, Any]


Shape = tuple[int, int, int, int, int, int, bool]


def shapes(head_dims: tuple[int, ...] = (64, 128)) -> list[Shape]:
    """(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal) rows: the grid of
    `head_dims` (B x S = 16k, H = 2048 // D), then GQA and Sq != Sk rows at d128."""
    rows = [
        (16384 // s, s, s, 2048 // d, 2048 // d, d, causal)
        for d in head_dims
        for causal in (False, True)
        for s in (512, 1024, 2048, 4096, 8192, 16384)
    ]
    if 128 not in head_dims:
        return rows
    extra = [(4, 4096, 4096, 32, 8, 128, c) for c in (False, True)]
    return [*rows, *extra, (16, 1024, 8192, 16, 16, 128, False)]


def dense_launcher(
    config: FmhaFwdConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **extra: Any
) -> tuple[Callable[[], None], torch.Tensor]:
    """A launcher of `config` on dense q, k, v (scale 1/sqrt(D), one CTA per SM; `extra`:
    more `call_fmha_fwd` arguments) and the NaN-poisoned output it writes; a dynamic
    schedule gets its counter zeroed per call, as `sparsek.launch` does."""
    b, s, h, _ = q.shape
    kernel = get_kernel(config)
    out = torch.full((b, s, h, v.shape[-1]), float("nan"), device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, s, device=q.device, dtype=torch.float32)
    sms, counted = launcher.num_sms(q.device.index), config.dynamic_schedule

    def run() -> None:
        call_fmha_fwd(
            kernel, q, k, v, out, lse,
            tile_counter=tile_counter(counted, q.device),
            softmax_scale=q.shape[-1] ** -0.5,
            num_ctas=sms,
            **extra,
        )  # fmt: skip

    return run, out


def dense_runs(
    shape: Shape, dtype: torch.dtype, configs: dict[str, FmhaFwdConfig | None]
) -> tuple[dict[str, Callable[[], object]], float]:
    """Launchers of each config (None: the request as `sparsek.launch.dense` plans and runs
    it) and "cudnn" on fresh inputs of `shape`, each run once into a NaN-poisoned output
    and checked against cuDNN SDPA's; and the worst error."""
    b, sq, sk, h, hkv, d, causal = shape
    device = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hkv, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hkv, d, device=device, dtype=dtype)
    # cuDNN gets K/V expanded to every query head (GQA rows).
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    kt, vt = (t.repeat_interleave(h // hkv, dim=1) for t in (kt, vt))

    def cudnn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)

    want = cudnn()
    fns: dict[str, Callable[[], object]] = {"cudnn": cudnn}
    errs = []
    for name, config in configs.items():
        if config is None:
            plan = dense.dense_plan(q, k, v, make_mask(causal), d**-0.5, False)

            def planned(plan: dense.DensePlan = plan) -> torch.Tensor:
                return dense.run_dense(plan, q, k, v)[0]

            errs.append((planned().float() - want.float()).abs().max().item())
            fns[name] = planned
            continue
        run, out = dense_launcher(config, q, k, v)
        run()
        torch.cuda.synchronize()
        errs.append((out.float() - want.float()).abs().max().item())
        fns[name] = run
    return fns, max(errs)


def planned_workload(shape: Shape) -> Workload:
    """The workload `sparsek.launch.dense` plans for a dense request of `shape`."""
    b, sq, _, h, _, _, causal = shape
    return dense.dense_workload(b, sq, h, causal, launcher.num_sms(torch.cuda.current_device()))


def row(shape: Shape, dtype: torch.dtype, arch: str, against: Against) -> str:
    b, sq, sk, h, hkv, d, causal = shape
    base = lookup(arch, d, dtype, mask_of(causal), DENSE, planned_workload(shape))
    fns, err = dense_runs(shape, dtype, {"A": replace(base, **against), "B": base})
    flops = 4 * b * h * sq * sk * d // (2 if causal else 1)
    device = torch.device("cuda")
    tflops = {name: flops / time_kernel(fn, device) / 1e9 for name, fn in fns.items()}
    g, p, c = tflops["A"], tflops["B"], tflops["cudnn"]
    return (
        f"| {str(dtype).removeprefix('torch.')} | {b} | {sq} | {sk} | {h} | {hkv} | {d} | {causal} "
        f"| {g:.0f} | {p:.0f} | {c:.0f} | {p / g:.3f} | {p / c:.3f} | {err:.3g} |"
    )


LATENCY_HEADER = (
    "| dtype | B | Sq | Sk | H | Hkv | D | causal | B workload | A us | B us | cuDNN us "
    "| A / B | cuDNN / B | max err |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def latency_shapes() -> list[Shape]:
    """The perf suite's latency shapes, causal too, and small problems around one wave."""
    return [
        (1, 128, 128, 8, 8, 64, False),
        (1, 512, 512, 8, 8, 64, False),
        (1, 512, 512, 16, 16, 128, False),
        (1, 512, 512, 8, 8, 64, True),
        (1, 512, 512, 16, 16, 128, True),
        (1, 1024, 1024, 8, 8, 64, False),
        (4, 256, 256, 8, 8, 64, True),  # 128 tiles of 64 rows
        (1, 1, 4096, 32, 8, 128, False),  # decode through the dense API
        (1, 1, 16384, 32, 8, 128, False),
        (8, 1, 4096, 32, 8, 128, False),
        (4, 1, 4096, 16, 16, 64, False),
        (1, 8192, 8192, 1, 1, 128, False),  # long, yet one wave
        (1, 8192, 8192, 1, 1, 128, True),
        (1, 4096, 4096, 2, 2, 64, True),
        (1, 1024, 1024, 16, 16, 128, False),  # 256 tiles of 64 rows: DEFAULT on both sides
    ]


def latency_row(shape: Shape, dtype: torch.dtype, arch: str) -> str:
    """CUDA-graph replay (us) of the request as `sparsek.launch.dense` plans it (B: its
    workload's kernel, or KV-cache decode for one query per sequence) against the kernel
    that served it before one-wave problems and single queries had their own (A: the
    DEFAULT workload's, or LONG_Q's)."""
    b, sq, sk, h, hkv, d, causal = shape
    before = Workload.LONG_Q if causal and sq >= LONG_SEQLEN_Q else Workload.DEFAULT
    a = lookup(arch, d, dtype, mask_of(causal), DENSE, before)
    fns, err = dense_runs(shape, dtype, {"A": a, "B": None})
    device = torch.device("cuda")
    us = {name: time_graph(fn, device) * 1e3 for name, fn in fns.items()}
    name = "decode" if sq == 1 else planned_workload(shape).name
    return (
        f"| {str(dtype).removeprefix('torch.')} | {b} | {sq} | {sk} | {h} | {hkv} | {d} | {causal} "
        f"| {name} | {us['A']:.2f} | {us['B']:.2f} | {us['cudnn']:.2f} | {us['A'] / us['B']:.3f} "
        f"| {us['cudnn'] / us['B']:.3f} | {err:.3g} |"
    )


def tile_counter(counted: bool, device: torch.device) -> torch.Tensor | None:
    """A dynamic schedule's work-tile counter, zeroed per call as `sparsek.launch` does."""
    return launcher.zeroed_counter(device) if counted else None


MASK_HEADER = (
    "| dtype | B | S | H | D | mask | A TFLOP/s | B TFLOP/s | plain TFLOP/s | B / A "
    "| max A-B |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def mask_row(
    head_dim: int,
    dtype: torch.dtype,
    arch: str,
    against: Against,
    *,
    causal: bool = False,
    window_left: int = -1,
    softcap: float = 0.0,
) -> str:
    """The masks suite's case (B1 S16k H = 2048 // D) with a window (window_left, 0) or a
    softcap: the registered kernel of the mask (B) against it with the --against fields
    replaced (A), and the same problem without the window or softcap ("plain": causal
    for a window), on the same inputs; TFLOP/s over the pairs each one computes. A and B
    are checked against each other (the registered kernels against the float64
    reference: tests/gpu/test_masks_gpu.py)."""
    b, s, d = 1, 16384, head_dim
    h = 2048 // d
    device = torch.device("cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
    sms = launcher.num_sms(device.index)
    window = (window_left, 0 if window_left >= 0 else -1)
    mask = make_mask(causal, window, softcap)
    plain = make_mask(causal or window_left >= 0)
    base, reference = (
        lookup(arch, d, dtype, m.spec, DENSE, dense.dense_workload(b, s, h, m.causal, sms))
        for m in (mask, plain)
    )
    fns: dict[str, Callable[[], object]] = {}
    outs = {}
    for name, config, m in (
        ("A", replace(base, **against), mask),
        ("B", base, mask),
        ("plain", reference, plain),
    ):
        run, out = dense_launcher(
            config, q, k, v,
            window_left=m.window_left,
            window_right=m.window_right if m.window else -1,
            softcap=m.op_softcap,
        )  # fmt: skip
        run()
        outs[name] = out
        fns[name] = run
    torch.cuda.synchronize()
    err = (outs["A"].float() - outs["B"].float()).abs().max().item()
    pairs = {
        name: visible_pairs(s, s, m.causal, exact=True, window=window if m.window else NO_WINDOW)
        for name, m in (("A", mask), ("B", mask), ("plain", plain))
    }
    tflops = {
        name: 4.0 * b * h * d * pairs[name] / time_kernel(fn, device) / 1e9
        for name, fn in fns.items()
    }
    g, p, c = tflops["A"], tflops["B"], tflops["plain"]
    parts = ["causal"] if mask.causal else []
    parts += [f"window {window}"] if mask.window else []
    parts += [f"softcap {softcap:g}"] if softcap else []
    label = ", ".join(parts)
    return (
        f"| {str(dtype).removeprefix('torch.')} | {b} | {s} | {h} | {d} | {label} "
        f"| {g:.0f} | {p:.0f} | {c:.0f} | {p / g:.3f} | {err:.3g} |"
    )


VARLEN_HEADER = (
    "| dtype | seqs | H | Hkv | D | causal | A TFLOP/s | B TFLOP/s | B / A | max err |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def varlen_row(
    h: int, hkv: int, causal: bool, dtype: torch.dtype, arch: str, against: Against
) -> str:
    d, lengths = 128, varlen_seqlens()
    device = torch.device("cuda")
    torch.manual_seed(0)
    total = sum(lengths)
    q = torch.randn(total, h, d, device=device, dtype=dtype)
    k = torch.randn(total, hkv, d, device=device, dtype=dtype)
    v = torch.randn(total, hkv, d, device=device, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu = cu.to(device)
    longest = max(lengths)
    want, _ = reference_attention_varlen(q, k, v, cu, cu, longest, longest, causal=causal)
    base = lookup(arch, d, dtype, mask_of(causal), PACKED)
    q1, k1, v1 = q[None], k[None], v[None]  # the packed tokens as a batch of one
    fns: dict[str, Callable[[], object]] = {}
    errs = []
    for name, config in (("A", replace(base, **against)), ("B", base)):
        kernel = get_kernel(config)
        out = torch.full_like(q, float("nan"))
        lse = torch.empty(h, total, device=device, dtype=torch.float32)

        def run(
            kernel: Any = kernel,
            out: torch.Tensor = out,
            lse: torch.Tensor = lse,
            counted: bool = config.dynamic_schedule,
        ) -> None:
            call_fmha_fwd(
                kernel, q1, k1, v1, out[None], lse[None],
                cu_seqlens_q=cu,
                cu_seqlens_k=cu,
                tile_counter=tile_counter(counted, device),
                softmax_scale=d**-0.5,
                max_seqlen_q=longest,
                num_ctas=launcher.num_sms(device.index),
            )  # fmt: skip

        run()
        torch.cuda.synchronize()
        errs.append((out.float() - want.float()).abs().max().item())
        fns[name] = run
    pairs = sum(visible_pairs(n, n, causal, exact=True) for n in lengths)
    flops = 4.0 * h * d * pairs
    tflops = {name: flops / time_kernel(fn, device) / 1e9 for name, fn in fns.items()}
    g, p = tflops["A"], tflops["B"]
    return (
        f"| {str(dtype).removeprefix('torch.')} | {len(lengths)} | {h} | {hkv} | {d} | {causal} "
        f"| {g:.0f} | {p:.0f} | {p / g:.3f} | {max(errs):.3g} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--varlen", action="store_true", help="the packed varlen case")
    parser.add_argument(
        "--latency", action="store_true", help="small problems: planned workload vs DEFAULT"
    )
    parser.add_argument(
        "--against",
        nargs="*",
        default=["persistent=0", "dynamic_schedule=0", "l2_group_mb=0"],
        help="FIELD=INT config fields of A (B: the registered config)",
    )
    parser.add_argument(
        "--window", type=int, nargs="*", help="the masks suite's window case, these left sizes"
    )
    parser.add_argument(
        "--softcap", type=float, help="the masks suite's softcap case (causal and not)"
    )
    parser.add_argument("--head-dim", type=int, help="only rows of this head_dim")
    parser.add_argument("--causal", type=int, choices=(0, 1), help="only (non-)causal rows")
    args = parser.parse_args()
    against: Against = {}
    for item in args.against:
        field, value = item.split("=")
        is_bool = FmhaFwdConfig.__dataclass_fields__[field].type == "bool"
        against[field] = bool(int(value)) if is_bool else int(value)
    dtype = getattr(torch, args.dtype)
    arch = detect_arch(torch.device("cuda"))
    assert arch is not None
    if args.latency:
        lines = [LATENCY_HEADER]
        for shape in latency_shapes():
            lines.append(latency_row(shape, dtype, arch))
            print(lines[-1], flush=True)
        print("\n".join(lines))
        return
    if args.window or args.softcap:
        rows: list[dict[str, Any]] = [{"window_left": left} for left in args.window or ()]
        rows += [{"softcap": args.softcap, "causal": c} for c in (False, True) if args.softcap]
        lines = [MASK_HEADER]
        for kwargs in rows:
            for d in (args.head_dim,) if args.head_dim else (64, 128):
                lines.append(mask_row(d, dtype, arch, against, **kwargs))
                print(lines[-1], flush=True)
        print("\n".join(lines))
        return
    if args.varlen:
        lines = [VARLEN_HEADER]
        for h, hkv in ((16, 16), (32, 8)):
            for causal in (False, True):
                lines.append(varlen_row(h, hkv, causal, dtype, arch, against))
                print(lines[-1], flush=True)
        print("\n".join(lines))
        return
    lines = [HEADER]
    for shape in shapes((args.head_dim,) if args.head_dim else (64, 128)):
        if args.head_dim not in (None, shape[5]) or args.causal not in (None, shape[6]):
            continue
        lines.append(row(shape, dtype, arch, against))
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
