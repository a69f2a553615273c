"""Per-call host cost of each layer of the launch paths (GPU): raw kernel, torch op, API, peers.

    python perf/lab/latency_probe.py [--profile]

Two problems, bf16: dense B1 S512 H8 D64 and paged decode B1 context 1k H32 Hkv8 D128
(block 16). Each row is the median over 20 bursts of 200 back-to-back calls, the rows'
bursts interleaved (round robin, so a drift of the host's speed touches every row alike):
`host` times the calls alone (200 launches fit in the launch queue, so this is what the CPU
spends per call), `wall` includes the synchronization after the burst (per call, the larger
of host and GPU time). Raw kernels are called through `cutedsl_kernels.abi`
(`call_fmha_fwd`, `call_combine`), as the launch paths call them. `sparsek.attention` runs
its call-signature memo, then the planned run with the LSE dropped: the memo's cost is its
row minus "dense: dense.run_dense (planned, LSE dropped)".
`--profile` adds a cProfile of `sparsek.attention_with_kvcache` and of `sparsek.attention`
(top 25 by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import sparsek  # noqa: E402
from cutedsl_kernels.abi import call_combine, call_fmha_fwd  # noqa: E402
from cutedsl_kernels.config import Layout  # noqa: E402
from sparsek import ops, routing  # noqa: E402
from sparsek.launch import dense, kvcache, launcher, tma  # noqa: E402
from sparsek.masks import CAUSAL, NO_MASK  # noqa: E402
from sparsek.registry import mask_of  # noqa: E402
from sparsek.tuning import Workload  # noqa: E402


def per_call_us(
    rows: dict[str, Callable[[], object]], calls: int = 200, bursts: int = 20
) -> dict[str, tuple[float, float]]:
    """Row -> (host, wall) microseconds per call, medians over its bursts."""
    for fn in rows.values():
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(bursts):
        for name, fn in rows.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            issued = time.perf_counter()
            torch.cuda.synchronize()
            done = time.perf_counter()
            times[name].append(((issued - start) / calls * 1e6, (done - start) / calls * 1e6))
    return {
        name: (sorted(h for h, _ in t)[bursts // 2], sorted(w for _, w in t)[bursts // 2])
        for name, t in times.items()
    }


def dense_rows() -> dict[str, Callable[[], object]]:
    q = torch.randn(1, 512, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    # The DEFAULT workload's kernel (persistent, no tile counter), as before the one-wave
    # kernels: the API serves this problem with `Workload.ONE_WAVE`.
    loaded = launcher.forward_kernel(q.device, 64, q.dtype, mask_of(False))
    kernel = loaded.fn
    assert not loaded.takes_tile_counter
    out, lse = torch.empty_like(q), torch.empty(1, 8, 512, device="cuda")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sms = launcher.num_sms(q.device.index)
    plan = dense.dense_plan(q, k, v, NO_MASK, 0.125, False)
    index = q.device.index
    short = [t[:, :128].contiguous() for t in (q, k, v)]  # B1 H8 S128 D64
    sq, sk, sv = (t.transpose(1, 2) for t in short)
    import tvm_ffi

    def raw(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
        call_fmha_fwd(kernel, q, k, v, out, lse, softmax_scale=0.125, num_ctas=sms)

    def guarded() -> None:
        with launcher.device_guard(q.device):
            call_fmha_fwd(kernel, q, k, v, out, lse, softmax_scale=0.125, num_ctas=sms)

    return {
        "dense: 5x tvm_ffi.from_dlpack": lambda: [
            tvm_ffi.from_dlpack(t) for t in (q, k, v, out, lse)
        ],
        "dense: raw kernel call": lambda: raw(q, out, lse),
        "dense: 2x torch.empty": lambda: (torch.empty_like(q), torch.empty_like(lse)),
        "dense: raw call, fresh outputs": lambda: raw(
            q, torch.empty_like(q), torch.empty_like(lse)
        ),
        "dense: 2x torch.empty(shape, dtype, device)": lambda: (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(lse.shape, dtype=lse.dtype, device=q.device),
        ),
        "dense: 2x q.new_empty(shape[, dtype])": lambda: (
            q.new_empty(q.shape),
            q.new_empty(lse.shape, dtype=lse.dtype),
        ),
        "dense: 2x torch.empty(shape, dtype, device=index)": lambda: (
            torch.empty(q.shape, dtype=q.dtype, device=index),
            torch.empty(lse.shape, dtype=lse.dtype, device=index),
        ),
        "dense: 2x torch.empty_strided": lambda: (
            torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device),
            torch.empty_strided(lse.shape, lse.stride(), dtype=lse.dtype, device=q.device),
        ),
        "dense: raw call, fresh out only": lambda: raw(q, torch.empty_like(q), lse),
        "dense: raw call, fresh q view": lambda: raw(q.view(q.shape), out, lse),
        "dense: q.view alone": lambda: q.view(q.shape),
        "dense: raw call, device guard": guarded,
        "dense: kernel check (memo)": lambda: routing.dense_blockers(q, k, v, NO_MASK.spec),
        "dense: registry check (no memo)": lambda: routing.registry_blockers(
            0, 64, "bfloat16", "full"
        ),
        "dense: 3x tma.tma_readable": lambda: [tma.tma_readable(t) for t in (q, k, v)],
        "dense: dense.run_dense (planned)": lambda: dense.run_dense(plan, q, k, v),
        # What `sparsek.attention` runs once its call signature is remembered.
        "dense: dense.run_dense (planned, LSE dropped)": lambda: dense.run_dense(
            plan, q, k, v, False
        ),
        "dense: dense.attention": lambda: dense.attention(q, k, v, False, 0.125, False),
        "dense: ops.call_attention": lambda: ops.call_attention(q, k, v, False, 0.125, False),
        "dense: torch.ops op": lambda: torch.ops.sparsek.attention(q, k, v, False, 0.125, False),
        "dense: sparsek.attention": lambda: sparsek.attention(q, k, v),
        # Returning the LSE allocates it; dropping it writes the plan's LSE scratch.
        "dense: sparsek.attention, return_lse=True": lambda: sparsek.attention(
            q, k, v, return_lse=True
        ),
        "dense: sparsek SDPA drop-in": lambda: sparsek.scaled_dot_product_attention(qt, kt, vt),
        "dense: torch sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt),
        "dense S128: sparsek.attention": lambda: sparsek.attention(*short),
        "dense S128: torch sdpa": lambda: F.scaled_dot_product_attention(sq, sk, sv),
        # SDPA's fastest backend at S128 on the H200, called without SDPA's dispatch.
        "dense S128: aten efficient attention": lambda: (
            torch.ops.aten._scaled_dot_product_efficient_attention(sq, sk, sv, None, False)
        ),
    }


def decode_problem() -> tuple[torch.Tensor, ...]:
    batch, context, heads, kv_heads, dim, block = 1, 1024, 32, 8, 128, 16
    blocks = batch * context // block
    q = torch.randn(batch, 1, heads, dim, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(blocks, block, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    seqlens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    return q, k_cache, v_cache, seqlens, table


def decode_rows() -> dict[str, Callable[[], object]]:
    q, k_cache, v_cache, seqlens, table = decode_problem()
    scale = q.shape[-1] ** -0.5
    layout = Layout(False, "paged", k_cache.shape[1], True)
    head_dim = q.shape[-1]
    mask = mask_of(False)
    split = launcher.forward_kernel(q.device, head_dim, q.dtype, mask, layout, Workload.DECODE)
    combine = launcher.combine_kernel(q.device, head_dim, q.dtype)
    splits = 8
    qk = q.view(1, 8, 4, 128).transpose(1, 2)
    o_part = torch.empty(splits, 1, 4, 8, 128, device="cuda")
    lse_part = torch.empty(splits, 1, 8, 4, device="cuda")
    out = torch.empty_like(qk)
    lse = torch.empty(1, 8, 4, device="cuda")

    def raw() -> None:
        ctas = launcher.num_sms(q.device.index)
        call_fmha_fwd(
            split.fn, qk, k_cache, v_cache, o_part, lse_part,
            seqused_k=seqlens, page_table=table, softmax_scale=scale, max_seqlen_q=4,
            num_splits=splits, num_ctas=ctas,
        )  # fmt: skip
        call_combine(combine, o_part, lse_part, out, lse)

    op_args = (q, k_cache, v_cache, seqlens, table, None, None, True, scale, 0)
    cuda_args = (q, k_cache, v_cache, seqlens, table, None, None, CAUSAL, scale, 0)
    # The plan with `torch.empty` allocations (no strides), as before perf/NOTES.md #38.
    plan = kvcache.kvcache_plan(*cuda_args[:8], 0)
    assert isinstance(plan, kvcache.KvcachePlan)
    unstrided = dataclasses.replace(plan)
    object.__setattr__(
        unstrided, "allocations", {n: (shape, None) for n, (shape, _) in plan.allocations.items()}
    )
    return {
        "decode: raw split + combine": raw,
        "decode: torch.empty x2": lambda: (torch.empty(8, 4, 128, device="cuda"),) * 2,
        "decode: kvcache.attention_with_kvcache": lambda: kvcache.attention_with_kvcache(
            *cuda_args
        ),
        "decode: kvcache.attention_with_kvcache, torch.empty": lambda: (
            kvcache.attention_with_kvcache(*cuda_args, unstrided)
        ),
        "decode: torch.ops op": lambda: torch.ops.sparsek.attention_with_kvcache(*op_args),
        "decode: sparsek API": lambda: sparsek.attention_with_kvcache(
            q, k_cache, v_cache, seqlens, table
        ),
    }


def profile(name: str, fn: Callable[[], object]) -> None:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2000):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    print(f"--- cProfile: {name}, 2000 calls")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    # Without torch's C DLPack exchange API, TVM-FFI converts each tensor through Python.
    fast = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
    print(f"torch {torch.__version__}: __dlpack_c_exchange_api__ {fast}")
    rows = {**dense_rows(), **decode_rows()}
    width = max(len(name) for name in rows) + 2
    print(f"{'':<{width}}{'host us':>9}{'wall us':>9}")
    for name, (host, wall) in per_call_us(rows).items():
        print(f"{name:<{width}}{host:9.1f}{wall:9.1f}")
    if args.profile:
        q, k_cache, v_cache, seqlens, table = decode_problem()
        profile(
            "sparsek.attention_with_kvcache",
            lambda: sparsek.attention_with_kvcache(q, k_cache, v_cache, seqlens, table),
        )
        dense = torch.randn(3, 1, 512, 8, 64, device="cuda", dtype=torch.bfloat16)
        profile("sparsek.attention", lambda: sparsek.attention(*dense))


if __name__ == "__main__":
    main()
