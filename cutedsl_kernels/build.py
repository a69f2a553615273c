"""Compile, export and load the kernels without a GPU (no torch here).

Kernels are compiled against fake tensors with symbolic extents, so one compiled kernel
serves every batch size, sequence length, head count and stride. They are compiled with
TVM-FFI enabled: the loaded function takes framework tensors (anything with DLPack)
directly and launches on the framework's current stream. Every kernel's arguments, by
name and order: `abi.py`.

Which class compiles a forward config is `FORWARD_KERNELS`' answer for its architecture
(one row per architecture: the kernel class, and a DSL-free module whose
`can_implement(config)` the registry asks on the launch path); the SIMT row kernels
(split-KV combine, paged KV-cache update) serve every architecture.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cutedsl_kernels.config import CombineConfig, KernelConfig, KVStoreConfig

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


@dataclass(frozen=True)
class ForwardKernel:
    """One architecture's FMHA forward kernel, by module path (imported on use).

    Attributes:
        arch_prefix: the configs' `arch` starts with it ("sm_90" serves "sm_90a").
        module, cls: where the kernel class lives (imports the DSL).
        limits: a module whose `can_implement(config)` answers without importing the DSL.
    """

    arch_prefix: str
    module: str
    cls: str
    limits: str


# The architecture table: a new architecture is one row (and its folder).
FORWARD_KERNELS: tuple[ForwardKernel, ...] = (
    ForwardKernel(
        "sm_90",
        "cutedsl_kernels.hopper.fmha_fwd",
        "HopperFmhaForward",
        "cutedsl_kernels.hopper.limits",
    ),
)


def forward_kernel(arch: str) -> ForwardKernel | None:
    """The row of `FORWARD_KERNELS` serving `arch`, or None."""
    return next((k for k in FORWARD_KERNELS if arch.startswith(k.arch_prefix)), None)


def can_implement(config: KernelConfig) -> list[str]:
    """Reasons `config` cannot be compiled (empty when it can)."""
    if isinstance(config, CombineConfig):
        from cutedsl_kernels.simt.split_combine import SplitCombine

        return SplitCombine.can_implement(config)
    if isinstance(config, KVStoreConfig):
        from cutedsl_kernels.simt.paged_kv_store import PagedKVStore

        return PagedKVStore.can_implement(config)
    row = forward_kernel(config.arch)
    if row is None:
        arches = ", ".join(f"{k.arch_prefix}*" for k in FORWARD_KERNELS)
        return [f"arch={config.arch!r} has no FMHA forward kernel (supported: {arches})"]
    limits: Any = importlib.import_module(row.limits)  # no DSL import: launch path
    return list(limits.can_implement(config))


def _set_target_arch(arch: str) -> None:
    """Point the DSL at `arch`; without a GPU its default would be sm_100."""
    os.environ["CUTE_DSL_ARCH"] = arch
    from cutlass.cutlass_dsl import CuTeDSL

    CuTeDSL._get_dsl().envar.arch = arch


def compile_kernel(config: KernelConfig) -> Any:
    """Compile `config` for `config.arch` (no GPU needed) and return the compiled function.

    Raises:
        ValueError: `config` is not implementable (message lists the reasons).
    """
    reasons = can_implement(config)
    if reasons:
        raise ValueError(f"cannot compile {config.name}: " + "; ".join(reasons))
    _set_target_arch(config.arch)
    import cutlass.cute as cute

    kernel: Any
    if isinstance(config, CombineConfig):
        from cutedsl_kernels.simt.split_combine import SplitCombine

        kernel = SplitCombine(config)
    elif isinstance(config, KVStoreConfig):
        from cutedsl_kernels.simt.paged_kv_store import PagedKVStore

        kernel = PagedKVStore(config)
    else:
        row = forward_kernel(config.arch)
        assert row is not None  # can_implement refused it otherwise
        kernel = getattr(importlib.import_module(row.module), row.cls)(config)
    args = kernel.fake_arguments()
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(kernel, *args, stream, options=f"--enable-tvm-ffi --gpu-arch {config.arch}")


def export_kernel(compiled: Any, path: str, function_name: str) -> None:
    """Write a compiled kernel (host launcher + cubin) to `path` (any name).

    With a C compiler on PATH (`$CC`, cc, gcc) the object is linked into a shared library
    that `load_kernel` opens with TVM-FFI alone, without importing the DSL (the DSL import
    dominates a warm process start). Otherwise `path` holds the relocatable object, which
    `load_kernel` opens through the DSL.
    """
    obj = f"{path}.o.tmp"
    try:
        compiled.export_to_c(object_file_path=obj, function_name=function_name)
        if not _link_shared(obj, path):
            os.replace(obj, path)
    finally:
        Path(obj).unlink(missing_ok=True)


def _link_shared(obj: str, path: str) -> bool:
    """Link `obj` against the DSL and TVM-FFI runtimes into the shared library `path`."""
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)
    if compiler is None:
        return False
    from cutlass.runtime import find_runtime_libraries

    libs = [lib for lib in find_runtime_libraries(enable_tvm_ffi=True) if Path(lib).exists()]
    rpaths = [f"-Wl,-rpath,{Path(lib).parent}" for lib in libs]
    cmd = [compiler, "-shared", "-o", path, obj, *libs, *rpaths]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return done.returncode == 0


def load_kernel(path: str, function_name: str) -> Callable[..., None]:
    """Load an exported kernel; the result is callable with framework tensors."""
    if _is_shared_library(path):
        import tvm_ffi

        with _with_suffix(path, ".so") as lib:  # TVM-FFI picks its loader by suffix
            try:
                module = tvm_ffi.load_module(lib)
            except Exception:  # runtime libraries moved since linking (a copied cache)
                _preload_dsl_runtime()
                module = tvm_ffi.load_module(lib)
        fn: Callable[..., None] = module[function_name]
        return fn
    import cutlass.cute as cute

    with _with_suffix(path, ".o") as obj:  # so does the DSL
        fn = getattr(cute.runtime.load_module(obj, enable_tvm_ffi=True), function_name)
    return fn


@contextlib.contextmanager
def _with_suffix(path: str, suffix: str) -> Iterator[str]:
    """`path` itself if it ends in `suffix`, else a temporary copy that does."""
    if path.endswith(suffix):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "kernel" + suffix)
        shutil.copyfile(path, copy)
        yield copy


def _is_shared_library(path: str) -> bool:
    with open(path, "rb") as f:
        header = f.read(18)
    # ELF magic, then e_type (little endian) at offset 16: 3 = ET_DYN, 1 = ET_REL.
    return header[:4] == b"\x7fELF" and int.from_bytes(header[16:18], "little") == 3


_preloaded: list[ctypes.CDLL] = []


def _preload_dsl_runtime() -> None:
    """Load the DSL's runtime libraries globally, where the DSL itself would find them."""
    from cutlass.runtime import find_runtime_libraries

    for lib in find_runtime_libraries(enable_tvm_ffi=True):
        if Path(lib).exists():
            _preloaded.append(ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL))
