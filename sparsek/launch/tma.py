"""Which tensors the kernels read in place: TMA's rules for global tensors.

TMA needs the last dim contiguous, every other stride a positive multiple of 16 bytes (8
fp16/bf16 elements) and a 16-byte-aligned base address. The launch paths check the
strides once per plan and the base pointers per call; a tensor that breaks a rule is
copied (contiguously) first: the values, and so the result, are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsek import memo

STRIDE_MULTIPLE = 8  # elements of 16 bits
ALIGN_BYTES = 16


def tma_compatible(t: Tensor) -> Tensor:
    """`t` itself when TMA can read it (`tma_readable`), else a contiguous copy (a copy
    also when `t` is contiguous but its base is misaligned)."""
    return t if tma_readable(t) else t.clone(memory_format=torch.contiguous_format)


def tma_readable(t: Tensor) -> bool:
    """Whether TMA can read `t` in place (strides and base address)."""
    return t.data_ptr() % ALIGN_BYTES == 0 and tma_strides_ok(t)


def tma_strides_ok(t: Tensor) -> bool:
    """`tma_readable` but for the base address: the last dim contiguous, every other
    stride a positive multiple of 8 elements."""
    strides = t.stride()
    ok = _STRIDES_OK.get(strides)
    if ok is None:
        ok = strides[-1] == 1 and all(s > 0 and s % STRIDE_MULTIPLE == 0 for s in strides[:-1])
        memo.remember(_STRIDES_OK, strides, ok)
    return ok


# tma_strides_ok's answers by stride tuple (the launch path checks 3 tensors per call).
_STRIDES_OK: dict[tuple[int, ...], bool] = {}
memo.register(_STRIDES_OK.clear)
