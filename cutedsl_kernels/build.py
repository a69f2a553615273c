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
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
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


# CUTE_DSL_* settings that leave a compiled kernel unchanged: the DSL's own
# `affects_compile=False` settings (nvidia-cutlass-dsl 4.8; tests/test_cache.py compares this
# set with the DSL's), and ARCH, which `compile_kernel` sets from the config (in the key).
# Every other CUTE_DSL_* variable, known to this list or not, is part of the toolchain identity.
CUTE_DSL_ENV_NOT_IN_KEY = frozenset(
    {
        "ARCH",
        "CACHE_DIR",
        "DISABLE_FILE_CACHING",
        "DUMP_DIR",
        "ENABLE_OPTIMIZATION_WARNINGS",
        "FILTER_STACKTRACE",
        "JIT_CACHE_MAX_ELEMS",
        "JIT_TIME_PROFILING",
        "KEEP",
        "KEEP_CUBIN",
        "KEEP_IR",
        "KEEP_PTX",
        "KEEP_SASS",
        "LOG_AUTOTUNE",
        "LOG_LEVEL",
        "LOG_TO_CONSOLE",
        "LOG_TO_FILE",
        "NO_CACHE",
        "PRINT_AFTER_PREPROCESSOR",
        "PRINT_IR",
        "SHOW_STACKTRACE",
        "WARNINGS_IGNORE",
    }
)
_CUTE_DSL_ENV_PREFIX = "CUTE_DSL_"
_RUNTIME_LIBRARY = "libcute_dsl_runtime.so"
_CUTLASS_IR = re.compile(r"^_cutlass_ir\.cu(\d+)\..*\.so$")
_LOADED_CUTLASS_IR = "cutlass._mlir._mlir_libs._cutlass_ir"


def toolchain_identity() -> dict[str, str]:
    """Everything besides the kernel sources that changes an exported kernel, read without
    importing the DSL (the warm start path never imports it).

    - dsl: nvidia-cutlass-dsl's version when `cutlass` is imported from that distribution,
      else `source-<hash>` of the `cutlass` package's Python files (a checkout on sys.path),
      else "missing".
    - dsl_flavour: the CUDA flavour of the DSL's compiler (cu12, cu13), picked as the DSL
      picks it (`cutlass/_mlir/_mlir_libs/__init__.py`); dsl_compiler: the DSL's own
      fingerprint of that compiler library.
    - tvm_ffi: apache-tvm-ffi's version (or source hash), as for the DSL.
    - cute_dsl_env: every CUTE_DSL_* variable not in `CUTE_DSL_ENV_NOT_IN_KEY`.
    """
    cutlass_dir = _package_dir("cutlass")
    flavour = dsl_flavour()
    return {
        "dsl": _distribution_identity("cutlass", "nvidia-cutlass-dsl"),
        "dsl_flavour": flavour,
        "dsl_compiler": _compiler_fingerprint(cutlass_dir, flavour),
        "tvm_ffi": _distribution_identity("tvm_ffi", "apache-tvm-ffi"),
        "cute_dsl_env": ";".join(
            f"{name}={value}"
            for name, value in sorted(os.environ.items())
            if name.startswith(_CUTE_DSL_ENV_PREFIX)
            and name[len(_CUTE_DSL_ENV_PREFIX) :] not in CUTE_DSL_ENV_NOT_IN_KEY
        ),
    }


def dsl_flavour() -> str:
    """The CUDA flavour ("cu12", "cu13") of the DSL compiler this process uses or would use.

    The DSL loads one `_cutlass_ir.cu<N>` library: the newest installed flavour that the
    CUDA driver supports, the newest installed one without a driver. "none" without a DSL.
    """
    loaded = sys.modules.get(_LOADED_CUTLASS_IR)
    match = _CUTLASS_IR.match(Path(getattr(loaded, "__file__", "") or "").name)
    if match:
        return f"cu{match.group(1)}"
    cutlass_dir = _package_dir("cutlass")
    libs = cutlass_dir / "_mlir" / "_mlir_libs" if cutlass_dir else None
    if libs is None or not libs.is_dir():
        return "none"
    installed = sorted(int(m.group(1)) for p in libs.iterdir() if (m := _CUTLASS_IR.match(p.name)))
    if not installed:
        return "none"
    if len(installed) > 1:
        driver = _cuda_driver_major()
        supported = [v for v in installed if driver is None or v <= driver]
        installed = supported or installed
    return f"cu{installed[-1]}"


