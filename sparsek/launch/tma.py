"""Which tensors the kernels read in place: TMA's rules for global tensors.

TMA needs the last dim contiguous, every other stride a positive multiple of 16 bytes (8
fp16/bf16 elements, 16 FP8 ones) and a 16-byte-aligned base address. The launch paths check the
strides once per plan and the base pointers per call; a tensor that breaks a rule is
copied (contiguously) first: the values, and so the result, are unchanged.

Stride 0 breaks the rule too. The one broadcast worth serving in place is K and V
expanded over their heads (`k.expand(b, s, num_heads, d)` from one head, a common way to
write MQA): `one_kv_head` reads them as the single KV head they are, which GQA's head
mapping then gives every query head, instead of copying num_heads identical heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsek import memo

STRIDE_MULTIPLE = 8  # elements (16 bytes of fp16/bf16; FP8 needs 16 for the same bytes)
ALIGN_BYTES = 16


def tma_compatible(t: Tensor) -> Tensor:
    """`t` itself when TMA can read it (`tma_readable`), else a contiguous copy (a copy
    also when `t` is contiguous but its base is misaligned)."""
    return t if tma_readable(t) else t.clone(memory_format=torch.contiguous_format)


def one_kv_head(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """k and v (heads on dim -2) broadcast over their heads (stride 0, more than one):
    their first head alone (views, as MQA); otherwise k and v as they are."""
    if k.stride(-2) == 0 and v.stride(-2) == 0 and k.shape[-2] > 1:
        return _first_head(k), _first_head(v)
    return k, v


def _first_head(t: Tensor) -> Tensor:
    # A dim of size 1 is never stepped along: give it a stride TMA accepts (one row).
    size = (*t.shape[:-2], 1, t.shape[-1])
    stride = (*t.stride()[:-2], t.shape[-1] * t.stride(-1), t.stride(-1))
    return t.as_strided(size, stride)


def tma_readable(t: Tensor) -> bool:
    """Whether TMA can read `t` in place (strides and base address)."""
    return t.data_ptr() % ALIGN_BYTES == 0 and tma_strides_ok(t)


def tma_strides_ok(t: Tensor) -> bool:
    """`tma_readable` but for the base address: the last dim contiguous, every other
    stride a positive multiple of 8 elements and of 16 bytes."""
    key = (t.stride(), t.element_size())
    ok = _STRIDES_OK.get(key)
    if ok is None:
        strides, size = key
        ok = strides[-1] == 1 and all(
            s > 0 and s % STRIDE_MULTIPLE == 0 and s * size % ALIGN_BYTES == 0 for s in strides[:-1]
        )
        memo.remember(_STRIDES_OK, key, ok)
    return ok


# tma_strides_ok's answers by stride tuple (the launch path checks 3 tensors per call).
_STRIDES_OK: dict[tuple[tuple[int, ...], int], bool] = {}
memo.register(_STRIDES_OK.clear)
