"""FP8 prefill against bf16 in the same process, and beside FlashAttention-3's FP8 (GPU).

    python perf/lab/ab_fp8.py                  # d128 and d64 rows below
    python perf/lab/ab_fp8.py --head-dim 128 --seqlen 16384
    python perf/lab/ab_fp8.py --single-level   # also: O accumulated in the tensor cores
    python perf/lab/ab_fp8.py --variant tile_n=176 num_stages=3   # also: another FP8 row
    python perf/lab/ab_fp8.py --decode         # paged decode: FP8 cache against bf16
    python perf/lab/ab_fp8.py --chunk          # chunked prefill over an FP8 cache

For each row (B * S = 16k, H = 2048 / D, causal and not; S = 16k is the FP8 issue's
target row), times `sparsek.attention` with FP8 inputs (descales, bf16 output) and with
bf16 inputs of the same shape, and FlashAttention-3's `flash_attn_func` with the same FP8
inputs and descales when the `fa3_fwd` package is installed, with the perf suite's timer
(cold L2, median), in one process. The FP8 time includes the host's key-major copy of V
(`sparsek.launch.fp8`), as a user's call pays it; "V copy us" times that copy alone.
Outputs: sparsek's FP8 output against the float32 attention of the dequantized inputs
(max abs error beside the bf16 kernel's own error on those inputs rounded to bf16).
With --single-level, the FP8 kernels without two-level accumulation (`pv_two_level=False`
through `tuning.override`) are timed too: the cost of the float32 adds. With --variant
FIELD=VALUE ..., the FP8 kernels of the `tuning.FP8` row with those fields replaced
(`tuning.Tuning`'s fields: tile_m, tile_n, num_stages, ...) instead, in the same column
(its output checked too: a variant that computes wrong values is reported, not timed).
Prints a markdown table; TFLOP/s count 4 * B * H * D * (visible pairs).

With --decode: paged decode (one bf16 query per sequence, H32 over Hkv8, d128, 16-row
pages) over an FP8 cache against the same values in a bf16 cache, B x context from 1 x 8k
to 32 x 32k, in one process: us per call, the cache bytes read per second against the
device's copy bandwidth (`perf.timing.copy_bandwidth_gbps`), the FP8 output's max
error against the bf16 cache's output, and the FP8 kernels with the cache converted
element by element (`convert_vectorized=False`; its output must equal the vectorized
one's bit for bit, else "differs").

With --chunk: chunked prefill (a causal chunk of new bf16 queries per sequence, packed as
a serving engine sends them, over a paged cache holding the context and the chunk;
H32 over Hkv8, d128, 16-row pages) over an FP8 cache (the kernels that convert its
tiles), over the same values in a bf16 cache, and over the FP8 cache dequantized to bf16
first (`sparsek.fp8.dequantize_cache` of the batch's blocks, then the bf16 kernels: what
such requests ran before): us per call and the FP8 output's max difference.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import sparsek  # noqa: E402
from perf.timing import copy_bandwidth_gbps, time_kernel  # noqa: E402
from sparsek import fp8, tuning  # noqa: E402
from sparsek.fp8 import FP8_DTYPE as FP8  # noqa: E402
from sparsek.fp8 import dequantize  # noqa: E402
from sparsek.launch.fp8 import key_major  # noqa: E402
from sparsek.reference import reference_attention  # noqa: E402

FA3_MODULE = "fa3_fwd_interface"
HEADER = (
    "| D | B | S | H | causal | FP8 TFLOP/s | bf16 TFLOP/s | FP8 / bf16 | FA3 FP8 TFLOP/s "
    "| FP8 / FA3 | V copy us | FP8 err | bf16 err | variant TFLOP/s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def visible_pairs(seqlen: int, causal: bool) -> int:
    return seqlen * (seqlen + 1) // 2 if causal else seqlen * seqlen


def fa3_fp8(
    q: Tensor, k: Tensor, v: Tensor, descales: tuple[Tensor, ...], causal: bool
) -> Callable[[], object] | None:
    """FA3's FP8 call (None without the package or FP8 support)."""
    try:
        fa3 = importlib.import_module(FA3_MODULE)
    except ImportError:
        return None
    qd, kd, vd = descales

    def run() -> object:
        return fa3.flash_attn_func(q, k, v, causal=causal, q_descale=qd, k_descale=kd,
                                   v_descale=vd)  # fmt: skip

    try:
        run()
    except Exception as error:  # a build without FP8: the row says so
        print(f"FA3 FP8 unavailable: {error}", file=sys.stderr)
        return None
    return run


Variant = dict[str, Any]  # Tuning fields


