"""Hopper (sm_90a) fused multi-head attention forward.

Computes, for every (batch b, query head h, query row i):

    O[b, i, h, :] = softmax_j(scale * Q[b, i, h, :] . K[b, j, h_kv, :]) @ V[b, :, h_kv, :]
    LSE[b, h, i]  = log(sum_j exp(scale * Q . K))          (natural log, float32)

with h_kv = h // (num_heads // num_kv_heads) (GQA/MQA read K/V in place, no copies) and,
when `is_causal`, only keys j <= i + causal_offset visible. Rows with no visible key give
O = 0 and LSE = -inf.

Features and limits:
- fp16 / bf16 in and out, fp32 accumulation; head_dim a multiple of 16 up to 256 whose
  tiles fit shared memory (the registry enables 64 and 128).
- Any seqlen_q, seqlen_k >= 1; residual tiles are zero-filled by TMA and masked.
- Layout (batch, seqlen, heads, head_dim) with any strides that TMA accepts (last dim
  contiguous, others multiples of 16 bytes); one compiled kernel serves every shape.
- Variable lengths (`FmhaFwdConfig.varlen_q`, `kv_layout`): sequences packed along one
  token axis (a batch of 1 on the host side) and delimited by `cu_seqlens_q/k`; or keys
  in a per-batch cache with `seqused_k` keys used; or in pages of `page_size` rows reached
  through `page_table` (one TMA box of gcd(page_size, tile_n) rows per page piece, so any
  page size that is a multiple of 16 works; the producer loads a key tile's page numbers
  one tile ahead). `kv_evict_first`: K/V loads hint the L2 to evict them first (decode,
  which reads each K/V byte once). Packed queries: one grid axis enumerates
  (query tile, head) of all sequences, heads fastest within groups of heads whose K/V of
  the longest sequence take up to `l2_group_mb` MiB (`seqlen.packed_tile`, `tile_coords`;
  split-KV launches instead cover the longest sequence per batch entry); tiles past a
  sequence's end exit without work. Packed query rows past the last sequence (up to
  total_q: CUDA-graph padding) get O = 0 and LSE = -inf from the kernel itself (except
  with split-KV, whose combine covers them).
  Causal is bottom-right per sequence.
- Split-KV (`split_kv`): batch index b * num_splits + split; each split visits an equal
  share of its query tile's key tiles and writes float32 O and LSE of its share to
  (num_splits, ...) partial tensors, merged by `common/split_combine.py`, whose launch
  (PDL) every CTA allows at its start.

Structure: one CTA per (query tile, head, batch); warp-specialized with TMA + mbarriers.
Persistent (`FmhaFwdConfig.persistent`, dense problems): `num_ctas` CTAs (one per SM)
instead, each taking work units u, u + grid, ... in (unit, head, batch) order. A unit is
a query tile, or (causal) the j-th tile from the last followed by the j-th from the
first: together they have the same number of key tiles for every j, so the static
schedule is balanced. With `dynamic_schedule` (packed queries and keys, whose tiles are
unequal; long causal problems, where equal units leave the last round part-empty), the
producer warp takes each next tile number (longest first within groups of heads whose K/V
fit in L2, see `tile_coords`) from a zeroed global counter (`mTileCounter`, atomic add)
once it has issued this tile's loads, resolves it (sequence bounds, key-tile range) and
passes the result to the consumers through shared memory (`pipeline_sched`,
`WorkTile.words`), so only one warp waits on the metadata loads. Q is double-buffered:
the producer loads the next tile's Q and first K/V while the consumers run this tile's
epilogue, and a Q stage is released once the TMA store of the O staged in it has read it.

    warpgroup 0 (producer, few registers)     warpgroups 1..W (consumers, 64 rows each)
    ----------------------------------------  ------------------------------------------
    warp 0: TMA Q -> sQ        [pipeline_q] -> wait Q
            for n = n_max-1 .. 0:                for n = n_max-1 .. 0:
              TMA K[n] -> sK[s] [pipeline_k] ->    S = Q K^T (wgmma, smem x smem)
                                                   mask (boundary tiles only), online softmax
              TMA V[n] -> sV[s] [pipeline_v] ->    O = O * rescale + P V (wgmma, P in regs)
                                                 O /= l; LSE; O -> sO (reuses sQ) -> TMA store

The consumer loop above is the serial schedule (`intra_wg_overlap=False`). The default
overlaps each tile's softmax with the tensor-core work (see `mainloop.py`): QK^T of tile n
is issued together with PV of tile n+1, and with 2-3 MMA warpgroups they take turns
issuing GEMMs (named barriers), so one warpgroup's softmax hides under another's GEMMs.
CTAs of causal problems take query tiles from the last (most keys) to the first.

Key tiles are visited from the last to the first so that the only tile that needs the
sequence-end mask, and the tiles that cross the causal diagonal, come first.
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup

from cutedsl_kernels.common.dsl_compat import LayoutEnum, OperandMajorMode, SmemAllocator
from cutedsl_kernels.common.fragments import (
    acc_rows_cols,
    permute_modes,
    transpose_smem,
)
from cutedsl_kernels.common.online_softmax import OnlineSoftmax
from cutedsl_kernels.common.seqlen import SeqInfo, packed_tile
from cutedsl_kernels.config import FmhaFwdConfig
from cutedsl_kernels.hopper import epilogue, limits
from cutedsl_kernels.hopper.limits import (
    REGS_BY_MMA_WARPGROUPS,
    ROWS_PER_MMA_WARPGROUP,
    SCHED_STAGES,
    SCHED_WORDS,
    THREADS_PER_WARPGROUP,
)
from cutedsl_kernels.hopper.mainloop import Sm90Mainloop, start_turns

# TMA's L2 cache hint "evict first" (the 64-bit policy CUTLASS's CacheHintSm90 names).
TMA_EVICT_FIRST = 0x12F0000000000000


class HopperFmhaForward:
    """Warp-specialized FMHA forward for sm_90a (see module docstring)."""

    def __init__(self, config: FmhaFwdConfig):
        self.config = config
        self.dtype = {"float16": cutlass.Float16, "bfloat16": cutlass.BFloat16}[config.dtype]
        self.head_dim = config.head_dim
        self.tile_m = config.tile_m
        self.tile_n = config.tile_n
        self.num_stages = config.num_stages
        self.is_causal = config.is_causal
        self.varlen_q = config.varlen_q
        self.kv_layout = config.kv_layout
        self.paged = config.kv_layout == "paged"
        self.split_kv = config.split_kv
        self.persistent = config.persistent
        # Persistent CTAs that take work tiles from a global counter (see `run_tiles`).
        self.dynamic = config.dynamic_schedule
        self.q_stages = limits.q_stages(config)
        # Packed queries: one grid axis over the query tiles of all sequences.
        self.packed_tiles = config.varlen_q and not config.split_kv
        # Rows per TMA box of K/V: a whole tile, or the largest piece that never crosses
        # a page boundary.
        self.kv_box_rows = math.gcd(config.page_size, self.tile_n) if self.paged else self.tile_n
        self.num_mma_warpgroups = config.tile_m // ROWS_PER_MMA_WARPGROUP
        self.num_mma_threads = self.num_mma_warpgroups * THREADS_PER_WARPGROUP
        self.num_threads = self.num_mma_threads + THREADS_PER_WARPGROUP
        self.producer_regs, self.mma_regs = REGS_BY_MMA_WARPGROUPS[
            (self.num_mma_warpgroups, config.ctas_per_sm)
        ]
        # Warpgroup turns pay off only when GEMMs of one overlap the softmax of the other.
        self.pingpong = (
            config.wg_pingpong and config.intra_wg_overlap and self.num_mma_warpgroups >= 2
        )

    # ------------------------------------------------------------------ capability
    smem_bytes = staticmethod(limits.smem_bytes)
    can_implement = staticmethod(limits.can_implement)

    def fake_arguments(self) -> tuple:
        """Symbolic-shape stand-ins for the runtime arguments (see `build`)."""
        batch, seqlen_q, seqlen_k = cute.sym_int(), cute.sym_int(), cute.sym_int()
        heads, kv_heads, splits = cute.sym_int(), cute.sym_int(), cute.sym_int()
        align_elems = 16 // (self.dtype.width // 8)  # TMA: 16-byte strides and base

        def tensor(dtype, shape, align):
            strides = tuple(cute.sym_int64(divisibility=align) for _ in shape[:-1])
            return cute.runtime.make_fake_tensor(
                dtype, shape, stride=(*strides, 1), assumed_align=align * dtype.width // 8
            )

        q = tensor(self.dtype, (batch, seqlen_q, heads, self.head_dim), align_elems)
        k = tensor(self.dtype, (cute.sym_int(), seqlen_k, kv_heads, self.head_dim), align_elems)
        v = tensor(self.dtype, (cute.sym_int(), seqlen_k, kv_heads, self.head_dim), align_elems)
        if self.split_kv:
            out = tensor(Float32, (splits, batch, seqlen_q, heads, self.head_dim), 4)
            lse = tensor(Float32, (splits, batch, heads, seqlen_q), 1)
        else:
            out = tensor(self.dtype, (batch, seqlen_q, heads, self.head_dim), align_elems)
            lse = tensor(Float32, (batch, heads, seqlen_q), 1)
        seqs = cute.sym_int()
        cu_q = tensor(Int32, (seqs,), 1) if self.varlen_q else None
        cu_k = tensor(Int32, (seqs,), 1) if self.kv_layout == "varlen" else None
        has_used_k = self.kv_layout in ("cache", "paged")
        used_k = tensor(Int32, (cute.sym_int(),), 1) if has_used_k else None
        pages = tensor(Int32, (cute.sym_int(), cute.sym_int()), 1) if self.paged else None
        counter = tensor(Int32, (1,), 1) if self.dynamic else None
        scalars = (Float32(1.0), Int32(0), Int32(1), Int32(1), Int32(1))
        return (q, k, v, out, lse, cu_q, cu_k, used_k, pages, counter, *scalars)

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, s_q, h, d); packed: (1, total_q, h, d)
        mK: cute.Tensor,  # (b, s_k, h_kv, d); packed: (1, total_k, ...); paged: (pages, page, ...)
        mV: cute.Tensor,  # like mK
        mO: cute.Tensor,  # like mQ; split: float32 (splits, b, s_q, h, d)
        mLSE: cute.Tensor,  # (b, h, s_q); split: (splits, b, h, s_q)
        mCuSeqlensQ: cute.Tensor | None,  # (b + 1,) int32, varlen_q
        mCuSeqlensK: cute.Tensor | None,  # (b + 1,) int32, kv_layout "varlen"
        mSeqUsedK: cute.Tensor | None,  # (b,) int32, kv_layout "cache" / "paged"
        mPageTable: cute.Tensor | None,  # (b, max_pages) int32, kv_layout "paged"
        mTileCounter: cute.Tensor | None,  # (1,) int32, zeros: dynamic_schedule
        softmax_scale: Float32,
        causal_offset: Int32,
        max_seqlen_q: Int32,
        num_splits: Int32,
        num_ctas: Int32,  # persistent: CTAs to launch (the SM count); ignored otherwise
        stream,
    ):
        # Put the tiled modes first: (s, d, h, b[, split]) and (s_q, h, b[, split]).
        mQ, mK, mV = [permute_modes(t, [1, 3, 2, 0]) for t in (mQ, mK, mV)]
        if const_expr(self.split_kv):
            mO = permute_modes(mO, [2, 4, 3, 1, 0])
            mLSE = permute_modes(mLSE, [3, 2, 1, 0])
        else:
            mO = permute_modes(mO, [1, 3, 2, 0])
            mLSE = permute_modes(mLSE, [2, 1, 0])

        tiled_mma_qk = sm90_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            OperandMajorMode.K,
            OperandMajorMode.K,
            Float32,
            atom_layout_mnk=(self.num_mma_warpgroups, 1, 1),
            tiler_mn=(ROWS_PER_MMA_WARPGROUP, self.tile_n),
        )
        tiled_mma_pv = sm90_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            OperandMajorMode.K,
            OperandMajorMode.MN,
            Float32,
            atom_layout_mnk=(self.num_mma_warpgroups, 1, 1),
            tiler_mn=(ROWS_PER_MMA_WARPGROUP, self.head_dim),
            a_source=warpgroup.OperandSource.RMEM,  # P stays in registers
        )

        sQ_layout = self._smem_layout(self.tile_m, self.q_stages, rows_outer=False)
        sQ_tile = cute.select(sQ_layout, mode=[0, 1])
        # Paged K/V tiles are filled box by box: each box of rows must be contiguous.
        sK_layout = self._smem_layout(self.tile_n, self.num_stages, rows_outer=self.paged)
        sV_layout = self._smem_layout(self.tile_n, self.num_stages, rows_outer=self.paged)
        box = (self.kv_box_rows, self.head_dim)
        sKV_box = self._smem_layout(self.kv_box_rows, None, rows_outer=self.paged)

        tma_load = cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            tma_load, mQ, sQ_tile, (self.tile_m, self.head_dim)
        )
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(tma_load, mK, sKV_box, box, 1)
        tma_atom_V, tma_V = cpasync.make_tiled_tma_atom(tma_load, mV, sKV_box, box, 1)
        tma_atom_O, tma_O = None, None
        if const_expr(not self.split_kv):
            tma_atom_O, tma_O = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileS2GOp(), mO, sQ_tile, (self.tile_m, self.head_dim)
            )
        tx_bytes_q = cute.size_in_bytes(self.dtype, sQ_tile)
        tx_bytes_kv = cute.size_in_bytes(self.dtype, cute.select(sK_layout, mode=[0, 1]))

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2 * self.q_stages]
            mbar_k: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            mbar_v: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sV_layout)], 1024]
            mbar_sched: cute.struct.MemRange[cutlass.Int64, 2 * SCHED_STAGES]
            sched_tiles: cute.struct.MemRange[Int32, WorkTile.NUM_WORDS * SCHED_STAGES]

        scale_log2 = softmax_scale * Float32(math.log2(math.e))
        if const_expr(self.packed_tiles):
            batch = 1  # (see `packed_tile`)
            num_m_blocks = cute.size(mQ.shape[0]) // self.tile_m + cute.size(mCuSeqlensQ)
        elif const_expr(self.varlen_q):
            num_m_blocks = cute.ceil_div(max_seqlen_q, self.tile_m)
            batch = cute.size(mCuSeqlensQ.shape[0]) - 1
        else:
            num_m_blocks = cute.ceil_div(cute.size(mQ.shape[0]), self.tile_m)
            batch = cute.size(mQ.shape[3])
        # Longest key range of a (head, batch) pair (packed: max_seqlen_q stands for it).
        key_rows = max_seqlen_q if const_expr(self.packed_tiles) else cute.size(mK.shape[0])
        l2_group = self.l2_group(cute.size(mQ.shape[2]) * batch, key_rows)
        if const_expr(self.split_kv):
            batch = batch * num_splits
        grid = [num_m_blocks, cute.size(mQ.shape[2]), batch]
        if const_expr(self.packed_tiles):
            # Heads vary fastest: the CTAs dispatched together share a query tile's length
            # (hence work), and the long sequences' tiles are not left for the end.
            grid = [num_m_blocks * cute.size(mQ.shape[2]), 1, 1]
        if const_expr(self.persistent):
            num_units = num_m_blocks * cute.size(mQ.shape[2]) * batch  # tiles
            if const_expr(not self.dynamic):
                num_units = self.units_per_head(num_m_blocks) * cute.size(mQ.shape[2]) * batch
            grid = [cutlass.min(cutlass.max(num_ctas, 1), num_units), 1, 1]
        self.kernel(
            tma_Q,
            tma_K,
            tma_V,
            tma_O,
            mO,
            mLSE,
            mCuSeqlensQ,
            mCuSeqlensK,
            mSeqUsedK,
            mPageTable,
            mTileCounter,
            tma_atom_Q,
            tma_atom_K,
            tma_atom_V,
            tma_atom_O,
            sQ_layout,
            sK_layout,
            sV_layout,
            tiled_mma_qk,
            tiled_mma_pv,
            scale_log2,
            causal_offset,
            num_splits,
            num_m_blocks,
            l2_group,
            tx_bytes_q,
            tx_bytes_kv,
            SharedStorage,
        ).launch(
            grid=grid,
            block=[self.num_threads, 1, 1],
            stream=stream,
            min_blocks_per_mp=self.config.ctas_per_sm,
            # All of the SM's memory as shared memory when CTAs share it (given, the
            # DSL does not ask the device for it: kernels compile without a GPU).
            preferred_smem_carveout=100 if self.config.ctas_per_sm > 1 else None,
        )

    def _smem_layout(self, rows: int, stages, rows_outer: bool):
        """Row-major (head_dim contiguous) swizzled tile, optionally with a stage mode.

        Swizzle atoms are stacked down the rows first (`rows_outer=False`) or across
        head_dim first (`rows_outer=True`, so that any 8-row slab is contiguous).
        """
        atom = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, self.dtype, self.head_dim),
            self.dtype,
        )
        order = (1, 0) if rows_outer else (0, 1)
        if stages is None:
            return cute.tile_to_shape(atom, (rows, self.head_dim), order=order)
        return cute.tile_to_shape(atom, (rows, self.head_dim, stages), order=(*order, 2))

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,  # TMA coordinate tensors, (s, d, h, b)
        mK: cute.Tensor,
        mV: cute.Tensor,
        tma_O: cute.Tensor | None,  # TMA coordinates of O (not split_kv)
        mO: cute.Tensor,  # O itself, (s, d, h, b[, split])
        mLSE: cute.Tensor,  # (s_q, h, b[, split])
        mCuSeqlensQ: cute.Tensor | None,
        mCuSeqlensK: cute.Tensor | None,
        mSeqUsedK: cute.Tensor | None,
        mPageTable: cute.Tensor | None,
        mTileCounter: cute.Tensor | None,
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom,
        tma_atom_V: cute.CopyAtom,
        tma_atom_O: cute.CopyAtom | None,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        scale_log2: Float32,
        causal_offset: Int32,
        num_splits: Int32,
        num_m_blocks: Int32,
        l2_group: Int32,
        tx_bytes_q: cutlass.Constexpr[int],
        tx_bytes_kv: cutlass.Constexpr[int],
        SharedStorage: cutlass.Constexpr,
    ):
        if const_expr(self.split_kv):
            # The combine kernel (launched with PDL) may be scheduled now: its CTAs are
            # small and wait in `griddepcontrol.wait` until this grid has finished.
            cute.arch.griddepcontrol_launch_dependents()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            for atom in (tma_atom_Q, tma_atom_K, tma_atom_V):
                cpasync.prefetch_descriptor(atom)
            if const_expr(tma_atom_O is not None):
                cpasync.prefetch_descriptor(tma_atom_O)

        smem = SmemAllocator()
        storage = smem.allocate(SharedStorage)
        tma_warp = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1)
        # TMA pipelines count one release per consumer warp; a persistent CTA's Q stage
        # is released once, by the warp that stored O from it (see `mma`).
        mma_warps = pipeline.CooperativeGroup(
            pipeline.Agent.Thread, self.num_mma_threads // cute.arch.WARP_SIZE
        )
        q_releasers = mma_warps
        if const_expr(self.persistent):
            q_releasers = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1)
        pipeline_q = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_q.data_ptr(),
            num_stages=self.q_stages,
            producer_group=tma_warp,
            consumer_group=q_releasers,
            tx_count=tx_bytes_q,
            defer_sync=True,
        )
        pipeline_k = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_k.data_ptr(),
            num_stages=self.num_stages,
            producer_group=tma_warp,
            consumer_group=mma_warps,
            tx_count=tx_bytes_kv,
            defer_sync=True,
        )
        pipeline_v = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_v.data_ptr(),
            num_stages=self.num_stages,
            producer_group=tma_warp,
            consumer_group=mma_warps,
            tx_count=tx_bytes_kv,
            defer_sync=True,
        )
        pipeline_sched = None
        if const_expr(self.dynamic):
            # Work tile numbers, producer warp -> consumers (see `run_tiles`).
            pipeline_sched = pipeline.PipelineAsync.create(
                barrier_storage=storage.mbar_sched.data_ptr(),
                num_stages=SCHED_STAGES,
                producer_group=tma_warp,
                consumer_group=pipeline.CooperativeGroup(
                    pipeline.Agent.Thread, self.num_mma_threads
                ),
                defer_sync=True,
            )
        pipeline.pipeline_init_arrive()

        # O is staged through the Q stage of its own tile (see `store_o_tma`).
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        tensors = (mQ, mK, mV, tma_O, mO, mLSE, mCuSeqlensQ, mCuSeqlensK, mSeqUsedK, mPageTable)
        smem_tiles = (sQ, sK, sV)
        pipelines = (pipeline_q, pipeline_k, pipeline_v)
        sched_tiles = storage.sched_tiles.get_tensor(
            cute.make_layout((WorkTile.NUM_WORDS, SCHED_STAGES))
        )
        tiles = (num_m_blocks, l2_group, causal_offset, num_splits, pipeline_sched, sched_tiles,
                 mTileCounter)  # fmt: skip
        pipeline.pipeline_init_wait()

        if warp_idx < THREADS_PER_WARPGROUP // cute.arch.WARP_SIZE:
            # ---------------------------------------------------------- producer
            cute.arch.setmaxregister_decrease(self.producer_regs)
            if warp_idx == 0:
                atoms = (tma_atom_Q, tma_atom_K, tma_atom_V)
                self.run_tiles(True, (tensors, smem_tiles, atoms, pipelines), tiles)
        else:
            # ---------------------------------------------------------- consumers
            cute.arch.setmaxregister_increase(self.mma_regs)
            tidx, _, _ = cute.arch.thread_idx()
            tidx = tidx - THREADS_PER_WARPGROUP
            wg_idx = cute.arch.make_warp_uniform(tidx // THREADS_PER_WARPGROUP)
            start_turns(self.pingpong, wg_idx)
            mmas = (tiled_mma_qk, tiled_mma_pv)
            consumer_args = (tensors, smem_tiles, pipelines, mmas, tma_atom_O, tidx, wg_idx)
            self.run_tiles(False, (*consumer_args, scale_log2), tiles)

    @cute.jit
    def run_tiles(self, producer: cutlass.Constexpr[bool], role_args: tuple, tiles: tuple):
        """This CTA's work tiles, each through `load` (producer warp) or `mma` (consumer
        warpgroups) with `role_args`: its grid block's, or (persistent) those of work
        units block, block + grid, ... The pipeline states carry over from tile to tile."""
        num_m_blocks, l2_group, causal_offset, num_splits, pipeline_sched, sched_tiles, counter = (
            tiles
        )
        tensors = role_args[0]
        role, step = pipeline.PipelineUserType.Consumer, self.mma
        if const_expr(producer):
            role, step = pipeline.PipelineUserType.Producer, self.load
        q_state = pipeline.make_pipeline_state(role, self.q_stages)
        kv_state = pipeline.make_pipeline_state(role, self.num_stages)
        block_m, head_idx, batch_split = cute.arch.block_idx()
        if const_expr(self.dynamic):
            # Tiles in `tile_coords` order, handed out by a global counter: the producer
            # warp resolves each tile (its sequence bounds are global loads), passes it to
            # the consumers and, once it has issued the tile's loads, takes the next number.
            # Packed slots that no sequence owns (up to one per sequence, see
            # `seqlen.packed_tile`) have no rows: the producer skips them.
            num_heads = cute.size(tensors[0].shape[2])
            num_tiles = num_m_blocks * num_heads * cute.size(tensors[0].shape[3])
            sched_state = pipeline.make_pipeline_state(role, SCHED_STAGES)
            if const_expr(producer):
                tile = block_m
                while tile < num_tiles:
                    block, head_idx, batch_idx = self.tile_coords(
                        tile, num_m_blocks, num_heads, l2_group, tensors
                    )
                    work = self.work_tile(
                        block, head_idx, batch_idx, num_m_blocks, tensors, causal_offset, num_splits
                    )
                    if work.m_block * self.tile_m < work.info.seqlen_q:
                        sched_state = self.give_tile(
                            pipeline_sched, sched_tiles, sched_state, work.words(tile)
                        )
                        q_state, kv_state = step(work, *role_args, q_state, kv_state)
                    tile = next_tile(counter)
                self.give_tile(pipeline_sched, sched_tiles, sched_state, (tile,))  # the end
            else:
                pipeline_sched.consumer_wait(sched_state)
                tile = sched_tiles[0, sched_state.index]
                while tile < num_tiles:
                    work = WorkTile.from_words(sched_tiles[None, sched_state.index])
                    sched_state = self.release_tile(pipeline_sched, sched_state)
                    q_state, kv_state = step(work, *role_args, q_state, kv_state)
                    pipeline_sched.consumer_wait(sched_state)
                    tile = sched_tiles[0, sched_state.index]
        elif const_expr(self.persistent):
            # Work units, (head, batch) by (head, batch): a query tile, or (causal) the
            # pair of the j-th tile from the last and the j-th from the first, whose key
            # tiles add up to the same count for every j (equal units, so a static
            # round robin leaves no SM idle). Units of one (head, batch) are consecutive,
            # so CTAs that run at the same time share its K/V in L2.
            num_heads = cute.size(tensors[0].shape[2])
            units_per_head = self.units_per_head(num_m_blocks)
            num_units = units_per_head * num_heads * cute.size(tensors[0].shape[3])
            tiles_per_unit = 2 if const_expr(self.is_causal) else 1
            # Slot = unit * tiles_per_unit + half: this CTA's slots are those of its units.
            slot = block_m * tiles_per_unit
            while slot < num_units * tiles_per_unit:
                unit = slot // tiles_per_unit
                half = slot - unit * tiles_per_unit
                head_batch = unit // units_per_head
                j = unit - head_batch * units_per_head
                batch_idx = head_batch // num_heads
                head_idx = head_batch - batch_idx * num_heads
                # `work_tile` counts causal grid blocks from the last query tile.
                block = j if half == 0 else num_m_blocks - 1 - j
                work = self.work_tile(
                    block, head_idx, batch_idx, num_m_blocks, tensors, causal_offset, num_splits
                )
                if const_expr(self.is_causal):
                    if half == 0 or block != j:  # the middle tile of an odd count is alone
                        q_state, kv_state = step(work, *role_args, q_state, kv_state)
                else:
                    q_state, kv_state = step(work, *role_args, q_state, kv_state)
                slot += 1
                if half == tiles_per_unit - 1:
                    slot += (cute.arch.grid_dim()[0] - 1) * tiles_per_unit
        else:
            if const_expr(self.packed_tiles):  # grid x: (query tile slot, head), see __call__
                num_heads = cute.size(tensors[0].shape[2])
                block_m, head_idx, _ = self.tile_coords(
                    block_m, num_m_blocks, num_heads, l2_group, tensors
                )
            work = self.work_tile(
                block_m, head_idx, batch_split, num_m_blocks, tensors, causal_offset, num_splits
            )
            step(work, *role_args, q_state, kv_state)

    @cute.jit
    def give_tile(
        self,
        pipeline_sched: pipeline.PipelineAsync,
        sched_tiles: cute.Tensor,
        state: pipeline.PipelineState,
        words: tuple,
    ) -> pipeline.PipelineState:
        """Producer warp: pass a work tile (`WorkTile.words`, or the end: a tile number
        past the last) to the consumers."""
        pipeline_sched.producer_acquire(state)
        if cute.arch.lane_idx() == 0:
            for i in cutlass.range_constexpr(len(words)):
                sched_tiles[i, state.index] = words[i]
            pipeline_sched.producer_commit(state)
        state.advance()
        return state

    @cute.jit
    def release_tile(
        self, pipeline_sched: pipeline.PipelineAsync, state: pipeline.PipelineState
    ) -> pipeline.PipelineState:
        """Consumers: done reading the work tile at `state`; the state of the next."""
        pipeline_sched.consumer_release(state)
        state.advance()
        return state

    @cute.jit
    def tile_coords(
        self, tile: Int32, num_m_blocks: Int32, num_heads: Int32, group: Int32, tensors: tuple
    ) -> tuple[Int32, Int32, Int32]:
        """Grid block (block_m, head, batch) of dynamic work tile number `tile` (packed:
        of grid block `tile`, whose block_m is a packed slot and batch 0).

        (head, batch) pairs in groups of `group` (`l2_group`), group by group; within a
        group, query tiles from the first grid block (causal: the most keys) to the last,
        each across the group's heads. So the longest tiles of a group start first and its
        shortest fill the end, while the tiles in flight read the K/V of a few heads only
        (from L2).
        """
        num_pairs = num_heads * cute.size(tensors[0].shape[3])
        first = tile // (group * num_m_blocks) * group  # first (head, batch) of the group
        in_group = cutlass.min(group, num_pairs - first)
        local = tile - first * num_m_blocks
        block = local // in_group
        pair = first + local - block * in_group
        batch_idx = pair // num_heads
        return block, pair - batch_idx * num_heads, batch_idx

    def l2_group(self, num_pairs: Int32, key_rows: Int32) -> Int32:
        """(head, batch) pairs per group of the dynamic tile order (`tile_coords`): as many
        as take up to `config.l2_group_mb` MiB of K/V with `key_rows` keys each (at least
        one); every pair when l2_group_mb is 0."""
        if const_expr(self.config.l2_group_mb == 0):
            return num_pairs
        kv_rows = (self.config.l2_group_mb << 20) // (2 * self.head_dim * self.dtype.width // 8)
        return cutlass.max(Int32(kv_rows) // cutlass.max(key_rows, 1), 1)

    def units_per_head(self, num_m_blocks: Int32) -> Int32:
        """Work units of one (head, batch) in a persistent launch (see `run_tiles`)."""
        if const_expr(self.is_causal):
            return (num_m_blocks + 1) // 2
        return num_m_blocks

    @cute.jit
    def work_tile(
        self,
        block_m: Int32,
        head_idx: Int32,
        batch_split: Int32,
        num_m_blocks: Int32,
        tensors: tuple,
        causal_offset: Int32,
        num_splits: Int32,
    ) -> WorkTile:
        """Query tile, head, sequence (and split) of grid block (block_m, head, batch_split):
        causal tiles with more keys first (they take longest)."""
        mQ, mK, _, _, _, _, mCuSeqlensQ, mCuSeqlensK, mSeqUsedK, _ = tensors
        m_block = block_m
        batch_idx, split_idx = batch_split, Int32(0)
        if const_expr(self.packed_tiles):
            batch_idx, m_block = packed_tile(
                mCuSeqlensQ, mQ.shape[0], block_m, self.tile_m, self.is_causal
            )
        elif const_expr(self.is_causal):
            m_block = num_m_blocks - 1 - block_m
        if const_expr(self.split_kv):
            batch_idx = batch_split // num_splits
            split_idx = batch_split - batch_idx * num_splits
        if const_expr(self.packed_tiles):
            info = SeqInfo.read_packed(
                batch_idx, mQ.shape[0], mK.shape[0], mCuSeqlensQ, mCuSeqlensK, mSeqUsedK
            )
        else:
            info = SeqInfo.read(
                batch_idx,
                mQ.shape[0],
                mK.shape[0],
                causal_offset,
                mCuSeqlensQ,
                mCuSeqlensK,
                mSeqUsedK,
            )
        n_min, n_max = info.n_block_range(
            m_block,
            self.tile_m,
            self.tile_n,
            self.is_causal,
            split_idx,
            num_splits,
            self.split_kv,
        )
        return WorkTile(m_block, head_idx, batch_idx, split_idx, info, n_min, n_max)

    @cute.jit
    def load(
        self,
        work: WorkTile,
        tensors: tuple,
        smem_tiles: tuple,
        atoms: tuple,
        pipelines: tuple,
        q_state: pipeline.PipelineState,
        kv_state: pipeline.PipelineState,
    ) -> tuple[pipeline.PipelineState, pipeline.PipelineState]:
        """Producer warp: every TMA load of one work tile (Q, even for a tile without keys,
        then K/V from the last key tile down); returns the pipeline states past them."""
        mQ, mK, mV, _, _, _, _, _, _, mPageTable = tensors
        sQ, sK, sV = smem_tiles
        tma_atom_Q, tma_atom_K, tma_atom_V = atoms
        pipeline_q, pipeline_k, pipeline_v = pipelines
        info, m_block, n_min, n_max = work.info, work.m_block, work.n_min, work.n_max
        # Packed queries live in one batch entry, offset to their sequence's first token.
        q_batch = 0 if const_expr(self.varlen_q) else work.batch_idx
        head_kv = work.head_idx // (mQ.shape[2] // mK.shape[2])
        cta = cute.make_layout(1)
        mQ_seq = cute.domain_offset((info.offset_q, 0), mQ[None, None, work.head_idx, q_batch])
        gQ = cute.local_tile(mQ_seq, (self.tile_m, self.head_dim), (m_block, 0))
        # ((ATOM, REST), STAGE)
        tQsQ, tQgQ = cpasync.tma_partition(
            tma_atom_Q, 0, cta, cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2)
        )
        pipeline_q.producer_acquire(q_state)
        cute.copy(
            tma_atom_Q,
            tQgQ,
            tQsQ[None, q_state.index],
            tma_bar_ptr=pipeline_q.producer_get_barrier(q_state),
        )
        q_state.advance()
        if const_expr(self.paged):
            mK_src, mV_src = mK[None, None, head_kv, None], mV[None, None, head_kv, None]
            page_row = mPageTable[work.batch_idx, None]
            boxes = self.tile_n // self.kv_box_rows
            page_size = self.config.page_size
            last_page = cutlass.max(cute.ceil_div(info.seqlen_k, page_size) - 1, 0)
            # Each key tile's page numbers are loaded one tile ahead, before the waits
            # for the previous tile's K/V stages, which hide their latency.
            box_page = cute.make_rmem_tensor(boxes, Int32)
            box_in_page = cute.make_rmem_tensor(boxes, Int32)
            next_page = cute.make_rmem_tensor(boxes, Int32)
            next_in_page = cute.make_rmem_tensor(boxes, Int32)
            if n_max > n_min:
                self.page_boxes(page_row, n_max - 1, last_page, next_page, next_in_page)
            for i in cutlass.range(n_max - n_min, unroll=1):
                n_block = n_max - 1 - i
                for j in cutlass.range_constexpr(boxes):
                    box_page[j] = next_page[j]
                    box_in_page[j] = next_in_page[j]
                next_block = cutlass.max(n_block - 1, n_min)
                self.page_boxes(page_row, next_block, last_page, next_page, next_in_page)
                for atom, src, dst, pipe in (
                    (tma_atom_K, mK_src, sK, pipeline_k),
                    (tma_atom_V, mV_src, sV, pipeline_v),
                ):
                    pipe.producer_acquire(kv_state)
                    for j in cutlass.range_constexpr(boxes):
                        self.copy_kv_box(
                            atom,
                            cute.local_tile(
                                src[None, None, box_page[j]],
                                (self.kv_box_rows, self.head_dim),
                                (box_in_page[j], 0),
                            ),
                            cute.local_tile(
                                dst[None, None, kv_state.index],
                                (self.kv_box_rows, self.head_dim),
                                (j, 0),
                            ),
                            pipe.producer_get_barrier(kv_state),
                        )
                kv_state.advance()
        else:
            k_batch = 0 if const_expr(self.kv_layout == "varlen") else work.batch_idx
            mK_src = cute.domain_offset((info.offset_k, 0), mK[None, None, head_kv, k_batch])
            mV_src = cute.domain_offset((info.offset_k, 0), mV[None, None, head_kv, k_batch])
            # (tile_n, d, n_tiles)
            gK = cute.local_tile(mK_src, (self.tile_n, self.head_dim), (None, 0))
            gV = cute.local_tile(mV_src, (self.tile_n, self.head_dim), (None, 0))
            # ((ATOM, REST), STAGE) and ((ATOM, REST), N_TILES)
            tKsK, tKgK = cpasync.tma_partition(
                tma_atom_K, 0, cta, cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2)
            )
            tVsV, tVgV = cpasync.tma_partition(
                tma_atom_V, 0, cta, cute.group_modes(sV, 0, 2), cute.group_modes(gV, 0, 2)
            )
            for i in cutlass.range(n_max - n_min, unroll=1):
                n_block = n_max - 1 - i
                for atom, src, dst, pipe in (
                    (tma_atom_K, tKgK, tKsK, pipeline_k),
                    (tma_atom_V, tVgV, tVsV, pipeline_v),
                ):
                    pipe.producer_acquire(kv_state)
                    cute.copy(
                        atom,
                        src[None, n_block],
                        dst[None, kv_state.index],
                        tma_bar_ptr=pipe.producer_get_barrier(kv_state),
                        cache_policy=self.kv_cache_policy(),
                    )
                kv_state.advance()
        return q_state, kv_state

    @cute.jit
    def page_boxes(
        self,
        page_row: cute.Tensor,
        n_block: Int32,
        last_page: Int32,
        box_page: cute.Tensor,
        box_in_page: cute.Tensor,
    ):
        """Into `box_page` / `box_in_page`: the page of each (kv_box_rows, d) box of key
        tile `n_block`, and the box's index inside that page. Rows past the sequence end
        read its last page (masked anyway)."""
        page_size = self.config.page_size
        for j in cutlass.range_constexpr(self.tile_n // self.kv_box_rows):
            row = n_block * self.tile_n + j * self.kv_box_rows
            box_page[j] = page_row[cutlass.min(row // page_size, last_page)]
            box_in_page[j] = (row % page_size) // self.kv_box_rows

    @cute.jit
    def copy_kv_box(self, atom: cute.CopyAtom, gBox: cute.Tensor, sBox: cute.Tensor, bar):
        """One TMA load of a (kv_box_rows, d) box into its slab of a K/V stage."""
        tsBox, tgBox = cpasync.tma_partition(
            atom, 0, cute.make_layout(1), cute.group_modes(sBox, 0, 2), cute.group_modes(gBox, 0, 2)
        )
        cute.copy(atom, tgBox, tsBox, tma_bar_ptr=bar, cache_policy=self.kv_cache_policy())

    def kv_cache_policy(self) -> cutlass.Int64 | None:
        """The L2 hint of the K/V loads: evict-first (`kv_evict_first`), else none."""
        return cutlass.Int64(TMA_EVICT_FIRST) if const_expr(self.config.kv_evict_first) else None

    @cute.jit
    def mma(
        self,
        work: WorkTile,
        tensors: tuple,
        smem_tiles: tuple,
        pipelines: tuple,
        mmas: tuple,
        tma_atom_O: cute.CopyAtom | None,
        tidx: Int32,
        wg_idx: Int32,
        scale_log2: Float32,
        q_state: pipeline.PipelineState,
        kv_state: pipeline.PipelineState,
    ) -> tuple[pipeline.PipelineState, pipeline.PipelineState]:
        """Consumers, one work tile: S = QK^T, online softmax, O += PV, then the epilogue;
        returns the pipeline states past this tile."""
        _, _, _, tma_O, mO, mLSE, _, _, _, _ = tensors
        sQ, sK, sV = smem_tiles
        pipeline_q, pipeline_k, pipeline_v = pipelines
        tiled_mma_qk, tiled_mma_pv = mmas
        info, m_block, n_min, n_max = work.info, work.m_block, work.n_min, work.n_max
        q_batch = 0 if const_expr(self.varlen_q) else work.batch_idx
        wg_threads = cute.make_layout(self.num_mma_warpgroups, stride=THREADS_PER_WARPGROUP)
        thr_mma_qk = tiled_mma_qk.get_slice(tidx)
        wg_mma_qk = tiled_mma_qk.get_slice(wg_threads(wg_idx))
        wg_mma_pv = tiled_mma_pv.get_slice(wg_threads(wg_idx))
        # (MMA, MMA_M, MMA_K, Q_STAGE)
        tSrQ = wg_mma_qk.make_fragment_A(wg_mma_qk.partition_A(sQ))
        # (MMA, MMA_N, MMA_K, STAGE)
        tSrK = wg_mma_qk.make_fragment_B(wg_mma_qk.partition_B(sK))
        # (MMA, MMA_N, MMA_K, STAGE): V^T as the (d, n) B operand
        tOrVt = wg_mma_pv.make_fragment_B(wg_mma_pv.partition_B(transpose_smem(sV)))
        # (MMA, MMA_M, MMA_K): P as the register A operand
        tOrP = wg_mma_pv.make_fragment_A(wg_mma_pv.partition_shape_A((self.tile_m, self.tile_n)))
        # (MMA, MMA_M, MMA_N)
        acc_O = cute.make_rmem_tensor(
            tiled_mma_pv.partition_shape_C((self.tile_m, self.head_dim)), Float32
        )
        acc_O.fill(0.0)
        cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
        tScS = thr_mma_qk.partition_C(cS)
        t0ScS = tiled_mma_qk.get_slice(0).partition_C(cS)
        softmax = OnlineSoftmax(scale_log2, num_rows=cute.size(acc_rows_cols(tScS), mode=[0]))
        softmax.reset()

        pipeline_q.consumer_wait(q_state)  # loaded for every tile, even one without keys
        if n_max > n_min:
            mainloop = Sm90Mainloop(
                tile_m=self.tile_m,
                tile_n=self.tile_n,
                dtype=self.dtype,
                is_causal=self.is_causal,
                pingpong=self.pingpong,
                num_mma_warpgroups=self.num_mma_warpgroups,
                tiled_mma_qk=tiled_mma_qk,
                tiled_mma_pv=tiled_mma_pv,
                tSrQ=tSrQ[None, None, None, q_state.index],
                tSrK=tSrK,
                tOrVt=tOrVt,
                tOrP=tOrP,
                acc_O=acc_O,
                softmax=softmax,
                pipeline_k=pipeline_k,
                pipeline_v=pipeline_v,
                tScS=tScS,
                t0ScS=t0ScS,
                m_block=m_block,
                seqlen_k=info.seqlen_k,
                causal_offset=info.causal_offset,
                wg_idx=wg_idx,
                sV_tail=sV if const_expr(self.kv_layout in ("cache", "paged")) else None,
            )
            kv_state = mainloop.run(kv_state, n_min, n_max, self.config.intra_wg_overlap)

        inv_sum = softmax.finalize()
        OnlineSoftmax.rescale(acc_O, inv_sum)
        row0 = m_block * self.tile_m
        if const_expr(self.split_kv):
            mO_seq = mO[None, None, work.head_idx, q_batch, work.split_idx]
            mLSE_seq = mLSE[None, work.head_idx, q_batch, work.split_idx]
        else:
            mO_seq = mO[None, None, work.head_idx, q_batch]
            mLSE_seq = mLSE[None, work.head_idx, q_batch]
        mO_seq = cute.domain_offset((info.offset_q, 0), mO_seq)
        mLSE_seq = cute.domain_offset((info.offset_q,), mLSE_seq)
        epilogue.store_lse(softmax.row_sum, tScS, mLSE_seq, row0, info.seqlen_q)
        tile = (self.tile_m, self.head_dim)
        sO = sQ[None, None, q_state.index]
        if const_expr(self.split_kv):
            gO = cute.local_tile(mO_seq, tile, (m_block, 0))
            epilogue.store_o_direct(acc_O, tiled_mma_pv, tidx, gO, info.seqlen_q - row0)
        else:
            tma_O_seq = cute.domain_offset(
                (info.offset_q, 0), tma_O[None, None, work.head_idx, q_batch]
            )
            if const_expr(self.varlen_q):
                # TMA would write past this sequence's end into the next one's rows.
                if row0 + self.tile_m <= info.seqlen_q:
                    self.store_o_tma(acc_O, tiled_mma_pv, tidx, sO, tma_O_seq, m_block, tma_atom_O)
                else:
                    gO = cute.local_tile(mO_seq, tile, (m_block, 0))
                    epilogue.store_o_direct(acc_O, tiled_mma_pv, tidx, gO, info.seqlen_q - row0)
            else:
                self.store_o_tma(acc_O, tiled_mma_pv, tidx, sO, tma_O_seq, m_block, tma_atom_O)
        # Nested on purpose: a const_expr must not share an `if` with a runtime test.
        if const_expr(self.persistent):  # noqa: SIM102
            # The storing warp has waited for the TMA store to read sO: Q's stage is free.
            if tidx < cute.arch.WARP_SIZE:
                cute.arch.sync_warp()
                pipeline_q.consumer_release(q_state)
        q_state.advance()
        return q_state, kv_state

    @cute.jit
    def store_o_tma(
        self,
        acc_O: cute.Tensor,
        tiled_mma_pv: cute.TiledMma,
        tidx: Int32,
        sO: cute.Tensor,
        tma_O: cute.Tensor,
        m_block: Int32,
        tma_atom_O: cute.CopyAtom,
    ):
        epilogue.store_o_tma(
            acc_O,
            self.dtype,
            tiled_mma_pv,
            tidx,
            self.num_mma_threads,
            sO,
            cute.local_tile(tma_O, (self.tile_m, self.head_dim), (m_block, 0)),
            tma_atom_O,
        )


@cute.jit
def next_tile(counter: cute.Tensor) -> Int32:
    """The next work tile number from the zero-initialized global `counter` (one warp):
    every CTA starts with its own block index, so numbers start at the grid size."""
    ticket = Int32(0)
    if cute.arch.lane_idx() == 0:
        ticket = cute.arch.atomic_add(counter.iterator, Int32(1))
    return cute.arch.shuffle_sync(ticket, 0) + cute.arch.grid_dim()[0]


class WorkTile:
    """One CTA work tile: query tile `m_block` of (`head_idx`, `batch_idx`[, `split_idx`]),
    its sequence bounds and the key tiles [n_min, n_max) it visits."""

    # `words`: tile number, m_block, head, batch, split, the five SeqInfo bounds, n_min, n_max.
    NUM_WORDS = SCHED_WORDS

    def __init__(
        self,
        m_block: Int32,
        head_idx: Int32,
        batch_idx: Int32,
        split_idx: Int32,
        info: SeqInfo,
        n_min: Int32,
        n_max: Int32,
    ):
        self.m_block, self.head_idx, self.batch_idx = m_block, head_idx, batch_idx
        self.split_idx, self.info, self.n_min, self.n_max = split_idx, info, n_min, n_max

    def words(self, tile: Int32) -> tuple:
        """Work tile number `tile` and this tile as NUM_WORDS int32 values."""
        info = self.info
        return (
            tile,
            self.m_block,
            self.head_idx,
            self.batch_idx,
            self.split_idx,
            info.offset_q,
            info.seqlen_q,
            info.offset_k,
            info.seqlen_k,
            info.causal_offset,
            self.n_min,
            self.n_max,
        )

    @staticmethod
    def from_words(words: cute.Tensor) -> WorkTile:
        """The work tile that `words` (NUM_WORDS int32, see `words`) describe."""
        return WorkTile.from_values([words[i] for i in range(1, WorkTile.NUM_WORDS)])

    @staticmethod
    def from_values(w: list) -> WorkTile:
        """The work tile of `words` but the tile number."""
        info = SeqInfo(w[4], w[5], w[6], w[7], w[8])
        return WorkTile(w[0], w[1], w[2], w[3], info, w[9], w[10])

    # The DSL's region protocol: a WorkTile crosses the boundary of a dynamic `if` or loop
    # as its words (the tile number aside).
    def __extract_mlir_values__(self) -> list:
        values: list = []
        for word in self.words(Int32(0))[1:]:
            values += cutlass.extract_mlir_values(Int32(word))
        return values

    def __new_from_mlir_values__(self, values: list) -> WorkTile:
        return WorkTile.from_values([cutlass.new_from_mlir_values(Int32(0), [v]) for v in values])
