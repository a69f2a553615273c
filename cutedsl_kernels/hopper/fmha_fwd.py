"""Hopper (sm_90a) fused multi-head attention forward.

Computes, for every (batch b, query head h, query row i):

    O[b, i, h, :] = softmax_j(scale * Q[b, i, h, :] . K[b, j, h_kv, :]) @ V[b, :, h_kv, :]
    LSE[b, h, i]  = log(sum_j exp(scale * Q . K))          (natural log, float32)

with h_kv = h // (num_heads // num_kv_heads) (GQA/MQA read K/V in place, no copies) and,
with `mask.causal`, only keys j <= i + causal_offset visible; with `mask.window`, only keys
i + causal_offset - left <= j <= i + causal_offset + right (runtime sizes, negative:
unbounded); with `mask.softcap`, scores softcap * tanh(scale * s / softcap) in place of
scale * s; with `mask.sinks`, head h's sink logit joins the softmax denominator of every
row that sees a key (the LSE includes it; split-KV: the combine adds it). Rows with no
visible key give O = 0 and LSE = -inf.

FP8 (`ElementTypes.is_fp8`): Q, K, V in float8_e4m3fn with float32 (batch, num_kv_heads)
descales; the result is the attention of the dequantized inputs, O in fp16 / bf16. Q's
and K's factors multiply the scores' scale (inside the tanh with a softcap), V's the
final 1/l. Both GEMMs run on the FP8 tensor cores: V is read key-major (V^T, the K-major
B operand 8-bit wgmma needs; the host writes it), P is rounded to E4M3 with a 2^8
headroom (`softmax.py`) and moved into the 8-bit A operand's layout across each quad
(`convert.convert_p_fp8`), and each key tile's PV product is added to O in float32
(two-level accumulation, `mainloop.py`). O is written from registers (twice as wide as
Q's buffer). `limits.fp8_reasons`: head_dim 64 and 128, dense and packed, not split-KV.

FP8 caches (`ElementTypes.converts_kv`: 16-bit Q and O, K and V stored in float8_e4m3fn):
the K/V stages hold the cache's bytes; the one MMA warpgroup (tile_m 64) converts each
tile into one K and one V tile of Q's type before the GEMM that reads it (`mainloop.py`),
and K's and V's (batch, num_kv_heads) descales scale the scores and O as above.
`limits.fp8_cache_reasons`: head_dim 64 and 128, 'cache' and 'paged' layouts.

Features and limits (`limits.can_implement` says why a config is refused):
- fp16 / bf16 in and out (Q, K, V and O of one type), or FP8 as above; fp32
  accumulation; head_dim a multiple of 16 up to 256 whose tiles fit shared memory (the
  registry enables 32, 64, 96, 128, 192 and 256); head_dim_v (V and O) = head_dim, or
  smaller with both multiples of 64 (one 128-byte swizzle: O is staged in Q's buffer),
  e.g. (192, 128); masks (`MaskSpec`): none, causal or window, each with or without
  softcap and sinks (a causal window is the window with right size 0).
- Any seqlen_q, seqlen_k >= 1; residual tiles are zero-filled by TMA and masked.
- Layout (batch, seqlen, heads, head_dim) with any strides that TMA accepts (last dim
  contiguous, others multiples of 16 bytes); one compiled kernel serves every shape. The
  arguments: `abi.FmhaFwdArgs`.
- Variable lengths (`FmhaFwdConfig.varlen_q`, `kv_layout`): sequences packed along one
  token axis (a batch of 1 on the host side) and delimited by `cu_seqlens_q/k`; or keys
  in a per-batch cache with `seqused_k` keys used; or in pages of `page_size` rows reached
  through `page_table` (`producer.py`). Causal is bottom-right per sequence. Packed query
  rows past the last sequence (up to total_q: CUDA-graph padding) get O = 0 and
  LSE = -inf from the kernel itself (except with split-KV, whose combine covers them).
- Split-KV (`split_kv`): batch index b * num_splits + split; each split visits an equal
  share of its query tile's key tiles and writes float32 O and LSE of its share to
  (num_splits, ...) partial tensors, merged by `simt/split_combine.py`, whose launch
  (PDL) every CTA allows at its start.

Structure: warp-specialized with TMA + mbarriers. Which work tiles (query tile, head,
batch[, split]) a CTA runs is `common/tile_scheduler.py`'s: one per CTA, or (persistent)
`num_ctas` CTAs looping over work units in a static round robin or taking tiles from a
global counter (`dynamic_schedule`). Persistent CTAs double-buffer Q: the producer loads
the next tile's Q and first K/V while the consumers run this tile's epilogue, and a Q
stage is released once the TMA store of the O staged in it has read it. The producer
warp's loads: `producer.py`; the MMA warpgroups' main loop: `mainloop.py` (scores,
`softmax.py`); the epilogue: `epilogue.py`.

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

from cutedsl_kernels.abi import FmhaFwdArgs
from cutedsl_kernels.common.block_ranges import Window
from cutedsl_kernels.common.dsl_compat import OperandMajorMode, SmemAllocator
from cutedsl_kernels.common.dtypes import dsl_type
from cutedsl_kernels.common.seqlen import query_position
from cutedsl_kernels.common.tile_scheduler import SchedulerParams, TileScheduler, WorkTile
from cutedsl_kernels.config import FmhaFwdConfig
from cutedsl_kernels.hopper import epilogue, limits
from cutedsl_kernels.hopper.fragments import acc_rows_cols, permute_modes, transpose_smem
from cutedsl_kernels.hopper.limits import (
    REGS_BY_MMA_WARPGROUPS,
    ROWS_PER_MMA_WARPGROUP,
    SCHED_STAGES,
    THREADS_PER_WARPGROUP,
)
from cutedsl_kernels.hopper.mainloop import (
    MainloopSettings,
    MmaOperands,
    Sm90Mainloop,
    start_turns,
)
from cutedsl_kernels.hopper.producer import Sm90Producer
from cutedsl_kernels.hopper.shared_storage import shared_storage, tile_layout
from cutedsl_kernels.hopper.softmax import FP8_MAX_OFFSET, OnlineSoftmax, SoftmaxArgs
from cutedsl_kernels.hopper.tensors import FwdTensors


class HopperFmhaForward:
    """Warp-specialized FMHA forward for sm_90a (see module docstring)."""

    def __init__(self, config: FmhaFwdConfig):
        self.config = config
        self.qk_dtype = dsl_type(config.dtypes.qk)
        self.v_dtype = dsl_type(config.dtypes.v)
        self.out_dtype = dsl_type(config.dtypes.out)
        self.head_dim = config.head_dim
        self.head_dim_v = config.value_head_dim
        self.tile_m = config.tile_m
        self.tile_n = config.tile_n
        self.num_stages = config.num_stages
        self.varlen_q = config.varlen_q
        self.kv_layout = config.kv_layout
        self.paged = config.kv_layout == "paged"
        self.split_kv = config.split_kv
        self.persistent = config.persistent
        self.fp8 = config.dtypes.is_fp8
        # FP8 caches: K and V arrive as stored and are converted in shared memory.
        self.converts_kv = config.dtypes.converts_kv
        self.k_load_dtype = self.qk_dtype
        self.v_load_dtype = self.v_dtype
        if self.converts_kv:
            self.k_load_dtype = self.v_load_dtype = dsl_type(config.dtypes.cache)
        self.max_offset = FP8_MAX_OFFSET if self.fp8 else 0  # P's headroom (`softmax`)
        # FP8: V arrives key-major (V^T) and is the second GEMM's K-major B operand.
        self.v_key_major = config.v_key_major
        # Persistent CTAs that take work tiles from a global counter (`TileScheduler`).
        self.dynamic = config.dynamic_schedule
        self.q_stages = limits.q_stages(config)
        self.scheduler = TileScheduler(config, SCHED_STAGES)
        self.producer = Sm90Producer(config)
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
        self.mainloop = MainloopSettings(
            tile_m=config.tile_m,
            tile_n=config.tile_n,
            v_dtype=self.v_dtype,
            mask=config.mask,
            overlap=config.intra_wg_overlap,
            pingpong=self.pingpong,
            num_mma_warpgroups=self.num_mma_warpgroups,
            # Caches: the slots past a sequence's used length may hold anything; packed
            # keys: the rows past the last sequence (padding, e.g. torch.empty).
            # (Key-major V: the host's transposed copy is zero past the data.)
            zero_v_tail=config.kv_layout in ("cache", "paged", "varlen") and not self.v_key_major,
            rows_share_position=config.single_query,
            fp8=self.fp8,
            two_level=self.fp8 and config.pv_two_level,
            converts_kv=self.converts_kv,
            convert_vectorized=config.convert_vectorized,
        )

    # ------------------------------------------------------------------ capability
    smem_bytes = staticmethod(limits.smem_bytes)
    can_implement = staticmethod(limits.can_implement)

    def fake_arguments(self) -> FmhaFwdArgs:
        """Symbolic-shape stand-ins for the runtime arguments (see `abi.FmhaFwdArgs`)."""
        batch, seqlen_q, seqlen_k = cute.sym_int(), cute.sym_int(), cute.sym_int()
        heads, kv_heads, splits = cute.sym_int(), cute.sym_int(), cute.sym_int()

        def tensor(dtype, shape, align_bytes, contiguous_mode=-1):
            align = align_bytes * 8 // dtype.width  # elements
            strides = [cute.sym_int64(divisibility=align) for _ in shape]
            strides[contiguous_mode] = 1
            return cute.runtime.make_fake_tensor(
                dtype, shape, stride=tuple(strides), assumed_align=align_bytes
            )

        tma = 16  # TMA: 16-byte strides and base addresses
        d, dv = self.head_dim, self.config.value_head_dim
        if self.split_kv:
            out = tensor(Float32, (splits, batch, seqlen_q, heads, dv), 16)
            lse = tensor(Float32, (splits, batch, heads, seqlen_q), 4)
        else:
            out = tensor(self.out_dtype, (batch, seqlen_q, heads, dv), tma)
            lse = tensor(Float32, (batch, heads, seqlen_q), 4)
        seqs = cute.sym_int()
        has_used_k = self.kv_layout in ("cache", "paged")
        v_contiguous = 1 if self.v_key_major else -1  # key-major V: the key mode
        return FmhaFwdArgs(
            q=tensor(self.qk_dtype, (batch, seqlen_q, heads, d), tma),
            k=tensor(self.k_load_dtype, (cute.sym_int(), seqlen_k, kv_heads, d), tma),
            v=tensor(
                self.v_load_dtype, (cute.sym_int(), seqlen_k, kv_heads, dv), tma, v_contiguous
            ),
            out=out,
            lse=lse,
            cu_seqlens_q=tensor(Int32, (seqs,), 4) if self.varlen_q else None,
            cu_seqlens_k=tensor(Int32, (seqs,), 4) if self.kv_layout == "varlen" else None,
            seqused_k=tensor(Int32, (cute.sym_int(),), 4) if has_used_k else None,
            page_table=tensor(Int32, (cute.sym_int(), cute.sym_int()), 4) if self.paged else None,
            tile_counter=tensor(Int32, (1,), 4) if self.dynamic else None,
            sinks=self._fake_sinks(),
            q_descale=self._fake_descale(self.fp8),
            k_descale=self._fake_descale(self.fp8 or self.converts_kv),
            v_descale=self._fake_descale(self.fp8 or self.converts_kv),
            softmax_scale=Float32(1.0),
            causal_offset=Int32(0),
            window_left=Int32(-1),
            window_right=Int32(-1),
            softcap=Float32(0.0),
            max_seqlen_q=Int32(1),
            num_splits=Int32(1),
            num_ctas=Int32(1),
        )

    def _fake_sinks(self):
        """(rows, heads) float32 sink logits, any strides (see `abi`), or None."""
        if not self.config.mask.sinks or self.split_kv:
            return None
        shape = (cute.sym_int(), cute.sym_int())
        strides = (cute.sym_int64(), cute.sym_int64())
        return cute.runtime.make_fake_tensor(Float32, shape, stride=strides, assumed_align=4)

    def _fake_descale(self, taken: bool):
        """(batch, num_kv_heads) float32 factors, any strides (see `abi`), if `taken`;
        else None."""
        if not taken:
            return None
        shape = (cute.sym_int(), cute.sym_int())
        strides = (cute.sym_int64(), cute.sym_int64())
        return cute.runtime.make_fake_tensor(Float32, shape, stride=strides, assumed_align=4)

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
        mSinks: cute.Tensor | None,  # (rows, h) float32: mask.sinks, not split_kv
        mQDescale: cute.Tensor | None,  # (b, h_kv) float32: FP8
        mKDescale: cute.Tensor | None,
        mVDescale: cute.Tensor | None,
        softmax_scale: Float32,
        causal_offset: Int32,
        window_left: Int32,  # mask.window; negative: unbounded
        window_right: Int32,
        softcap: Float32,  # mask.softcap, > 0
        max_seqlen_q: Int32,
        num_splits: Int32,
        num_ctas: Int32,  # persistent: CTAs to launch (the SM count); ignored otherwise
        stream,
    ):
        # Put the tiled modes first: (s, d, h, b[, split]) and (s_q, h, b[, split]); a
        # key-major V as (d, s, h, b).
        mQ, mK = [permute_modes(t, [1, 3, 2, 0]) for t in (mQ, mK)]
        mV = permute_modes(mV, [3, 1, 2, 0] if self.v_key_major else [1, 3, 2, 0])
        if const_expr(self.split_kv):
            mO = permute_modes(mO, [2, 4, 3, 1, 0])
            mLSE = permute_modes(mLSE, [3, 2, 1, 0])
        else:
            mO = permute_modes(mO, [1, 3, 2, 0])
            mLSE = permute_modes(mLSE, [2, 1, 0])

        tiled_mma_qk = sm90_utils.make_trivial_tiled_mma(
            self.qk_dtype,
            self.qk_dtype,
            OperandMajorMode.K,
            OperandMajorMode.K,
            Float32,
            atom_layout_mnk=(self.num_mma_warpgroups, 1, 1),
            tiler_mn=(ROWS_PER_MMA_WARPGROUP, self.tile_n),
        )
        tiled_mma_pv = sm90_utils.make_trivial_tiled_mma(
            self.v_dtype,  # P is converted to V's type
            self.v_dtype,
            OperandMajorMode.K,
            OperandMajorMode.K if self.v_key_major else OperandMajorMode.MN,
            Float32,
            atom_layout_mnk=(self.num_mma_warpgroups, 1, 1),
            tiler_mn=(ROWS_PER_MMA_WARPGROUP, self.head_dim_v),
            a_source=warpgroup.OperandSource.RMEM,  # P stays in registers
        )

        # O is staged in Q's buffer (`limits.can_implement`: one element type).
        sQ_layout = self._smem_layout(self.qk_dtype, self.tile_m, self.q_stages, False)
        sQ_tile = cute.select(sQ_layout, mode=[0, 1])
        # Paged K/V tiles are filled box by box: each box of rows must be contiguous.
        kv_box_rows = self.producer.kv_box_rows
        # K and V stages as loaded (an FP8 cache's bytes when converted).
        k_type, v_type = self.k_load_dtype, self.v_load_dtype
        sK_layout = self._smem_layout(k_type, self.tile_n, self.num_stages, self.paged)
        sV_layout = self._smem_layout(
            v_type, self.tile_n, self.num_stages, self.paged, self.head_dim_v
        )
        box = (kv_box_rows, self.head_dim)
        sKV_box = self._smem_layout(k_type, kv_box_rows, None, self.paged)
        box_v = (kv_box_rows, self.head_dim_v)
        sV_box = self._smem_layout(v_type, kv_box_rows, None, self.paged, self.head_dim_v)
        # Converting kernels: the one K and one V tile the GEMMs read (a stage mode of 1).
        sK_mma_layout, sV_mma_layout = None, None
        if const_expr(self.converts_kv):
            sK_mma_layout = self._smem_layout(self.qk_dtype, self.tile_n, 1, False)
            sV_mma_layout = self._smem_layout(self.v_dtype, self.tile_n, 1, False, self.head_dim_v)
        if const_expr(self.v_key_major):
            # V^T tiles (head_dim_v, tile_n), keys contiguous: the K-major B operand.
            sV_layout = self._smem_layout(
                self.v_dtype, self.head_dim_v, self.num_stages, False, self.tile_n
            )
            box_v = (self.head_dim_v, self.tile_n)
            sV_box = self._smem_layout(self.v_dtype, self.head_dim_v, None, False, self.tile_n)
        # O (tile_m, head_dim_v) is staged in Q's buffer: the same tile when the two agree.
        sO_tile = sQ_tile
        if const_expr(self.head_dim_v != self.head_dim):
            sO_tile = self._smem_layout(self.out_dtype, self.tile_m, None, False, self.head_dim_v)

        tma_load = cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            tma_load, mQ, sQ_tile, (self.tile_m, self.head_dim)
        )
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(tma_load, mK, sKV_box, box, 1)
        tma_atom_V, tma_V = cpasync.make_tiled_tma_atom(tma_load, mV, sV_box, box_v, 1)
        tma_atom_O, tma_O = None, None
        if const_expr(not self.split_kv and not self.fp8):
            tma_atom_O, tma_O = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileS2GOp(), mO, sO_tile, (self.tile_m, self.head_dim_v)
            )
        tx_bytes_q = cute.size_in_bytes(self.qk_dtype, sQ_tile)
        tx_bytes_kv = cute.size_in_bytes(k_type, cute.select(sK_layout, mode=[0, 1]))
        tx_bytes_v = cute.size_in_bytes(v_type, cute.select(sV_layout, mode=[0, 1]))

        converted_tiles = None
        if const_expr(self.converts_kv):
            mma_layouts = (sK_mma_layout, sV_mma_layout)
            converted_tiles = (mma_layouts, self.qk_dtype, self.v_dtype)
        SharedStorage = shared_storage(
            (self.qk_dtype, k_type, v_type), (sQ_layout, sK_layout, sV_layout),
            converted_tiles, self.q_stages, self.num_stages,
        )  # fmt: skip

        scale_log2 = softmax_scale * Float32(math.log2(math.e))
        softcap_pre_scale = None
        if const_expr(self.config.mask.softcap):
            # tanh(s * softmax_scale / softcap), then softmax with scale softcap.
            softcap_pre_scale = softmax_scale / softcap
            scale_log2 = softcap * Float32(math.log2(math.e))
        if const_expr(not self.config.mask.window):
            window_left, window_right = None, None
        grid, num_m_blocks, l2_group = self.scheduler.launch_grid(
            mQ, mK, mCuSeqlensQ, max_seqlen_q, num_splits, num_ctas
        )
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
            mSinks,
            mQDescale,
            mKDescale,
            mVDescale,
            tma_atom_Q,
            tma_atom_K,
            tma_atom_V,
            tma_atom_O,
            sQ_layout,
            sK_layout,
            sV_layout,
            sK_mma_layout,
            sV_mma_layout,
            tiled_mma_qk,
            tiled_mma_pv,
            scale_log2,
            softcap_pre_scale,
            causal_offset,
            window_left,
            window_right,
            num_splits,
            num_m_blocks,
            l2_group,
            tx_bytes_q,
            tx_bytes_kv,
            tx_bytes_v,
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

    def _smem_layout(self, dtype: type, rows: int, stages, rows_outer: bool, cols=None):
        """`shared_storage.tile_layout` of `cols` columns (None: head_dim)."""
        cols = self.head_dim if cols is None else cols
        return tile_layout(dtype, rows, cols, stages, rows_outer)

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
        mSinks: cute.Tensor | None,
        mQDescale: cute.Tensor | None,  # FP8: (b, h_kv) float32 factors
        mKDescale: cute.Tensor | None,
        mVDescale: cute.Tensor | None,
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom,
        tma_atom_V: cute.CopyAtom,
        tma_atom_O: cute.CopyAtom | None,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout,
        sK_mma_layout: cute.ComposedLayout | None,  # converting kernels' GEMM tiles
        sV_mma_layout: cute.ComposedLayout | None,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        scale_log2: Float32,
        softcap_pre_scale: Float32 | None,
        causal_offset: Int32,
        window_left: Int32 | None,
        window_right: Int32 | None,
        num_splits: Int32,
        num_m_blocks: Int32,
        l2_group: Int32,
        tx_bytes_q: cutlass.Constexpr[int],
        tx_bytes_kv: cutlass.Constexpr[int],
        tx_bytes_v: cutlass.Constexpr[int],
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

        storage = SmemAllocator().allocate(SharedStorage)
        pipelines, pipeline_sched = self.make_pipelines(
            storage, tx_bytes_q, tx_bytes_kv, tx_bytes_v
        )
        pipeline.pipeline_init_arrive()

        # O is staged through the Q stage of its own tile (see `store_o_tma`).
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        smem_tiles = (sQ, sK, sV)
        converted = None
        if const_expr(self.converts_kv):
            converted = (
                storage.sK_mma.get_tensor(sK_mma_layout.outer, swizzle=sK_mma_layout.inner),
                storage.sV_mma.get_tensor(sV_mma_layout.outer, swizzle=sV_mma_layout.inner),
            )
        tensors = FwdTensors(
            mQ, mK, mV, tma_O, mO, mLSE, mCuSeqlensQ, mCuSeqlensK, mSeqUsedK, mPageTable
        )
        window = None
        if const_expr(self.config.mask.window):
            window = Window(window_left, window_right)
        descales = None
        if const_expr(self.fp8 or self.converts_kv):
            descales = (mQDescale, mKDescale, mVDescale)  # (mQDescale: None for caches)
        softmax_args = SoftmaxArgs(scale_log2, softcap_pre_scale, mSinks, descales)
        schedule = SchedulerParams(
            mQ,
            mK,
            mCuSeqlensQ,
            mCuSeqlensK,
            mSeqUsedK,
            num_m_blocks,
            l2_group,
            causal_offset,
            num_splits,
            mTileCounter,
            pipeline_sched,
            storage.sched_tiles.get_tensor(cute.make_layout((WorkTile.NUM_WORDS, SCHED_STAGES))),
            window,
        )
        pipeline.pipeline_init_wait()

        if warp_idx < THREADS_PER_WARPGROUP // cute.arch.WARP_SIZE:
            # ---------------------------------------------------------- producer
            cute.arch.setmaxregister_decrease(self.producer_regs)
            if warp_idx == 0:
                atoms = (tma_atom_Q, tma_atom_K, tma_atom_V)
                role_args = (tensors, smem_tiles, atoms, pipelines)
                states = self.pipeline_states(pipeline.PipelineUserType.Producer)
                self.scheduler.run(True, self.producer.load, role_args, states, schedule)
        else:
            # ---------------------------------------------------------- consumers
            cute.arch.setmaxregister_increase(self.mma_regs)
            tidx, _, _ = cute.arch.thread_idx()
            tidx = tidx - THREADS_PER_WARPGROUP
            wg_idx = cute.arch.make_warp_uniform(tidx // THREADS_PER_WARPGROUP)
            start_turns(self.pingpong, wg_idx)
            mmas = (tiled_mma_qk, tiled_mma_pv)
            role_args = (
                tensors, smem_tiles, pipelines, mmas, tma_atom_O, tidx, wg_idx, softmax_args,
                window, converted,
            )  # fmt: skip
            states = self.pipeline_states(pipeline.PipelineUserType.Consumer)
            self.scheduler.run(False, self.mma, role_args, states, schedule)

    def make_pipelines(self, storage, tx_bytes_q: int, tx_bytes_k: int, tx_bytes_v: int) -> tuple:
        """((pipeline_q, pipeline_k, pipeline_v), pipeline_sched or None) over `storage`'s
        barriers (initialization deferred to `pipeline_init_arrive` / `_wait`)."""
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
            tx_count=tx_bytes_k,
            defer_sync=True,
        )
        pipeline_v = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_v.data_ptr(),
            num_stages=self.num_stages,
            producer_group=tma_warp,
            consumer_group=mma_warps,
            tx_count=tx_bytes_v,
            defer_sync=True,
        )
        pipeline_sched = None
        if const_expr(self.dynamic):
            # Work tiles, producer warp -> consumers (see `TileScheduler.run`).
            pipeline_sched = pipeline.PipelineAsync.create(
                barrier_storage=storage.mbar_sched.data_ptr(),
                num_stages=SCHED_STAGES,
                producer_group=tma_warp,
                consumer_group=pipeline.CooperativeGroup(
                    pipeline.Agent.Thread, self.num_mma_threads
                ),
                defer_sync=True,
            )
        return (pipeline_q, pipeline_k, pipeline_v), pipeline_sched

    def pipeline_states(self, role: pipeline.PipelineUserType) -> tuple:
        """(q_state, kv_state) of a role at its first work tile; they carry over from
        tile to tile."""
        return (
            pipeline.make_pipeline_state(role, self.q_stages),
            pipeline.make_pipeline_state(role, self.num_stages),
        )

    @cute.jit
    def mma(
        self,
        work: WorkTile,
        tensors: FwdTensors,
        smem_tiles: tuple,
        pipelines: tuple,
        mmas: tuple,
        tma_atom_O: cute.CopyAtom | None,
        tidx: Int32,
        wg_idx: Int32,
        softmax_args: SoftmaxArgs,
        window: Window | None,
        converted: tuple | None,
        q_state: pipeline.PipelineState,
        kv_state: pipeline.PipelineState,
    ) -> tuple[pipeline.PipelineState, pipeline.PipelineState]:
        """Consumers, one work tile: S = QK^T, online softmax, O += PV, then the epilogue;
        returns the pipeline states past this tile. `converted`: a converting kernel's
        (K, V) GEMM tiles (`MmaOperands.converted`), else None."""
        sQ, sK, sV = smem_tiles
        pipeline_q, pipeline_k, pipeline_v = pipelines
        tiled_mma_qk, tiled_mma_pv = mmas
        info, m_block, n_min, n_max = work.info, work.m_block, work.n_min, work.n_max
        wg_threads = cute.make_layout(self.num_mma_warpgroups, stride=THREADS_PER_WARPGROUP)
        thr_mma_qk = tiled_mma_qk.get_slice(tidx)
        wg_mma_qk = tiled_mma_qk.get_slice(wg_threads(wg_idx))
        wg_mma_pv = tiled_mma_pv.get_slice(wg_threads(wg_idx))
        # (MMA, MMA_M, MMA_K, Q_STAGE)
        tSrQ = wg_mma_qk.make_fragment_A(wg_mma_qk.partition_A(sQ))
        # The tiles the GEMMs read: the K/V stages, or a converting kernel's one K/V tile.
        sK_mma, sV_mma = sK, sV
        if const_expr(converted is not None):
            sK_mma, sV_mma = converted
        # (MMA, MMA_N, MMA_K, STAGE)
        tSrK = wg_mma_qk.make_fragment_B(wg_mma_qk.partition_B(sK_mma))
        # (MMA, MMA_N, MMA_K, STAGE): V^T as the (d, n) B operand (key-major V: as stored)
        sVt = sV_mma
        if const_expr(not self.v_key_major):
            sVt = transpose_smem(sV_mma)
        tOrVt = wg_mma_pv.make_fragment_B(wg_mma_pv.partition_B(sVt))
        # (MMA, MMA_M, MMA_K): P as the register A operand
        tOrP = wg_mma_pv.make_fragment_A(wg_mma_pv.partition_shape_A((self.tile_m, self.tile_n)))
        # (MMA, MMA_M, MMA_N)
        acc_O = cute.make_rmem_tensor(
            tiled_mma_pv.partition_shape_C((self.tile_m, self.head_dim_v)), Float32
        )
        acc_O.fill(0.0)
        cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
        tScS = thr_mma_qk.partition_C(cS)
        t0ScS = tiled_mma_qk.get_slice(0).partition_C(cS)
        scale_log2, softcap_pre_scale = softmax_args.scale_log2, softmax_args.softcap_pre_scale
        v_scale = None
        if const_expr(softmax_args.descales is not None):
            head_kv = work.head_idx // (tensors.mQ.shape[2] // tensors.mK.shape[2])
            scale_log2, softcap_pre_scale, v_scale = softmax_args.descaled(
                work.batch_idx, head_kv, n_max > n_min
            )
        softmax = OnlineSoftmax(
            scale_log2,
            num_rows=cute.size(acc_rows_cols(tScS), mode=[0]),
            max_offset=self.max_offset,
        )
        softmax.reset()

        pipeline_q.consumer_wait(q_state)  # loaded for every tile, even one without keys
        if n_max > n_min:
            operands = MmaOperands(
                tiled_mma_qk,
                tiled_mma_pv,
                tSrQ[None, None, None, q_state.index],
                tSrK,
                tOrVt,
                tOrP,
                tScS,
                t0ScS,
                sV,
                sK,
                converted,
            )
            v_rows = None
            if const_expr(self.kv_layout == "varlen"):
                # Only rows past the last sequence may be padding: the next sequences'
                # rows are masked (P = 0) and hold data.
                cu_k = tensors.mCuSeqlensK
                v_rows = cu_k[cute.size(cu_k.shape[0]) - 1] - info.offset_k
            mainloop = Sm90Mainloop(
                self.mainloop, operands, acc_O, softmax, (pipeline_k, pipeline_v), m_block, info,
                wg_idx, v_rows, window, softcap_pre_scale,
            )  # fmt: skip
            kv_state = mainloop.run(kv_state, n_min, n_max)

        sinks = None
        if const_expr(softmax_args.sinks is not None):
            sinks = softmax_args.row_sinks(tScS, m_block * self.tile_m, work.head_idx)
        inv_sum = softmax.finalize(sinks)
        if const_expr(softmax_args.descales is not None):
            inv_sum.store(inv_sum.load() * v_scale)
        OnlineSoftmax.rescale(acc_O, inv_sum)
        self.store_tile(work, tensors, sQ, q_state.index, acc_O, softmax.row_sum, tScS,
                        tiled_mma_pv, tma_atom_O, tidx)  # fmt: skip
        # Nested on purpose: a const_expr must not share an `if` with a runtime test.
        if const_expr(self.persistent):  # noqa: SIM102
            # The storing warp has waited for the TMA store to read sO: Q's stage is free.
            if tidx < cute.arch.WARP_SIZE:
                cute.arch.sync_warp()
                pipeline_q.consumer_release(q_state)
        q_state.advance()
        return q_state, kv_state

    @cute.jit
    def store_tile(
        self,
        work: WorkTile,
        tensors: FwdTensors,
        sQ: cute.Tensor,
        q_stage: Int32,
        acc_O: cute.Tensor,
        lse: cute.Tensor,
        tScS: cute.Tensor,
        tiled_mma_pv: cute.TiledMma,
        tma_atom_O: cute.CopyAtom | None,
        tidx: Int32,
    ):
        """Epilogue of one work tile: its rows' LSE, then O (normalized in `acc_O`) through
        this tile's Q stage `q_stage` of `sQ` and a TMA store, or straight to global memory
        (split-KV partials; a packed sequence's partial last tile)."""
        info, m_block = work.info, work.m_block
        q_batch, q_row = query_position(
            work.batch_idx, info, self.varlen_q, self.config.single_query
        )
        mO, mLSE = tensors.mO, tensors.mLSE
        row0 = m_block * self.tile_m
        if const_expr(self.split_kv):
            mO_seq = mO[None, None, work.head_idx, q_batch, work.split_idx]
            mLSE_seq = mLSE[None, work.head_idx, q_batch, work.split_idx]
        else:
            mO_seq = mO[None, None, work.head_idx, q_batch]
            mLSE_seq = mLSE[None, work.head_idx, q_batch]
        mO_seq = cute.domain_offset((q_row, 0), mO_seq)
        mLSE_seq = cute.domain_offset((q_row,), mLSE_seq)
        epilogue.store_lse(lse, tScS, mLSE_seq, row0, info.seqlen_q)
        tile = (self.tile_m, self.head_dim_v)
        sO = sQ[None, None, q_stage]
        if const_expr(self.head_dim_v != self.head_dim):
            # O is narrower than Q: the first bytes of this Q stage, laid out (tile_m,
            # head_dim_v) under the same 128-byte swizzle (`limits.can_implement`).
            o_layout = self._smem_layout(self.out_dtype, self.tile_m, None, False, self.head_dim_v)
            sO = cute.make_tensor(sO.iterator, o_layout.outer)
        if const_expr(self.split_kv or self.fp8):
            # (FP8: O is wider than Q's buffer; it is written from registers.)
            gO = cute.local_tile(mO_seq, tile, (m_block, 0))
            epilogue.store_o_direct(acc_O, tiled_mma_pv, tidx, gO, info.seqlen_q - row0)
        else:
            tma_O_seq = cute.domain_offset(
                (q_row, 0), tensors.tma_O[None, None, work.head_idx, q_batch]
            )
            if const_expr(self.varlen_q and not self.config.single_query):
                # TMA would write past this sequence's end into the next one's rows.
                if row0 + self.tile_m <= info.seqlen_q:
                    self.store_o_tma(acc_O, tiled_mma_pv, tidx, sO, tma_O_seq, m_block, tma_atom_O)
                else:
                    gO = cute.local_tile(mO_seq, tile, (m_block, 0))
                    epilogue.store_o_direct(acc_O, tiled_mma_pv, tidx, gO, info.seqlen_q - row0)
            else:
                self.store_o_tma(acc_O, tiled_mma_pv, tidx, sO, tma_O_seq, m_block, tma_atom_O)

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
            self.out_dtype,
            tiled_mma_pv,
            tidx,
            self.num_mma_threads,
            sO,
            cute.local_tile(tma_O, (self.tile_m, self.head_dim_v), (m_block, 0)),
            tma_atom_O,
        )