def variant_tflops(
    head_dim: int, fn: Callable[[], Tensor], flops: int, variant: Variant, want: Tensor
) -> str:
    """TFLOP/s of `fn` with the FP8 row's `variant` fields (the tables restored after);
    its output must equal the registered row's `want` within FP8 noise, else "wrong"."""
    row = tuning.FP8[("sm_90a", head_dim)]
    with tuning.override("fp8", "sm_90a", head_dim, replace(row, **variant)):
        err = (fn().float() - want.float()).abs().max().item()
        if not err <= 0.05 * want.float().abs().max().item():  # (NaN too)
            return f"wrong ({err:.3g})"
        return f"{flops / time_kernel(fn, torch.device('cuda')) / 1e9:.0f}"


def row(head_dim: int, seqlen: int, causal: bool, variant: Variant | None) -> str:
    device = torch.device("cuda")
    heads, batch = 2048 // head_dim, max(1, 16384 // seqlen)
    gen = torch.Generator(device=device).manual_seed(seqlen + head_dim)
    shape = (batch, seqlen, heads, head_dim)
    q, k, v = ((torch.randn(shape, device=device, generator=gen) * 3).to(torch.float8_e4m3fn)
               for _ in range(3))  # fmt: skip
    descales = tuple(torch.rand(batch, heads, device=device, generator=gen) + 0.1 for _ in "qkv")
    q16, k16, v16 = (
        dequantize(t, d, torch.bfloat16) for t, d in zip((q, k, v), descales, strict=True)
    )

    def fp8() -> Tensor:
        out = sparsek.attention(q, k, v, causal=causal, q_descale=descales[0],
                                k_descale=descales[1], v_descale=descales[2])  # fmt: skip
        return cast(Tensor, out)

    def bf16() -> Tensor:
        return cast(Tensor, sparsek.attention(q16, k16, v16, causal=causal))

    flops = 4 * batch * heads * head_dim * visible_pairs(seqlen, causal)
    tflops = {}
    for name, fn in (("fp8", fp8), ("bf16", bf16), ("fa3", fa3_fp8(q, k, v, descales, causal))):
        if fn is not None:
            tflops[name] = flops / time_kernel(fn, device) / 1e9
    copy_us = time_kernel(lambda: key_major(v), device) * 1e3
    # Accuracy on the first 256 queries of the first sequence (a float32 reference; causal,
    # they see only the first 256 keys).
    rows = slice(0, min(256, seqlen))
    keys = slice(0, rows.stop if causal else seqlen)
    qf, kf, vf = (
        dequantize(t[:1], d[:1], torch.float32) for t, d in zip((q, k, v), descales, strict=True)
    )
    ref, _ = reference_attention(qf[:, rows], kf[:, keys], vf[:, keys], causal=causal)
    err_fp8 = (fp8()[:1, rows].float() - ref).abs().max().item()
    err_bf16 = (bf16()[:1, rows].float() - ref).abs().max().item()
    other = variant_tflops(head_dim, fp8, flops, variant, fp8()) if variant else "-"
    fa3 = tflops.get("fa3")
    fa3_cells = f"{fa3:.0f} | {tflops['fp8'] / fa3:.2f}" if fa3 else "- | -"
    return (
        f"| {head_dim} | {batch} | {seqlen} | {heads} | {causal} | {tflops['fp8']:.0f} "
        f"| {tflops['bf16']:.0f} | {tflops['fp8'] / tflops['bf16']:.2f} | {fa3_cells} "
        f"| {copy_us:.1f} | {err_fp8:.3g} | {err_bf16:.3g} | {other} |"
    )


DECODE_HEADER = (
    "| B | context | FP8 us | bf16 us | bf16 / FP8 | FP8 GB/s | bf16 GB/s | copy GB/s "
    "| FP8 bw frac | max diff | element-wise FP8 us |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def decode_row(batch: int, context: int, copy_gbps: float) -> str:
    device = torch.device("cuda")
    heads, kv_heads, dim, page = 32, 8, 128, 16
    gen = torch.Generator(device=device).manual_seed(batch * context)
    blocks = batch * context // page
    k16, v16 = (
        torch.randn(blocks, page, kv_heads, dim, device=device, generator=gen).to(torch.bfloat16)
        for _ in range(2)
    )
    scale = torch.full((1, 1), 0.5, device=device).expand(batch, kv_heads)
    k8, v8 = ((t.float() / 0.5).to(torch.float8_e4m3fn) for t in (k16, v16))
    k16, v16 = ((t.float() * 0.5).to(torch.bfloat16) for t in (k8, v8))  # the same values
    table = torch.randperm(blocks, device=device, generator=gen).view(batch, -1).int()
    seqlens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, 1, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)

    def fp8() -> Tensor:
        out = sparsek.attention_with_kvcache(q, k8, v8, seqlens, table, k_descale=scale,
                                             v_descale=scale)  # fmt: skip
        return cast(Tensor, out)

    def bf16() -> Tensor:
        return cast(Tensor, sparsek.attention_with_kvcache(q, k16, v16, seqlens, table))

    us_fp8 = time_kernel(fp8, device) * 1e3
    us_bf16 = time_kernel(bf16, device) * 1e3
    vectorized = fp8()
    row = tuning.DECODE[("sm_90a", dim)]  # the cache converted element by element
    with tuning.override("decode", "sm_90a", dim, replace(row, convert_vectorized=False)):
        us_elementwise = time_kernel(fp8, device) * 1e3
        same = torch.equal(fp8(), vectorized)  # the same tiles reach the GEMMs
    values = 2 * batch * context * kv_heads * dim
    gbps_fp8, gbps_bf16 = values / us_fp8 / 1e3, 2 * values / us_bf16 / 1e3
    diff = (fp8().float() - bf16().float()).abs().max().item()
    return (
        f"| {batch} | {context} | {us_fp8:.1f} | {us_bf16:.1f} | {us_bf16 / us_fp8:.2f} "
        f"| {gbps_fp8:.0f} | {gbps_bf16:.0f} | {copy_gbps:.0f} | {gbps_fp8 / copy_gbps:.2f} "
        f"| {diff:.3g} | {us_elementwise:.1f}{'' if same else ' (differs)'} |"
    )


