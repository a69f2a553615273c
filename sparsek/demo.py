"""`python -m sparsek demo`: a short, honest tour.

With a CUDA GPU: sparsek.attention is checked against the float64 reference (next to
torch SDPA's own error in the same dtype) and timed against torch SDPA (CUDA events,
median of repeated runs after warm-up). This is a smoke test, not a benchmark: perf/ has those.

Without a GPU: the kernels are compiled for sm_90a (no GPU needed), and the CPU reference
path of the `sparsek::attention` op is run and compared with torch SDPA on the CPU; no
kernel is executed, and the demo says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import sparsek
from sparsek.precompile import precompile
from sparsek.reference import reference_attention

# (batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, causal)
GPU_SHAPES = [
    (2, 1024, 1024, 16, 16, 128, False),
    (2, 1024, 1024, 16, 16, 128, True),
    (4, 2048, 2048, 16, 4, 64, True),
    (1, 4096, 4096, 32, 8, 128, False),
]
CPU_SHAPES = [
    (1, 128, 128, 4, 4, 64, False),
    (1, 129, 257, 4, 1, 64, True),
    (2, 64, 64, 8, 2, 128, True),
]


def run_demo() -> int:
    """Run the GPU demo when CUDA is available, else the CPU one; returns an exit code."""
    if torch.cuda.is_available():
        return _gpu_demo()
    return _cpu_demo()


def _gpu_demo() -> int:
    device = torch.cuda.get_device_name()
    print(f"sparsek {sparsek.__version__} demo on {device} (bfloat16)")
    header = f"{'B':>2} {'Sq':>5} {'Sk':>5} {'H':>3} {'Hkv':>3} {'D':>4} {'causal':>6} "
    print(header + f"{'err sparsek':>12} {'err sdpa':>10} {'ms sparsek':>11} {'ms sdpa':>9}")
    ok = True
    for b, sq, sk, h, hkv, d, causal in GPU_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(b, s, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            for s, n in ((sq, h), (sk, hkv), (sk, hkv))
        )
        ref, _ = reference_attention(q, k, v, causal=causal, compute_dtype=torch.float64)

        def run_sparsek(
            q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v, causal: bool = causal
        ) -> torch.Tensor:
            out = sparsek.attention(q, k, v, causal=causal)
            assert isinstance(out, torch.Tensor)
            return out

        def run_sdpa(
            q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v, causal: bool = causal
        ) -> torch.Tensor:
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            gqa = qt.shape[1] != kt.shape[1]
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
            return out.transpose(1, 2)

        err = (run_sparsek().double() - ref).abs().max().item()
        err_sdpa = (run_sdpa().double() - ref).abs().max().item()
        ok &= err <= 2 * err_sdpa + 2e-3
        ms, ms_sdpa = _cuda_ms(run_sparsek), _cuda_ms(run_sdpa)
        print(
            f"{b:>2} {sq:>5} {sk:>5} {h:>3} {hkv:>3} {d:>4} {causal!s:>6} "
            f"{err:>12.2e} {err_sdpa:>10.2e} {ms:>11.3f} {ms_sdpa:>9.3f}"
        )
    print("correctness:", "OK" if ok else "FAILED (error above 2x SDPA's + 2e-3)")
    return 0 if ok else 1


def _cuda_ms(fn: Callable[[], torch.Tensor], warmup: int = 5, reps: int = 30) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)))
    return statistics.median(times)


def _cpu_demo() -> int:
    print("No CUDA GPU here: compiling the sm_90a kernels (no GPU needed to compile),")
    print("then running the CPU reference path. No sparsek kernel is executed on this machine.\n")
    compile_rc = precompile("sm_90a")
    print("\nCPU reference path (torch.ops.sparsek.attention on CPU = float32 reference)")
    print("vs torch SDPA on the CPU, float32; errors against a float64 reference:")
    header = f"{'B':>2} {'Sq':>5} {'Sk':>5} {'H':>3} {'Hkv':>3} {'D':>4} {'causal':>6} "
    print(header + f"{'err ref-op':>11} {'err sdpa':>10} {'ms ref-op':>10} {'ms sdpa':>8}")
    for b, sq, sk, h, hkv, d, causal in CPU_SHAPES:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(b, s, n, d, generator=gen) for s, n in ((sq, h), (sk, hkv), (sk, hkv))
        )
        exact, _ = reference_attention(q, k, v, causal=causal, compute_dtype=torch.float64)
        scale = d**-0.5

        def run_op(
            q: torch.Tensor = q,
            k: torch.Tensor = k,
            v: torch.Tensor = v,
            causal: bool = causal,
            scale: float = scale,
        ) -> torch.Tensor:
            out: torch.Tensor = torch.ops.sparsek.attention(q, k, v, causal, scale, False)[0]
            return out

        def run_sdpa(
            q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v, causal: bool = causal
        ) -> torch.Tensor:
            out = sparsek.attention(q, k, v, causal=causal)  # CPU: falls back to torch SDPA
            assert isinstance(out, torch.Tensor)
            return out

        err = (run_op().double() - exact).abs().max().item()
        err_sdpa = (run_sdpa().double() - exact).abs().max().item()
        print(
            f"{b:>2} {sq:>5} {sk:>5} {h:>3} {hkv:>3} {d:>4} {causal!s:>6} "
            f"{err:>11.2e} {err_sdpa:>10.2e} {_cpu_ms(run_op):>10.3f} {_cpu_ms(run_sdpa):>8.3f}"
        )
    if compile_rc:
        print("\nkernel compilation FAILED for at least one config (see above)")
    return compile_rc


def _cpu_ms(fn: Callable[[], torch.Tensor], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