def dsl_runtime_library() -> Path | None:
    """The DSL runtime library (`libcute_dsl_runtime.so`) of this environment, found where
    the DSL finds it ($CUTE_DSL_LIBS, else the flavour's folder of the installed package)
    without importing the DSL; None when it is not there."""
    explicit = os.environ.get("CUTE_DSL_LIBS", "")
    for path in explicit.split(os.pathsep):
        if path.endswith(_RUNTIME_LIBRARY) and Path(path).is_file():
            return Path(path)
    root = _package_dir("nvidia_cutlass_dsl")
    if root is None:
        return None
    for folder in (root / dsl_flavour() / "lib", root / "lib"):
        if (folder / _RUNTIME_LIBRARY).is_file():
            return folder / _RUNTIME_LIBRARY
    return None


def _package_dir(module: str) -> Path | None:
    """Folder of the package `module` as an import would find it (without importing it)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return Path(spec.origin).resolve().parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]).resolve() if locations else None


def _distribution_identity(module: str, distribution: str) -> str:
    """`distribution`'s version when `module` is imported from its install, else a hash of
    the module's Python files (a source checkout or an editable install), else "missing"."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import distribution as find_distribution

    package = _package_dir(module)
    if package is None:
        return "missing"
    try:
        dist = find_distribution(distribution)
    except PackageNotFoundError:
        dist = None
    if dist is not None and package.is_relative_to(Path(str(dist.locate_file(""))).resolve()):
        return str(dist.version)
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" not in path.parts:
            digest.update(path.relative_to(package).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return f"source-{digest.hexdigest()[:16]}"


def _compiler_fingerprint(cutlass_dir: Path | None, flavour: str) -> str:
    """The DSL's build-generated fingerprint of its compiler library (a small Python file
    beside it), hashed; "unknown" where there is none."""
    if cutlass_dir is None:
        return "unknown"
    path = cutlass_dir / "_mlir" / "_mlir_libs" / f"_cutlass_ir_version_{flavour}.py"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "unknown"


def _cuda_driver_major() -> int | None:
    """The CUDA major version the driver supports (the DSL asks the same way), or None."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value // 1000


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
    `load_kernel` opens through the DSL. Either way the file names no folder of the
    compiling environment: it loads in any environment with the same toolchain.
    """
    obj = f"{path}.o.tmp"
    try:
        compiled.export_to_c(object_file_path=obj, function_name=function_name)
        if not _link_shared(obj, path):
            os.replace(obj, path)
    finally:
        Path(obj).unlink(missing_ok=True)


def _link_shared(obj: str, path: str) -> bool:
    """Link `obj` against the DSL and TVM-FFI runtimes into the shared library `path`.

    No RUNPATH: the library needs the runtimes by name only (their sonames), and
    `load_kernel` loads the loading environment's runtimes first. A path into this venv
    would tie the entry to it (a moved venv, a cache shared across venvs or containers).
    """
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)
    if compiler is None:
        return False
    from cutlass.runtime import find_runtime_libraries

    libs = [lib for lib in find_runtime_libraries(enable_tvm_ffi=True) if Path(lib).exists()]
    cmd = [compiler, "-shared", "-o", path, obj, *libs]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return done.returncode == 0


def load_kernel(path: str, function_name: str) -> Callable[..., None]:
    """Load an exported kernel; the result is callable with framework tensors.

    Raises:
        RuntimeError: the DSL runtime library is not installed in this environment.
    """
    if _is_shared_library(path):
        import tvm_ffi  # loads this environment's libtvm_ffi.so

        _load_dsl_runtime()
        with _with_suffix(path, ".so") as lib:  # TVM-FFI picks its loader by suffix
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


_runtime: list[ctypes.CDLL] = []


def _load_dsl_runtime() -> None:
    """Load this environment's DSL runtime library once, so that a kernel's need of
    `libcute_dsl_runtime.so` (by soname, no path) resolves to it."""
    if _runtime:
        return
    library = dsl_runtime_library()
    if library is None:  # an install laid out otherwise: ask the DSL (imports it)
        try:
            from cutlass.runtime import find_runtime_libraries
        except ImportError as exc:
            raise RuntimeError(
                f"cannot load sparsek kernels: {_RUNTIME_LIBRARY} not found (no CuTe DSL "
                "installed; install nvidia-cutlass-dsl, or set CUTE_DSL_LIBS to the library)"
            ) from exc
        found = [Path(p) for p in find_runtime_libraries(enable_tvm_ffi=False)]
        library = next((p for p in found if p.name == _RUNTIME_LIBRARY and p.is_file()), None)
        if library is None:
            raise RuntimeError(
                f"cannot load sparsek kernels: the CuTe DSL finds no {_RUNTIME_LIBRARY} "
                "(reinstall nvidia-cutlass-dsl, or set CUTE_DSL_LIBS to the library)"
            )
    _runtime.append(ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL))