CHUNK_HEADER = (
    "| B | context | chunk | FP8 cache us | bf16 cache us | dequantized us | bf16 / FP8 "
    "| dequantized / FP8 | max diff |\n|---|---|---|---|---|---|---|---|---|"
)


def chunk_row(batch: int, context: int, chunk: int) -> str:
    device = torch.device("cuda")
    heads, kv_heads, dim, page = 32, 8, 128, 16
    gen = torch.Generator(device=device).manual_seed(batch * context + chunk)
    length = context + chunk
    blocks = batch * -(-length // page)
    k8, v8 = (
        torch.randn(blocks, page, kv_heads, dim, device=device, generator=gen).to(FP8)
        for _ in range(2)
    )
    k16, v16 = ((t.float() * 0.5).to(torch.bfloat16) for t in (k8, v8))  # the same values
    scale = torch.full((1, 1), 0.5, device=device).expand(batch, kv_heads)
    table = torch.randperm(blocks, device=device, generator=gen).view(batch, -1).int()
    seqlens = torch.full((batch,), length, dtype=torch.int32, device=device)
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * chunk
    q = torch.randn(batch * chunk, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)

    def call(k: Tensor, v: Tensor, blocks: Tensor, descale: Tensor | None) -> Tensor:
        out = sparsek.attention_with_kvcache(q, k, v, seqlens, blocks, cu_seqlens_q=cu,
                                             max_seqlen_q=chunk, causal=True,
                                             k_descale=descale, v_descale=descale)  # fmt: skip
        return cast(Tensor, out)

    def dequantized() -> Tensor:
        kd, vd = (fp8.dequantize_cache(t, scale, table, seqlens, torch.bfloat16) for t in (k8, v8))
        return call(kd, vd, fp8.compact_block_table(table), None)

    us = {
        name: time_kernel(fn, device) * 1e3
        for name, fn in (
            ("fp8", lambda: call(k8, v8, table, scale)),
            ("bf16", lambda: call(k16, v16, table, None)),
            ("dequantized", dequantized),
        )
    }
    diff = (call(k8, v8, table, scale).float() - call(k16, v16, table, None).float()).abs().max()
    return (
        f"| {batch} | {context} | {chunk} | {us['fp8']:.1f} | {us['bf16']:.1f} "
        f"| {us['dequantized']:.1f} | {us['bf16'] / us['fp8']:.2f} "
        f"| {us['dequantized'] / us['fp8']:.2f} | {diff.item():.3g} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, nargs="*", default=[128, 64])
    parser.add_argument("--seqlen", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--causal", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--single-level", action="store_true", help="--variant pv_two_level=0")
    parser.add_argument("--variant", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--chunk", action="store_true")
    args = parser.parse_args()
    if args.chunk:
        print(CHUNK_HEADER)
        for batch, context, chunk in ((1, 8192, 512), (4, 4096, 2048), (16, 4096, 256)):
            print(chunk_row(batch, context, chunk), flush=True)
        return
    if args.decode:
        copy_gbps = copy_bandwidth_gbps(torch.device("cuda"), 1 << 30)
        print(DECODE_HEADER)
        for batch, context in ((1, 8192), (8, 8192), (8, 32768), (32, 8192), (32, 32768)):
            print(decode_row(batch, context, copy_gbps), flush=True)
        return
    variant: Variant = {"pv_two_level": False} if args.single_level else {}
    for item in args.variant:
        field, value = item.split("=")
        is_bool = isinstance(getattr(tuning.FP8[("sm_90a", 128)], field), bool)
        variant[field] = bool(int(value)) if is_bool else int(value)
    print(f"variant: {variant or 'none'}")
    print(HEADER)
    for head_dim in args.head_dim:
        for seqlen in args.seqlen:
            for causal in args.causal:
                print(row(head_dim, seqlen, bool(causal), variant), flush=True)


if __name__ == "__main__":
    main()
