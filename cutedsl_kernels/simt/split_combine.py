"""Merge split-KV partial attention results (FlashDecoding's second kernel).

For every (batch b, query row s, head h), with P partial results (O_p, LSE_p) over
disjoint key ranges:

    m      = max_p LSE_p
    w_p    = exp(LSE_p - m)     (0 for an empty range, LSE_p = -inf: its O_p, maybe
                                 unwritten memory, is loaded but never used)
    O      = sum_p w_p O_p / sum_p w_p            (0 when every range is empty)
    LSE    = m + log(sum_p w_p)                   (-inf when every range is empty)

With sinks (`CombineConfig.sinks`; the partials leave them out), a row that saw a key
adds its sink logit z to the denominator, without a value:

    LSE'   = log(exp(LSE) + exp(z))     O' = O * exp(LSE - LSE')

and a row that saw none stays 0 / -inf (`sparsek.masks`' rule for every path).

Shapes: o_partial float32 (P, b, s, h, d), lse_partial float32 (P, b, h, s); out
(b, s, h, d) in the config's dtype, lse float32 (b, h, s). Packed (varlen) problems pass
b = 1 and s = total tokens. Last dims contiguous; any other strides.

SIMT, architecture independent (sm_80+: cp.async): one warp per (b, s, h) row, each lane
owning head_dim / 32 consecutive columns, so every partial row is read by one coalesced
warp access. Grid: (s, ceil(h / WARPS), b).

Latency, not bandwidth, is its cost (a decode step merges a few KiB per head). Splits
are merged in groups of `splits_per_load` (16 at d128), online-softmax style (a running
max; the sum and O rescaled when it grows): each group costs one round trip, its LSEs
and partial rows copied to shared memory by cp.async, all in flight at once, then read
back. (Loads into registers would be scheduled next to their first use by ptxas, a
few in flight; a split-by-split loop pays two dependent round trips per split.)
Launched with programmatic dependent launch (PDL) after the split-KV kernel, which lets
it start early: its CTAs are resident before that kernel ends and wait in
`griddepcontrol.wait`, hiding the launch gap between the two kernels.
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync

from cutedsl_kernels.abi import CombineArgs
from cutedsl_kernels.common.dsl_compat import SmemAllocator
from cutedsl_kernels.common.dtypes import dsl_type
from cutedsl_kernels.common.grid import fold_batch, unfold_batch
from cutedsl_kernels.config import CombineConfig
from cutedsl_kernels.simt.rows import (
    LANES,
    WARPS_PER_CTA,
    fake_rows_tensor,
    row_kernel_reasons,
)

# float32 elements per lane of one group's partial rows (a warp's group: 8 KiB of smem).
FLOATS_PER_GROUP = 64
# cp.async moves at most 16 bytes per copy.
VECTOR_FLOATS = 4


class SplitCombine:
    """The combine kernel of one `CombineConfig`."""

    def __init__(self, config: CombineConfig):
        self.config = config
        self.dtype = dsl_type(config.dtype)
        self.cols_per_lane = config.head_dim // LANES
        # Splits copied in at once (one round trip); at most one LSE per lane.
        self.splits_per_load = min(LANES, FLOATS_PER_GROUP // self.cols_per_lane)

    @staticmethod
    def can_implement(config: CombineConfig) -> list[str]:
        """Reasons the combine kernel cannot serve `config` (empty when it can)."""
        return row_kernel_reasons(config.head_dim, config.dtype)

    def fake_arguments(self) -> CombineArgs:
        """Symbolic-shape stand-ins for the runtime arguments (`abi.CombineArgs`)."""
        splits, batch, seqlen, heads = (cute.sym_int() for _ in range(4))
        d = self.config.head_dim

        return CombineArgs(
            # The host allocates it (contiguous): rows of 16-byte-aligned lane pieces.
            o_partial=fake_rows_tensor(Float32, (splits, batch, seqlen, heads, d), align=16),
            lse_partial=fake_rows_tensor(Float32, (splits, batch, heads, seqlen)),
            out=fake_rows_tensor(self.dtype, (batch, seqlen, heads, d)),
            lse=fake_rows_tensor(Float32, (batch, heads, seqlen)),
            sinks=self._fake_sinks(),
        )

    def _fake_sinks(self):
        """(rows, heads) float32 sink logits, any strides, or None without sinks."""
        if not self.config.sinks:
            return None
        shape = (cute.sym_int(), cute.sym_int())
        strides = (cute.sym_int64(), cute.sym_int64())
        return cute.runtime.make_fake_tensor(Float32, shape, stride=strides, assumed_align=4)

    @cute.jit
    def __call__(
        self,
        mOPartial: cute.Tensor,
        mLSEPartial: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        mSinks: cute.Tensor | None,
        stream,
    ):
        heads = cute.size(mO.shape[2])
        grid_x, grid_z = fold_batch(cute.size(mO.shape[1]), cute.size(mO.shape[0]))
        self.kernel(mOPartial, mLSEPartial, mO, mLSE, mSinks).launch(
            grid=[grid_x, cute.ceil_div(heads, WARPS_PER_CTA), grid_z],
            block=[WARPS_PER_CTA * LANES, 1, 1],
            stream=stream,
            use_pdl=True,
        )

    @cute.kernel
    def kernel(
        self,
        mOp: cute.Tensor,
        mLSEp: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        mSinks: cute.Tensor | None,
    ):
        per_load, cols = self.splits_per_load, self.cols_per_lane
        smem = SmemAllocator()
        # Per warp: one group's LSEs and partial O rows, copied in by cp.async.
        sLSE = smem.allocate_tensor(
            Float32, cute.make_layout((per_load, WARPS_PER_CTA)), byte_alignment=16
        )
        sO = smem.allocate_tensor(
            Float32,
            cute.make_layout(
                (cols, LANES, per_load, WARPS_PER_CTA),
                stride=(1, cols, cols * LANES, cols * LANES * per_load),
            ),
            byte_alignment=16,
        )
        # Launched programmatically (PDL) behind the split-KV kernel: nothing it wrote may
        # be read before that grid has finished and flushed.
        cute.arch.griddepcontrol_wait()
        s, head_block, b = cute.arch.block_idx()
        s, b = unfold_batch(s, b, mO.shape[1])  # batches past the grid's z limit
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(tidx // LANES)
        lane = tidx % LANES
        h = head_block * WARPS_PER_CTA + warp
        if h < mO.shape[2]:
            num_splits = mLSEp.shape[0]
            row_max = -Float32.inf
            total = Float32(0.0)
            acc = cute.make_rmem_tensor(cols, Float32)
            acc.fill(0.0)
            for first in cutlass.range(0, num_splits, per_load, unroll=1):
                self.load_group(mOp, mLSEp, b, s, h, lane, first, sO[None, lane, None, warp],
                                sLSE[None, warp])  # fmt: skip
                row_max, total = self.accumulate(
                    first, num_splits, sO[None, lane, None, warp], sLSE[None, warp],
                    row_max, total, acc,
                )  # fmt: skip
                cute.arch.sync_warp()  # every lane is done with the group's smem
            empty = total == Float32(0.0)
            inv_total = Float32(0.0) if empty else Float32(1.0) / total
            col0 = lane * cols
            if const_expr(mSinks is None):
                for c in cutlass.range_constexpr(cols):
                    mO[b, s, h, col0 + c] = (acc[c] * inv_total).to(self.dtype)
                if lane == 0:
                    mLSE[b, h, s] = -Float32.inf if empty else row_max + cute.math.log(total)
            else:
                lse = -Float32.inf if empty else row_max + cute.math.log(total)
                if not empty:
                    lse, inv_total = self.add_sink(mSinks, s, h, lse, inv_total)
                for c in cutlass.range_constexpr(cols):
                    mO[b, s, h, col0 + c] = (acc[c] * inv_total).to(self.dtype)
                if lane == 0:
                    mLSE[b, h, s] = lse

    @cute.jit
    def add_sink(
        self, mSinks: cute.Tensor, s: Int32, h: Int32, lse: Float32, inv_total: Float32
    ) -> tuple[Float32, Float32]:
        """Row (s, h)'s sink logit z joins a row that saw a key: the LSE becomes
        log(exp(lse) + exp(z)) and the output scale exp(lse - LSE') times the old one."""
        log2e = Float32(math.log2(math.e))
        sink = Float32(mSinks[cutlass.min(s, cute.size(mSinks.shape[0]) - 1), h])
        top = cute.arch.fmax(lse, sink)
        keys = cute.math.exp2((lse - top) * log2e, fastmath=True)
        both = keys + cute.math.exp2((sink - top) * log2e, fastmath=True)
        return top + cute.math.log(both), inv_total * keys / both

    @cute.jit
    def load_group(
        self,
        mOp: cute.Tensor,
        mLSEp: cute.Tensor,
        b: Int32,
        s: Int32,
        h: Int32,
        lane: Int32,
        first: Int32,
        sO: cute.Tensor,  # (cols, per_load): this lane's columns
        sLSE: cute.Tensor,  # (per_load,): this warp's
    ):
        """Copy splits first .. first + splits_per_load - 1 (those that exist) into shared
        memory: lane j the LSE of split first + j, every lane its columns of each partial
        row. Returns once the warp sees them all.

        cp.async, not loads into registers: ptxas schedules register loads next to their
        first use (a few in flight), an asynchronous copy is issued where it is written."""
        per_load, cols = self.splits_per_load, self.cols_per_lane
        last = mLSEp.shape[0] - 1
        vec = math.gcd(cols, VECTOR_FLOATS)  # a lane's piece starts cols floats apart
        copy_o = cute.make_copy_atom(cpasync.CopyG2SOp(), Float32, num_bits_per_copy=32 * vec)
        copy_lse = cute.make_copy_atom(cpasync.CopyG2SOp(), Float32, num_bits_per_copy=32)
        # Nested, not `and`: no copy from past the last split.
        if lane < per_load:  # noqa: SIM102
            if first + lane <= last:
                cute.copy(
                    copy_lse,
                    cute.local_tile(mLSEp[first + lane, b, h, None], (1,), (s,)),
                    cute.local_tile(sLSE, (1,), (lane,)),
                )
        for j in cutlass.range_constexpr(per_load):
            if first + j <= last:
                row = mOp[first + j, b, s, h, None]
                for v in cutlass.range_constexpr(cols // vec):
                    cute.copy(
                        copy_o,
                        cute.local_tile(row, (vec,), (lane * (cols // vec) + v,)),
                        cute.local_tile(sO[None, j], (vec,), (v,)),
                    )
        cute.arch.cp_async_commit_group()
        cute.arch.cp_async_wait_group(0)
        cute.arch.sync_warp()  # the LSEs other lanes copied

    @cute.jit
    def accumulate(
        self,
        first: Int32,
        num_splits: Int32,
        sO: cute.Tensor,  # (cols, per_load): this lane's columns
        sLSE: cute.Tensor,  # (per_load,)
        row_max: Float32,
        total: Float32,
        acc: cute.Tensor,
    ) -> tuple[Float32, Float32]:
        """Fold one group of partials into (row_max, total, acc), online-softmax style:
        acc and total are rescaled to the new max, then each split adds w_p O_p, w_p."""
        log2e = Float32(math.log2(math.e))
        # Slots past the last split were not written: they weigh exp(-inf) = 0.
        lses = [
            Float32(cutlass.select_(first + j < num_splits, sLSE[j], -Float32.inf))
            for j in range(self.splits_per_load)
        ]
        new_max = row_max
        for j in cutlass.range_constexpr(self.splits_per_load):
            new_max = cute.arch.fmax(new_max, lses[j])
        # Every range empty so far: weights against 0 are all exp(-inf) = 0.
        safe_max = Float32(0.0) if new_max == -Float32.inf else new_max
        rescale = cute.math.exp2((row_max - safe_max) * log2e, fastmath=True)
        total = total * rescale
        for c in cutlass.range_constexpr(self.cols_per_lane):
            acc[c] = acc[c] * rescale
        for j in cutlass.range_constexpr(self.splits_per_load):
            w = cute.math.exp2((lses[j] - safe_max) * log2e, fastmath=True)
            total = total + w
            # An empty range (or an unwritten slot) weighs 0: its O, maybe NaN, is not used.
            o_used = w > Float32(0.0)
            for c in cutlass.range_constexpr(self.cols_per_lane):
                acc[c] = acc[c] + w * Float32(cutlass.select_(o_used, sO[c, j], Float32(0.0)))
        return new_max, total
