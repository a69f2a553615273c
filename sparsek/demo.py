"""`sparsek demo` and `sparsek validate`: a short, honest tour, and its check alone.

Each shape runs `sparsek.attention` and torch's own SDPA
(`torch.nn.functional.scaled_dot_product_attention`) on the same inputs, both compared
with a float64 reference (`sparsek.reference`). sparsek passes when its error is within
twice SDPA's plus a small atol: `max|out - ref| <= 2 * max|sdpa - ref| + atol`.

With a CUDA GPU: bfloat16 on the GPU's kernels, timed against torch SDPA (CUDA events,
median of repeated runs after warm-up). A smoke test, not a benchmark: perf/ has those.

Without a GPU: first the sm_90a kernels these shapes would run on a Hopper GPU (bfloat16)
are compiled into the cache, with a progress bar (no GPU needed to compile; `sparsek
compile` compiles every kernel); then float32 on the CPU, where `sparsek.attention` runs
its reference path. No sparsek kernel is executed, and the demo says so.

`validate` runs the same checks without timing and without compiling ahead; its exit
status says whether they passed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import sparsek
from cutedsl_kernels.config import FmhaFwdConfig
from sparsek.reference import reference_attention


@dataclass(frozen=True)
class Shape:
    """One demo problem; tensors are (batch, seqlen, heads, head_dim)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool

    def row(self) -> str:
        return (
            f"{self.batch:>2} {self.seqlen_q:>5} {self.seqlen_k:>5} {self.heads:>3} "
            f"{self.kv_heads:>3} {self.head_dim:>4} {self.causal!s:>6}"
        )


HEADER = f"{'B':>2} {'Sq':>5} {'Sk':>5} {'H':>3} {'Hkv':>3} {'D':>4} {'causal':>6}"
GPU_SHAPES = [
    Shape(2, 1024, 1024, 16, 16, 128, False),
    Shape(2, 1024, 1024, 16, 16, 128, True),
    Shape(4, 2048, 2048, 16, 4, 64, True),
    Shape(1, 4096, 4096, 32, 8, 128, False),
]
CPU_SHAPES = [
    Shape(1, 128, 128, 4, 4, 64, False),
    Shape(1, 129, 257, 4, 1, 64, True),
    Shape(2, 64, 64, 8, 2, 128, True),
]
# atol of the check, per dtype: a rounding step of the output near 1.
ATOL = {torch.bfloat16: 2e-3, torch.float32: 1e-5}
CPU_ARCH = "sm_90a"  # what the CPU demo compiles for


@dataclass
class Case:
    """One shape's inputs, its two runners and their errors against float64."""

    shape: Shape
    run_sparsek: Callable[[], torch.Tensor]
    run_sdpa: Callable[[], torch.Tensor]
    err: float
    err_sdpa: float
    ok: bool


def run_demo() -> int:
    """Run the GPU demo when CUDA is available, else the CPU one; returns an exit code."""
    if torch.cuda.is_available():
        return _gpu_demo()
    return _cpu_demo()


