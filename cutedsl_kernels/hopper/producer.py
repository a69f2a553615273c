"""The producer warp of the sm90 FMHA forward: every TMA load of a work tile.

Per work tile: Q (even for a tile without keys: its stage also stages O), then K and V
(key-major V, `FmhaFwdConfig.v_key_major`: V^T tiles of (head_dim_v, tile_n)) key tile by
key tile, from the last (`n_max - 1`) down to `n_min`, each into the next
stage of its pipeline. Dense, packed and cached K/V are one TMA box per key tile; paged
K/V are filled box by box, one box of gcd(page_size, tile_n) rows per page piece (so any
page size that is a multiple of 16 works), each key tile's page numbers loaded one tile
ahead of its boxes, before the waits for free stages, which hide their latency. With
`kv_evict_first` the K/V loads carry the L2 evict-first hint (decode reads each K/V
byte once).
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Int32, const_expr
from cutlass.cute.nvgpu import cpasync

from cutedsl_kernels.common.seqlen import query_position
from cutedsl_kernels.common.tile_scheduler import WorkTile
from cutedsl_kernels.config import FmhaFwdConfig
from cutedsl_kernels.hopper.tensors import FwdTensors

# TMA's L2 cache hint "evict first" (the 64-bit policy CUTLASS's CacheHintSm90 names).
TMA_EVICT_FIRST = 0x12F0000000000000


class Sm90Producer:
    """The TMA loads of one kernel configuration (see the module docstring)."""

    def __init__(self, config: FmhaFwdConfig):
        self.config = config
        self.tile_m, self.tile_n = config.tile_m, config.tile_n
        self.head_dim = config.head_dim
        self.head_dim_v = config.value_head_dim
        self.varlen_q, self.kv_layout = config.varlen_q, config.kv_layout
        self.paged = config.kv_layout == "paged"
        # Rows per TMA box of K/V: a whole tile, or the largest piece that never crosses
        # a page boundary.
        self.kv_box_rows = math.gcd(config.page_size, self.tile_n) if self.paged else self.tile_n

    @cute.jit
    def load(
        self,
        work: WorkTile,
        tensors: FwdTensors,
        smem_tiles: tuple,
        atoms: tuple,
        pipelines: tuple,
        q_state: pipeline.PipelineState,
        kv_state: pipeline.PipelineState,
    ) -> tuple[pipeline.PipelineState, pipeline.PipelineState]:
        """Producer warp: every TMA load of one work tile (Q, even for a tile without keys,
        then K/V from the last key tile down); returns the pipeline states past them."""
        mQ, mK, mV, mPageTable = tensors.mQ, tensors.mK, tensors.mV, tensors.mPageTable
        sQ, sK, sV = smem_tiles
        tma_atom_Q, tma_atom_K, tma_atom_V = atoms
        pipeline_q, pipeline_k, pipeline_v = pipelines
        info, m_block, n_min, n_max = work.info, work.m_block, work.n_min, work.n_max
        q_batch, q_row = query_position(
            work.batch_idx, info, self.varlen_q, self.config.single_query
        )
        head_kv = work.head_idx // (mQ.shape[2] // mK.shape[2])
        cta = cute.make_layout(1)
        mQ_seq = cute.domain_offset((q_row, 0), mQ[None, None, work.head_idx, q_batch])
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
                for atom, src, dst, pipe, cols in (
                    (tma_atom_K, mK_src, sK, pipeline_k, self.head_dim),
                    (tma_atom_V, mV_src, sV, pipeline_v, self.head_dim_v),
                ):
                    pipe.producer_acquire(kv_state)
                    for j in cutlass.range_constexpr(boxes):
                        self.copy_kv_box(
                            atom,
                            cute.local_tile(
                                src[None, None, box_page[j]],
                                (self.kv_box_rows, cols),
                                (box_in_page[j], 0),
                            ),
                            cute.local_tile(
                                dst[None, None, kv_state.index],
                                (self.kv_box_rows, cols),
                                (j, 0),
                            ),
                            pipe.producer_get_barrier(kv_state),
                        )
                kv_state.advance()
        else:
            k_batch = 0 if const_expr(self.kv_layout == "varlen") else work.batch_idx
            mK_src = cute.domain_offset((info.offset_k, 0), mK[None, None, head_kv, k_batch])
            # (tile_n, d, n_tiles)
            gK = cute.local_tile(mK_src, (self.tile_n, self.head_dim), (None, 0))
            if const_expr(self.config.v_key_major):
                # V^T as (d, s): (d, tile_n, n_tiles)
                mV_src = cute.domain_offset((0, info.offset_k), mV[None, None, head_kv, k_batch])
                gV = cute.local_tile(mV_src, (self.head_dim_v, self.tile_n), (0, None))
            else:
                mV_src = cute.domain_offset((info.offset_k, 0), mV[None, None, head_kv, k_batch])
                gV = cute.local_tile(mV_src, (self.tile_n, self.head_dim_v), (None, 0))
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
