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

Structure: one CTA per (query tile, head, batch); warp-specialized with TMA + mbarriers.

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

from cutedsl_kernels.common import causal_mask
from cutedsl_kernels.common.dsl_compat import LayoutEnum, OperandMajorMode, SmemAllocator
from cutedsl_kernels.common.fragments import (
    acc_rows_cols,
    permute_modes,
    transpose_smem,
)
from cutedsl_kernels.common.named_barriers import NamedBarrier
from cutedsl_kernels.common.online_softmax import OnlineSoftmax
from cutedsl_kernels.config import FmhaFwdConfig
from cutedsl_kernels.hopper import limits
from cutedsl_kernels.hopper.limits import (
    REGS_BY_MMA_WARPGROUPS,
    ROWS_PER_MMA_WARPGROUP,
    THREADS_PER_WARPGROUP,
)
from cutedsl_kernels.hopper.mainloop import Sm90Mainloop


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
        self.num_mma_warpgroups = config.tile_m // ROWS_PER_MMA_WARPGROUP
        self.num_mma_threads = self.num_mma_warpgroups * THREADS_PER_WARPGROUP
        self.num_threads = self.num_mma_threads + THREADS_PER_WARPGROUP
        self.producer_regs, self.mma_regs = REGS_BY_MMA_WARPGROUPS[self.num_mma_warpgroups]
        # Warpgroup turns pay off only when GEMMs of one overlap the softmax of the other.
        self.pingpong = (
            config.wg_pingpong and config.intra_wg_overlap and self.num_mma_warpgroups >= 2
        )

    # ------------------------------------------------------------------ capability
    smem_bytes = staticmethod(limits.smem_bytes)
    can_implement = staticmethod(limits.can_implement)

    def fake_arguments(self) -> tuple:
        """Symbolic-shape stand-ins for (q, k, v, out, lse, softmax_scale, causal_offset)."""
        batch, seqlen_q, seqlen_k = cute.sym_int(), cute.sym_int(), cute.sym_int()
        heads, kv_heads = cute.sym_int(), cute.sym_int()
        align_elems = 16 // (self.dtype.width // 8)  # TMA: 16-byte strides and base

        def bshd(seqlen, nheads):
            strides = tuple(cute.sym_int64(divisibility=align_elems) for _ in range(3))
            return cute.runtime.make_fake_tensor(
                self.dtype,
                (batch, seqlen, nheads, self.head_dim),
                stride=(*strides, 1),
                assumed_align=16,
            )

        lse = cute.runtime.make_fake_tensor(
            Float32,
            (batch, heads, seqlen_q),
            stride=(cute.sym_int64(), cute.sym_int64(), 1),
            assumed_align=4,
        )
        q, out = bshd(seqlen_q, heads), bshd(seqlen_q, heads)
        k, v = bshd(seqlen_k, kv_heads), bshd(seqlen_k, kv_heads)
        return q, k, v, out, lse, Float32(1.0), Int32(0)

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, s_q, h, d)
        mK: cute.Tensor,  # (b, s_k, h_kv, d)
        mV: cute.Tensor,  # (b, s_k, h_kv, d)
        mO: cute.Tensor,  # (b, s_q, h, d)
        mLSE: cute.Tensor,  # (b, h, s_q)
        softmax_scale: Float32,
        causal_offset: Int32,
        stream,
    ):
        # Put the tiled modes first: (s, d, h, b) and (s_q, h, b).
        mQ, mK, mV, mO = [permute_modes(t, [1, 3, 2, 0]) for t in (mQ, mK, mV, mO)]
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

        sQ_layout = self._smem_layout(self.tile_m, None)
        sK_layout = self._smem_layout(self.tile_n, self.num_stages)
        sV_layout = self._smem_layout(self.tile_n, self.num_stages)

        tma_load = cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            tma_load, mQ, sQ_layout, (self.tile_m, self.head_dim)
        )
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(
            tma_load, mK, cute.select(sK_layout, mode=[0, 1]), (self.tile_n, self.head_dim), 1
        )
        tma_atom_V, tma_V = cpasync.make_tiled_tma_atom(
            tma_load, mV, cute.select(sV_layout, mode=[0, 1]), (self.tile_n, self.head_dim), 1
        )
        tma_atom_O, tma_O = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileS2GOp(), mO, sQ_layout, (self.tile_m, self.head_dim)
        )
        tx_bytes_q = cute.size_in_bytes(self.dtype, sQ_layout)
        tx_bytes_kv = cute.size_in_bytes(self.dtype, cute.select(sK_layout, mode=[0, 1]))

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2]
            mbar_k: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            mbar_v: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sV_layout)], 1024]

        scale_log2 = softmax_scale * Float32(math.log2(math.e))
        num_m_blocks = cute.ceil_div(cute.size(mQ.shape[0]), self.tile_m)
        self.kernel(
            tma_Q,
            tma_K,
            tma_V,
            tma_O,
            mLSE,
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
            tx_bytes_q,
            tx_bytes_kv,
            SharedStorage,
        ).launch(
            grid=[num_m_blocks, cute.size(mQ.shape[2]), cute.size(mQ.shape[3])],
            block=[self.num_threads, 1, 1],
            stream=stream,
            min_blocks_per_mp=1,
        )

    def _smem_layout(self, rows: int, stages):
        """Row-major (head_dim contiguous) swizzled tile, optionally with a stage mode."""
        atom = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, self.dtype, self.head_dim),
            self.dtype,
        )
        shape = (rows, self.head_dim) if stages is None else (rows, self.head_dim, stages)
        order = (0, 1) if stages is None else (0, 1, 2)
        return cute.tile_to_shape(atom, shape, order=order)

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,  # TMA coordinate tensors, (s, d, h, b)
        mK: cute.Tensor,
        mV: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,  # (s_q, h, b)
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom,
        tma_atom_V: cute.CopyAtom,
        tma_atom_O: cute.CopyAtom,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        scale_log2: Float32,
        causal_offset: Int32,
        tx_bytes_q: cutlass.Constexpr[int],
        tx_bytes_kv: cutlass.Constexpr[int],
        SharedStorage: cutlass.Constexpr,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            for atom in (tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_O):
                cpasync.prefetch_descriptor(atom)

        smem = SmemAllocator()
        storage = smem.allocate(SharedStorage)
        tma_warp = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1)
        # TMA pipelines count one release per consumer warp.
        mma_warps = pipeline.CooperativeGroup(
            pipeline.Agent.Thread, self.num_mma_threads // cute.arch.WARP_SIZE
        )
        pipeline_q = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_q.data_ptr(),
            num_stages=1,
            producer_group=tma_warp,
            consumer_group=mma_warps,
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
        pipeline.pipeline_init_arrive()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sO = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)  # Q's buffer

        # Work tile: causal tiles with more keys first (they take longest).
        block_m, head_idx, batch_idx = cute.arch.block_idx()
        num_m_blocks, _, _ = cute.arch.grid_dim()
        m_block = block_m
        if const_expr(self.is_causal):
            m_block = num_m_blocks - 1 - block_m
        seqlen_q = mQ.shape[0]
        seqlen_k = mK.shape[0]
        n_blocks = causal_mask.n_block_max(
            m_block,
            seqlen_q,
            seqlen_k,
            causal_offset,
            self.tile_m,
            self.tile_n,
            self.is_causal,
        )
        pipeline.pipeline_init_wait()

        if warp_idx < THREADS_PER_WARPGROUP // cute.arch.WARP_SIZE:
            # ---------------------------------------------------------- producer
            cute.arch.setmaxregister_decrease(self.producer_regs)
            head_kv = head_idx // (mQ.shape[2] // mK.shape[2])
            self.load(
                mQ[None, None, head_idx, batch_idx],
                mK[None, None, head_kv, batch_idx],
                mV[None, None, head_kv, batch_idx],
                sQ,
                sK,
                sV,
                tma_atom_Q,
                tma_atom_K,
                tma_atom_V,
                pipeline_q,
                pipeline_k,
                pipeline_v,
                m_block,
                n_blocks,
                warp_idx,
            )
        else:
            # ---------------------------------------------------------- consumers
            cute.arch.setmaxregister_increase(self.mma_regs)
            tidx, _, _ = cute.arch.thread_idx()
            tidx = tidx - THREADS_PER_WARPGROUP
            self.mma(
                tiled_mma_qk,
                tiled_mma_pv,
                sQ,
                sK,
                sV,
                pipeline_q,
                pipeline_k,
                pipeline_v,
                tidx,
                m_block,
                n_blocks,
                seqlen_k,
                causal_offset,
                scale_log2,
                sO,
                mO[None, None, head_idx, batch_idx],
                mLSE[None, head_idx, batch_idx],
                seqlen_q,
                tma_atom_O,
            )

    @cute.jit
    def load(
        self,
        mQ: cute.Tensor,  # (s_q, d) of this (head, batch)
        mK: cute.Tensor,  # (s_k, d) of this kv head
        mV: cute.Tensor,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom,
        tma_atom_V: cute.CopyAtom,
        pipeline_q: pipeline.PipelineAsync,
        pipeline_k: pipeline.PipelineAsync,
        pipeline_v: pipeline.PipelineAsync,
        m_block: Int32,
        n_blocks: Int32,
        warp_idx: Int32,
    ):
        """Producer: one warp issues every TMA load of this work tile."""
        if warp_idx == 0 and n_blocks > 0:
            gQ = cute.local_tile(mQ, (self.tile_m, self.head_dim), (m_block, 0))
            # (tile_n, d, n_tiles)
            gK = cute.local_tile(mK, (self.tile_n, self.head_dim), (None, 0))
            gV = cute.local_tile(mV, (self.tile_n, self.head_dim), (None, 0))
            cta = cute.make_layout(1)
            # ((ATOM, REST))
            tQsQ, tQgQ = cpasync.tma_partition(
                tma_atom_Q, 0, cta, cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2)
            )
            # ((ATOM, REST), STAGE) and ((ATOM, REST), N_TILES)
            tKsK, tKgK = cpasync.tma_partition(
                tma_atom_K, 0, cta, cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2)
            )
            tVsV, tVgV = cpasync.tma_partition(
                tma_atom_V, 0, cta, cute.group_modes(sV, 0, 2), cute.group_modes(gV, 0, 2)
            )
            q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
            pipeline_q.producer_acquire(q_state)
            cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=pipeline_q.producer_get_barrier(q_state))
            kv_state = pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Producer, self.num_stages
            )
            for i in cutlass.range(n_blocks, unroll=1):
                n_block = n_blocks - 1 - i
                pipeline_k.producer_acquire(kv_state)
                cute.copy(
                    tma_atom_K,
                    tKgK[None, n_block],
                    tKsK[None, kv_state.index],
                    tma_bar_ptr=pipeline_k.producer_get_barrier(kv_state),
                )
                pipeline_v.producer_acquire(kv_state)
                cute.copy(
                    tma_atom_V,
                    tVgV[None, n_block],
                    tVsV[None, kv_state.index],
                    tma_bar_ptr=pipeline_v.producer_get_barrier(kv_state),
                )
                kv_state.advance()

    @cute.jit
    def mma(
        self,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        pipeline_q: pipeline.PipelineAsync,
        pipeline_k: pipeline.PipelineAsync,
        pipeline_v: pipeline.PipelineAsync,
        tidx: Int32,
        m_block: Int32,
        n_blocks: Int32,
        seqlen_k: Int32,
        causal_offset: Int32,
        scale_log2: Float32,
        sO: cute.Tensor,
        mO: cute.Tensor,  # (s_q, d) TMA coordinates of this (head, batch)
        mLSE: cute.Tensor,  # (s_q,)
        seqlen_q: Int32,
        tma_atom_O: cute.CopyAtom,
    ):
        """Consumers: S = QK^T, online softmax, O += PV, then the epilogue."""
        wg_idx = cute.arch.make_warp_uniform(tidx // THREADS_PER_WARPGROUP)
        wg_threads = cute.make_layout(self.num_mma_warpgroups, stride=THREADS_PER_WARPGROUP)
        thr_mma_qk = tiled_mma_qk.get_slice(tidx)
        wg_mma_qk = tiled_mma_qk.get_slice(wg_threads(wg_idx))
        wg_mma_pv = tiled_mma_pv.get_slice(wg_threads(wg_idx))
        # (MMA, MMA_M, MMA_K)
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

        if n_blocks > 0:
            q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
            pipeline_q.consumer_wait(q_state)
            mainloop = Sm90Mainloop(
                tile_m=self.tile_m,
                tile_n=self.tile_n,
                dtype=self.dtype,
                is_causal=self.is_causal,
                pingpong=self.pingpong,
                num_mma_warpgroups=self.num_mma_warpgroups,
                tiled_mma_qk=tiled_mma_qk,
                tiled_mma_pv=tiled_mma_pv,
                tSrQ=tSrQ,
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
                seqlen_k=seqlen_k,
                causal_offset=causal_offset,
                wg_idx=wg_idx,
            )
            mainloop.run(n_blocks, self.num_stages, self.config.intra_wg_overlap)

        inv_sum = softmax.finalize()
        OnlineSoftmax.rescale(acc_O, inv_sum)
        self.epilogue(
            acc_O,
            softmax.row_sum,
            tScS,
            tiled_mma_pv,
            tidx,
            sO,
            mO,
            mLSE,
            m_block,
            seqlen_q,
            tma_atom_O,
        )

    @cute.jit
    def epilogue(
        self,
        acc_O: cute.Tensor,
        lse: cute.Tensor,
        tScS: cute.Tensor,
        tiled_mma_pv: cute.TiledMma,
        tidx: Int32,
        sO: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        m_block: Int32,
        seqlen_q: Int32,
        tma_atom_O: cute.CopyAtom,
    ):
        """Write LSE directly, O through shared memory and one TMA store."""
        coords = acc_rows_cols(tScS)
        if coords[0, 0][1] == 0:  # one lane per quad owns the row's LSE
            for r in cutlass.range_constexpr(cute.size(lse)):
                row = m_block * self.tile_m + coords[r, 0][0]
                if row < seqlen_q:
                    mLSE[row] = lse[r]

        rO = cute.make_rmem_tensor_like(acc_O, self.dtype)
        rO.store(acc_O.load().to(self.dtype))
        # Every MMA warpgroup must be done reading sQ before sO (same bytes) is written.
        cute.arch.barrier(
            barrier_id=int(NamedBarrier.EPILOGUE), number_of_threads=self.num_mma_threads
        )
        store_atom = sm90_utils.get_smem_store_op(LayoutEnum.ROW_MAJOR, self.dtype, Float32)
        thr_store = cute.make_tiled_copy_C(store_atom, tiled_mma_pv).get_slice(tidx)
        cute.copy(store_atom, thr_store.retile(rO), thr_store.partition_D(sO))
        cute.arch.fence_view_async_shared()  # make the st.shared visible to the TMA engine
        cute.arch.barrier(
            barrier_id=int(NamedBarrier.EPILOGUE_STORE), number_of_threads=self.num_mma_threads
        )
        if tidx < cute.arch.WARP_SIZE:
            gO = cute.local_tile(mO, (self.tile_m, self.head_dim), (m_block, 0))
            tOsO, tOgO = cpasync.tma_partition(
                tma_atom_O,
                0,
                cute.make_layout(1),
                cute.group_modes(sO, 0, 2),
                cute.group_modes(gO, 0, 2),
            )
            cute.copy(tma_atom_O, tOsO, tOgO)  # rows past seqlen_q are clipped by TMA
            cute.arch.cp_async_bulk_commit_group()
            cute.arch.cp_async_bulk_wait_group(0, read=True)