def run_validate() -> int:
    """The demo's correctness check alone (no timing, no compiling ahead): 0 when every
    shape passes, 1 when not."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    where = torch.cuda.get_device_name() if cuda else "the CPU (reference path)"
    print(f"sparsek {sparsek.__version__} validate on {where}, {_name(dtype)}")
    return 0 if check_table(GPU_SHAPES if cuda else CPU_SHAPES, device, dtype) else 1


def check_table(
    shapes: list[Shape],
    device: str,
    dtype: torch.dtype,
    timer: Callable[[Callable[[], torch.Tensor]], float] | None = None,
) -> bool:
    """Print a row per shape (errors, times with a `timer`, the check) and the verdict;
    returns whether every shape passed."""
    timing = f" {'ms sparsek':>11} {'ms sdpa':>9}" if timer else ""
    print(f"{HEADER} {'err sparsek':>12} {'err sdpa':>10}{timing}  check")
    ok = True
    for shape in shapes:
        case = make_case(shape, device, dtype)
        ok &= case.ok
        times = f" {timer(case.run_sparsek):>11.3f} {timer(case.run_sdpa):>9.3f}" if timer else ""
        verdict = "ok" if case.ok else "FAILED"
        print(f"{shape.row()} {case.err:>12.2e} {case.err_sdpa:>10.2e}{times}  {verdict}")
    print(_verdict(ok, dtype))
    return ok


def make_case(shape: Shape, device: str, dtype: torch.dtype) -> Case:
    """Inputs of `shape` (seeded), both runners, and the check of their first outputs."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(shape.batch, s, n, shape.head_dim, device=device, dtype=dtype, generator=gen)
        for s, n in (
            (shape.seqlen_q, shape.heads),
            (shape.seqlen_k, shape.kv_heads),
            (shape.seqlen_k, shape.kv_heads),
        )
    )
    exact, _ = reference_attention(q, k, v, causal=shape.causal, compute_dtype=torch.float64)

    def run_sparsek() -> torch.Tensor:
        out = sparsek.attention(q, k, v, causal=shape.causal)
        assert isinstance(out, torch.Tensor)
        return out

    run_sdpa = _torch_sdpa(q, k, v, shape.causal)
    err = (run_sparsek().double() - exact).abs().max().item()
    err_sdpa = (run_sdpa().double() - exact).abs().max().item()
    ok = err <= 2 * err_sdpa + ATOL[dtype]
    return Case(shape, run_sparsek, run_sdpa, err, err_sdpa, ok)


def _torch_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> Callable[[], torch.Tensor]:
    """torch SDPA on (batch, seqlen, heads, head_dim) inputs, causal aligned bottom-right
    like sparsek's (SDPA's `is_causal` is top-left: the same only where Sq == Sk)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    mask = None
    if causal and seqlen_q != seqlen_k:
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
        mask = visible.tril(diagonal=seqlen_k - seqlen_q)
    is_causal = causal and mask is None
    gqa = qt.shape[1] != kt.shape[1]

    def run() -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa
        )
        return out.transpose(1, 2)

    return run


def _gpu_demo() -> int:
    print(f"sparsek {sparsek.__version__} demo on {torch.cuda.get_device_name()} (bfloat16)")
    return 0 if check_table(GPU_SHAPES, "cuda", torch.bfloat16, _cuda_ms) else 1


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


def demo_kernels() -> list[FmhaFwdConfig]:
    """The sm_90a kernels `CPU_SHAPES` would run on a Hopper GPU in bfloat16 (each distinct
    (head_dim, mask) once)."""
    from sparsek import registry

    wanted = dict.fromkeys((s.head_dim, s.causal) for s in CPU_SHAPES)
    return [
        registry.lookup(CPU_ARCH, head_dim, torch.bfloat16, registry.mask_of(causal))
        for head_dim, causal in wanted
    ]


def _cpu_demo() -> int:
    from sparsek.precompile import INTERRUPTED, precompile

    print("No CUDA GPU here: compiling the sm_90a kernels these shapes would run on a Hopper")
    print("GPU (no GPU needed to compile; `sparsek compile` compiles all of them), then")
    print("running the CPU reference path. No sparsek kernel is executed on this machine.\n")
    compile_rc = precompile(CPU_ARCH, demo_kernels())
    if compile_rc == INTERRUPTED:
        return compile_rc
    print("\nsparsek.attention on the CPU (its float32 reference path) vs torch SDPA on the")
    print("CPU, float32; errors against a float64 reference:")
    ok = check_table(CPU_SHAPES, "cpu", torch.float32, _cpu_ms)
    if compile_rc:
        print("kernel compilation FAILED (see above)")
    return 1 if compile_rc or not ok else 0


def _cpu_ms(fn: Callable[[], torch.Tensor], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _verdict(ok: bool, dtype: torch.dtype) -> str:
    rule = f"error within 2x torch SDPA's + {ATOL[dtype]:g}"
    return f"correctness: {'OK' if ok else 'FAILED'} ({rule})"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
