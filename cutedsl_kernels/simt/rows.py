"""Shared pieces of the SIMT row kernels (split-KV combine, paged KV-cache update).

Both map one warp to one row of head_dim elements, each lane owning head_dim / LANES
consecutive columns, WARPS_PER_CTA rows per CTA.
"""

from __future__ import annotations

import cutlass.cute as cute

WARPS_PER_CTA = 4
LANES = 32
# The element types the row kernels move (their outputs and caches).
ROW_DTYPES = ("float16", "bfloat16")


def row_kernel_reasons(head_dim: int, dtype: str) -> list[str]:
    """Why a row kernel cannot serve (head_dim, dtype) (empty when it can)."""
    reasons = []
    if head_dim % LANES or not 32 <= head_dim <= 256:
        reasons.append(f"head_dim={head_dim} must be a multiple of 32 in [32, 256]")
    if dtype not in ROW_DTYPES:
        reasons.append(f"dtype={dtype!r} is not supported ({', '.join(ROW_DTYPES)})")
    return reasons


def fake_rows_tensor(dtype, shape: tuple, align: int | None = None) -> cute.Tensor:
    """A symbolic tensor of `shape`: last dim contiguous, every other stride dynamic.

    `align` (bytes): the base address and every stride are multiples of it, so the kernel
    may read rows in vectors of that many bytes.
    """
    elements = 1 if align is None else align * 8 // dtype.width
    strides = tuple(cute.sym_int64(divisibility=elements) for _ in shape[:-1])
    return cute.runtime.make_fake_tensor(dtype, shape, stride=(*strides, 1), assumed_align=align)
