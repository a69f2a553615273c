"""Epilogue of the sm90 FMHA forward: LSE and O from the MMA warpgroups to global memory.

Two ways to write O, chosen per tile:
- `store_o_tma`: registers -> shared memory (Q's buffer) -> one TMA store. TMA clips rows
  past the end of the tensor, not past the end of a packed sequence, so it serves tiles
  that end inside their tensor's own rows: dense problems, and full tiles of packed ones.
- `store_o_direct`: registers -> global memory, element by element, rows past `rows`
  skipped. Serves the partial last tile of a packed sequence and float32 split-KV partial
  outputs (which have no shared-memory staging buffer of their type).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import cpasync

from cutedsl_kernels.common.dsl_compat import LayoutEnum
from cutedsl_kernels.common.named_barriers import NamedBarrier
from cutedsl_kernels.hopper.fragments import acc_rows_cols


@cute.jit
def store_lse(lse: cute.Tensor, tScS: cute.Tensor, mLSE: cute.Tensor, row0: Int32, rows: Int32):
    """Write this thread's rows' LSE to `mLSE[row0 + r]` for rows r < `rows` - row0."""
    coords = acc_rows_cols(tScS)
    if coords[0, 0][1] == 0:  # one lane per quad owns the row's LSE
        for r in cutlass.range_constexpr(cute.size(lse)):
            row = row0 + coords[r, 0][0]
            if row < rows:
                mLSE[row] = lse[r]


@cute.jit
def store_o_tma(
    acc_O: cute.Tensor,
    dtype: cutlass.Constexpr,
    tiled_mma_pv: cute.TiledMma,
    tidx: Int32,
    num_mma_threads: cutlass.Constexpr[int],
    sO: cute.Tensor,
    gO: cute.Tensor,  # (tile_m, head_dim) TMA coordinates of this tile
    tma_atom_O: cute.CopyAtom,
):
    """O -> sO -> TMA store (rows past the tensor's end are clipped by TMA)."""
    rO = cute.make_rmem_tensor_like(acc_O, dtype)
    rO.store(acc_O.load().to(dtype))
    # Every MMA warpgroup must be done reading sQ before sO (same bytes) is written.
    cute.arch.barrier(barrier_id=int(NamedBarrier.EPILOGUE), number_of_threads=num_mma_threads)
    store_atom = sm90_utils.get_smem_store_op(LayoutEnum.ROW_MAJOR, dtype, Float32)
    thr_store = cute.make_tiled_copy_C(store_atom, tiled_mma_pv).get_slice(tidx)
    cute.copy(store_atom, thr_store.retile(rO), thr_store.partition_D(sO))
    cute.arch.fence_view_async_shared()  # make the st.shared visible to the TMA engine
    cute.arch.barrier(
        barrier_id=int(NamedBarrier.EPILOGUE_STORE), number_of_threads=num_mma_threads
    )
    if tidx < cute.arch.WARP_SIZE:
        tOsO, tOgO = cpasync.tma_partition(
            tma_atom_O,
            0,
            cute.make_layout(1),
            cute.group_modes(sO, 0, 2),
            cute.group_modes(gO, 0, 2),
        )
        cute.copy(tma_atom_O, tOsO, tOgO)
        cute.arch.cp_async_bulk_commit_group()
        cute.arch.cp_async_bulk_wait_group(0, read=True)


@cute.jit
def store_o_direct(
    acc_O: cute.Tensor,
    tiled_mma_pv: cute.TiledMma,
    tidx: Int32,
    gO: cute.Tensor,  # (tile_m, head_dim) global tensor of this tile, any element type
    rows: Int32,
):
    """O -> global memory, converted to gO's element type; tile rows >= `rows` skipped."""
    thr_mma = tiled_mma_pv.get_slice(tidx)
    tOcO = thr_mma.partition_C(cute.make_identity_tensor(gO.shape))
    tOgO = thr_mma.partition_C(gO)
    rO = cute.make_rmem_tensor_like(acc_O, gO.element_type)
    rO.store(acc_O.load().to(gO.element_type))
    for i in cutlass.range_constexpr(cute.size(rO)):
        if tOcO[i][0] < rows:
            tOgO[i] = rO[i]
