"""The calling convention of the compiled kernels (`cutedsl_kernels/abi.py`), on CPU.

Compared against: the NamedTuples of `abi.py`, which name every kernel argument in order.
Each `call_*` function takes exactly its NamedTuple's fields, with the same defaults, and
calls the kernel with them positionally in that order; each kernel class's `__call__` (the
compiled signature) takes them in that order, then the stream. No kernel is compiled.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from cutedsl_kernels import abi
from cutedsl_kernels.config import (
    NO_MASK,
    CombineConfig,
    ElementTypes,
    FmhaFwdConfig,
    KVStoreConfig,
)

CALLS: list[tuple[Callable[..., None], Any]] = [
    (abi.call_fmha_fwd, abi.FmhaFwdArgs),
    (abi.call_combine, abi.CombineArgs),
    (abi.call_kv_store, abi.KVStoreArgs),
]
IDS = ["fmha_fwd", "combine", "kv_store"]


@pytest.mark.parametrize(("call", "args"), CALLS, ids=IDS)
def test_call_takes_the_fields_by_name_with_their_defaults(call, args) -> None:
    params = list(inspect.signature(call).parameters.values())
    assert params[0].name == "kernel"
    assert tuple(p.name for p in params[1:]) == args._fields
    defaults = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
    assert defaults == args._field_defaults


@pytest.mark.parametrize(("call", "args"), CALLS, ids=IDS)
def test_call_passes_the_fields_positionally_in_order(call, args) -> None:
    received: list[tuple[object, ...]] = []

    def kernel(*positional: object) -> None:  # a keyword argument would raise TypeError
        received.append(positional)

    values = {name: object() for name in args._fields}  # distinct sentinels
    call(kernel, **values)
    assert received == [tuple(args(**values))]
    if args._field_defaults:  # defaults fill what a launch leaves out
        required = {n: values[n] for n in args._fields if n not in args._field_defaults}
        call(kernel, **required)
        assert received[-1] == tuple(args(**required))


def kernel_parameters(cls: type) -> list[str]:
    """`cls.__call__`'s argument names without self and the trailing stream, normalized:
    the DSL's `mCuSeqlensQ` -> "cuseqlensq", `softmax_scale` -> "softmaxscale"."""
    names = list(inspect.signature(cls.__call__).parameters)
    assert names[0] == "self" and names[-1] == "stream", names
    return [normalized(name) for name in names[1:-1]]


def normalized(name: str) -> str:
    if len(name) > 1 and name[0] == "m" and name[1].isupper():  # a DSL tensor: mQ, mLSE
        name = name[1:]
    name = name.replace("_", "").lower()
    return {"o": "out"}.get(name, name)


def test_kernel_classes_take_the_fields_in_order() -> None:
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutedsl_kernels.hopper.fmha_fwd import HopperFmhaForward
    from cutedsl_kernels.simt.paged_kv_store import PagedKVStore
    from cutedsl_kernels.simt.split_combine import SplitCombine

    for cls, args in (
        (HopperFmhaForward, abi.FmhaFwdArgs),
        (SplitCombine, abi.CombineArgs),
        (PagedKVStore, abi.KVStoreArgs),
    ):
        assert kernel_parameters(cls) == [normalized(f) for f in args._fields], cls.__name__
    # What the build compiles against: the same NamedTuples.
    config = FmhaFwdConfig("sm_90a", 64, ElementTypes.uniform("float16"), NO_MASK)
    fake = HopperFmhaForward(config).fake_arguments()
    assert isinstance(fake, abi.FmhaFwdArgs) and fake.tile_counter is None
    combine = SplitCombine(CombineConfig("sm_90a", 64, "float16")).fake_arguments()
    assert isinstance(combine, abi.CombineArgs)
    store = PagedKVStore(KVStoreConfig("sm_90a", 64, "float16")).fake_arguments()
    assert isinstance(store, abi.KVStoreArgs) and store.k_scale is None
    quantizing = KVStoreConfig("sm_90a", 64, "float16", "float8_e4m3fn")
    store = PagedKVStore(quantizing).fake_arguments()
    assert store.k_scale is not None and store.v_scale is not None
    assert store.k_cache.element_type.width == 8 and store.k.element_type.width == 16
