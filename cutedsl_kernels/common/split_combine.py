"""Merge split-KV partial attention results (FlashDecoding's second kernel).

For every (batch b, query row s, head h), with P partial results (O_p, LSE_p) over
disjoint key ranges:

    m      = max_p LSE_p
    w_p    = exp(LSE_p - m)     (0 for an empty range, LSE_p = -inf: its O_p is not read)
    O      = sum_p w_p O_p / sum_p w_p            (0 when every range is empty)
    LSE    = m + log(sum_p w_p)                   (-inf when every range is empty)

Shapes: o_partial float32 (P, b, s, h, d), lse_partial float32 (P, b, h, s); out
(b, s, h, d) in the config's dtype, lse float32 (b, h, s). Packed (varlen) problems pass
b = 1 and s = total tokens. Last dims contiguous; any other strides.

SIMT, architecture independent: one warp per (b, s, h) row, each lane owning head_dim / 32
consecutive columns, so every partial row is read by one coalesced warp access. Grid:
(s, ceil(h / WARPS), b).
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from cutedsl_kernels.common.simt import (
    ELEMENT_TYPES,
    LANES,
    WARPS_PER_CTA,
    fake_rows_tensor,
    row_kernel_reasons,
)
from cutedsl_kernels.config import CombineConfig


class SplitCombine:
    """The combine kernel of one `CombineConfig`."""

    def __init__(self, config: CombineConfig):
        self.config = config
        self.dtype = ELEMENT_TYPES[config.dtype]
        self.cols_per_lane = config.head_dim // LANES

    @staticmethod
    def can_implement(config: CombineConfig) -> list[str]:
        """Reasons the combine kernel cannot serve `config` (empty when it can)."""
        return row_kernel_reasons(config.head_dim, config.dtype)

    def fake_arguments(self) -> tuple:
        """Symbolic-shape stand-ins for (o_partial, lse_partial, out, lse)."""
        splits, batch, seqlen, heads = (cute.sym_int() for _ in range(4))
        d = self.config.head_dim

        return (
            fake_rows_tensor(Float32, (splits, batch, seqlen, heads, d)),
            fake_rows_tensor(Float32, (splits, batch, heads, seqlen)),
            fake_rows_tensor(self.dtype, (batch, seqlen, heads, d)),
            fake_rows_tensor(Float32, (batch, heads, seqlen)),
        )

    @cute.jit
    def __call__(
        self,
        mOp: cute.Tensor,
        mLSEp: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        stream,
    ):
        heads = cute.size(mO.shape[2])
        self.kernel(mOp, mLSEp, mO, mLSE).launch(
            grid=[
                cute.size(mO.shape[1]),
                cute.ceil_div(heads, WARPS_PER_CTA),
                cute.size(mO.shape[0]),
            ],
            block=[WARPS_PER_CTA * LANES, 1, 1],
            stream=stream,
        )

    @cute.kernel
    def kernel(self, mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor):
        s, head_block, b = cute.arch.block_idx()
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(tidx // LANES)
        lane = tidx % LANES
        h = head_block * WARPS_PER_CTA + warp
        if h < mO.shape[2]:
            num_splits = mLSEp.shape[0]
            row_max = -Float32.inf
            for p in cutlass.range(num_splits, unroll=1):
                row_max = cute.arch.fmax(row_max, mLSEp[p, b, h, s])
            # Every range empty: weights against 0 are all exp(-inf) = 0.
            safe_max = Float32(0.0) if row_max == -Float32.inf else row_max
            total = Float32(0.0)
            acc = cute.make_rmem_tensor(self.cols_per_lane, Float32)
            acc.fill(0.0)
            col0 = lane * self.cols_per_lane
            for p in cutlass.range(num_splits, unroll=1):
                weight = cute.math.exp2(
                    (mLSEp[p, b, h, s] - safe_max) * Float32(math.log2(math.e)), fastmath=True
                )
                # An empty range's partial O may be unwritten memory: never read it.
                if weight > Float32(0.0):
                    total = total + weight
                    for c in cutlass.range_constexpr(self.cols_per_lane):
                        acc[c] = acc[c] + weight * mOp[p, b, s, h, col0 + c]
            empty = total == Float32(0.0)
            inv_total = Float32(0.0) if empty else Float32(1.0) / total
            for c in cutlass.range_constexpr(self.cols_per_lane):
                mO[b, s, h, col0 + c] = (acc[c] * inv_total).to(self.dtype)
            if lane == 0:
                mLSE[b, h, s] = -Float32.inf if empty else safe_max + cute.math.log(total)
