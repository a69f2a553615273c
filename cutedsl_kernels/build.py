"""Compile, export and load FMHA kernels without a GPU (no torch here).

Kernels are compiled against fake tensors with symbolic extents, so one compiled kernel
serves every batch size, sequence length, head count and stride. They are compiled with
TVM-FFI enabled: the loaded function takes framework tensors (anything with DLPack)
directly and launches on the framework's current stream.

Runtime signature of every compiled forward kernel (the contract with `sparsek`):

    fn(q, k, v, out, lse, softmax_scale: float, causal_offset: int) -> None

    q, out: (batch, seqlen_q, num_heads, head_dim)        dtype = config.dtype
    k, v:   (batch, seqlen_k, num_kv_heads, head_dim)     dtype = config.dtype
    lse:    (batch, num_heads, seqlen_q)                  float32, last dim contiguous
    The last dim of q/k/v/out is contiguous; other strides are arbitrary multiples of 8
    elements and base pointers are 16-byte aligned (TMA's rules). num_heads is a multiple
    of num_kv_heads. seqlen_q >= 1, seqlen_k >= 1.
    causal_offset (causal configs only): key j is visible to query i iff j <= i + offset.
    Rows with no visible key get out = 0 and lse = -inf.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cutedsl_kernels.config import FmhaFwdConfig

KERNEL_DIR = Path(__file__).resolve().parent


def kernel_source_files() -> list[Path]:
    """Every source file whose change must invalidate compiled artifacts."""
    return sorted(p for p in KERNEL_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def dsl_version() -> str:
    """Installed nvidia-cutlass-dsl version, without importing the DSL."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-cutlass-dsl")
    except PackageNotFoundError:
        return "missing"


def can_implement(config: FmhaFwdConfig) -> list[str]:
    """Reasons `config` cannot be compiled (empty when it can)."""
    if config.arch.startswith("sm_90"):
        from cutedsl_kernels.hopper.fmha_fwd import HopperFmhaForward

        return HopperFmhaForward.can_implement(config)
    return [f"arch={config.arch!r} has no FMHA forward kernel (supported: sm_90a)"]


def _set_target_arch(arch: str) -> None:
    """Point the DSL at `arch`; without a GPU its default would be sm_100."""
    os.environ["CUTE_DSL_ARCH"] = arch
    from cutlass.cutlass_dsl import CuTeDSL

    CuTeDSL._get_dsl().envar.arch = arch


def compile_fwd(config: FmhaFwdConfig) -> Any:
    """Compile `config` for `config.arch` (no GPU needed) and return the compiled function.

    Raises:
        ValueError: `config` is not implementable (message lists the reasons).
    """
    reasons = can_implement(config)
    if reasons:
        raise ValueError(f"cannot compile {config.name}: " + "; ".join(reasons))
    _set_target_arch(config.arch)
    import cutlass.cute as cute

    from cutedsl_kernels.hopper.fmha_fwd import HopperFmhaForward

    kernel = HopperFmhaForward(config)
    args = kernel.fake_arguments()
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(kernel, *args, stream, options=f"--enable-tvm-ffi --gpu-arch {config.arch}")


def export_fwd(compiled: Any, object_path: str, function_name: str) -> None:
    """Write a compiled kernel (host launcher + cubin) as a relocatable object file."""
    compiled.export_to_c(object_file_path=object_path, function_name=function_name)


def load_fwd(object_path: str, function_name: str) -> Callable[..., None]:
    """Load an exported kernel; the result is callable with framework tensors."""
    import cutlass.cute as cute

    module = cute.runtime.load_module(object_path, enable_tvm_ffi=True)
    fn: Callable[..., None] = getattr(module, function_name)
    return fn
