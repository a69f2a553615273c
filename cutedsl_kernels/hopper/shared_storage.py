"""Shared memory of the sm90 FMHA forward: its tile layouts and the `SharedStorage` struct.

The struct, field by field: the Q, K and V pipelines' barriers; the Q stages (O is staged
in them, but by FP8 kernels); the K and V stages as the producer loads them (an FP8
cache's bytes for the kernels that convert it); a converting kernel's one K and one V
tile of Q's type, which the GEMMs read; the scheduler's barriers and work tiles (always
allocated). Each tile buffer is 1024-byte aligned (the 128-byte swizzle's atom).
`limits.smem_bytes` counts it byte for byte (tests/test_kernels_compile.py checks the
two against each other).
"""

# (No `from __future__ import annotations`: cute.struct reads its fields' annotations as
# objects when the class is made.)
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Int32
from cutlass.cute.nvgpu import warpgroup

from cutedsl_kernels.common.dsl_compat import LayoutEnum
from cutedsl_kernels.common.tile_scheduler import WorkTile
from cutedsl_kernels.hopper.limits import SCHED_STAGES, SMEM_ALIGN


def tile_layout(dtype: type, rows: int, cols: int, stages: int | None, rows_outer: bool):
    """Row-major (`cols` contiguous) swizzled tile, optionally with a stage mode.

    Swizzle atoms are stacked down the rows first (`rows_outer=False`) or across the
    columns first (`rows_outer=True`, so that any 8-row slab is contiguous).
    """
    atom = warpgroup.make_smem_layout_atom(
        sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, cols),
        dtype,
    )
    order = (1, 0) if rows_outer else (0, 1)
    if stages is None:
        return cute.tile_to_shape(atom, (rows, cols), order=order)
    return cute.tile_to_shape(atom, (rows, cols, stages), order=(*order, 2))


def shared_storage(
    types: tuple[type, type, type],
    layouts: tuple,
    converted: tuple | None,
    q_stages: int,
    kv_stages: int,
):
    """The `SharedStorage` struct of one kernel (see the module docstring).

    Args:
        types: the element types of the Q, K and V buffers (K and V as loaded).
        layouts: the (Q, K, V) staged layouts.
        converted: a converting kernel's (K, V) GEMM tile layouts and their type
            ((sK, sV), dtype, v_dtype), else None.
        q_stages, kv_stages: the Q and K/V pipelines' depths.
    """
    q_type, k_type, v_type = types
    q_size, k_size, v_size = (cute.cosize(layout) for layout in layouts)
    align = SMEM_ALIGN
    tiles = WorkTile.NUM_WORDS * SCHED_STAGES

    @cute.struct
    class SharedStorage:
        mbar_q: cute.struct.MemRange[cutlass.Int64, 2 * q_stages]
        mbar_k: cute.struct.MemRange[cutlass.Int64, 2 * kv_stages]
        mbar_v: cute.struct.MemRange[cutlass.Int64, 2 * kv_stages]
        sQ: cute.struct.Align[cute.struct.MemRange[q_type, q_size], align]
        sK: cute.struct.Align[cute.struct.MemRange[k_type, k_size], align]
        sV: cute.struct.Align[cute.struct.MemRange[v_type, v_size], align]
        mbar_sched: cute.struct.MemRange[cutlass.Int64, 2 * SCHED_STAGES]
        sched_tiles: cute.struct.MemRange[Int32, tiles]

    if converted is None:
        return SharedStorage
    (k_mma, v_mma), qk_type, v_mma_type = converted
    k_mma_size, v_mma_size = cute.cosize(k_mma), cute.cosize(v_mma)

    @cute.struct
    class ConvertingStorage:  # (the same, with the converted K and V tiles after V's)
        mbar_q: cute.struct.MemRange[cutlass.Int64, 2 * q_stages]
        mbar_k: cute.struct.MemRange[cutlass.Int64, 2 * kv_stages]
        mbar_v: cute.struct.MemRange[cutlass.Int64, 2 * kv_stages]
        sQ: cute.struct.Align[cute.struct.MemRange[q_type, q_size], align]
        sK: cute.struct.Align[cute.struct.MemRange[k_type, k_size], align]
        sV: cute.struct.Align[cute.struct.MemRange[v_type, v_size], align]
        sK_mma: cute.struct.Align[cute.struct.MemRange[qk_type, k_mma_size], align]
        sV_mma: cute.struct.Align[cute.struct.MemRange[v_mma_type, v_mma_size], align]
        mbar_sched: cute.struct.MemRange[cutlass.Int64, 2 * SCHED_STAGES]
        sched_tiles: cute.struct.MemRange[Int32, tiles]

    return ConvertingStorage
