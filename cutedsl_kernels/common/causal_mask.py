"""Which key tiles a query tile visits, and masking of the scores at tile boundaries.

Vocabulary shared by every attention kernel:
- query row i and key column j are absolute positions within one (batch, head);
- `causal_offset`: with `is_causal`, key j is visible to query i iff j <= i + causal_offset
  (seqlen_k - seqlen_q aligns the diagonal bottom-right, 0 aligns it top-left);
- key columns j >= seqlen_k are padding of the last tile and always masked.

The main loop walks key tiles from `n_block_max - 1` down to 0. Only tiles that contain
the sequence end or cross the causal diagonal are masked element by element; tiles fully
left of the diagonal (n < `first_masked_n_block`) need no mask at all.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from cutedsl_kernels.common.fragments import acc_rows_cols


@cute.jit
def n_block_max(
    m_block: Int32,
    seqlen_q: Int32,
    seqlen_k: Int32,
    causal_offset: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
    is_causal: cutlass.Constexpr[bool],
) -> Int32:
    """Number of key tiles query tile `m_block` must visit (may be 0 when causal)."""
    n_max = cute.ceil_div(seqlen_k, tile_n)
    if cutlass.const_expr(is_causal):
        row_end = cutlass.min(seqlen_q, (m_block + 1) * tile_m)
        col_end = cutlass.max(row_end + causal_offset, 0)
        n_max = cutlass.min(n_max, cute.ceil_div(col_end, tile_n))
    return n_max


@cute.jit
def first_masked_n_block(
    m_block: Int32,
    causal_offset: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
) -> Int32:
    """First key tile that the causal diagonal of query tile `m_block` cuts into."""
    visible_end = cutlass.max(m_block * tile_m + causal_offset + 1, 0)
    return visible_end // tile_n


@cute.jit
def apply_mask(
    acc_s: cute.Tensor,
    t_coords: cute.Tensor,
    t0_coords: cute.Tensor,
    m_block: Int32,
    n_block: Int32,
    seqlen_k: Int32,
    causal_offset: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
    is_causal: cutlass.Constexpr[bool],
) -> None:
    """Set masked scores of one (tile_m, tile_n) tile to -inf.

    `t_coords` / `t0_coords` are this thread's and thread 0's partitions of the tile's
    identity tensor, so that the per-element test compares against compile-time column
    offsets (thread 0's) and a per-row limit shifted by this thread's own offset.
    """
    s_rc = acc_rows_cols(acc_s)
    c_rc = acc_rows_cols(t_coords)
    c0_rc = acc_rows_cols(t0_coords)
    thread_col = c_rc[0, 0][1]
    seqlen_limit = seqlen_k - n_block * tile_n - thread_col
    for r in cutlass.range_constexpr(cute.size(s_rc, mode=[0])):
        col_limit = seqlen_limit
        if cutlass.const_expr(is_causal):
            row = m_block * tile_m + c_rc[r, 0][0]
            causal_limit = row + causal_offset + 1 - n_block * tile_n - thread_col
            col_limit = cutlass.min(col_limit, causal_limit)
        for c in cutlass.range_constexpr(cute.size(s_rc, mode=[1])):
            if c0_rc[0, c][1] >= col_limit:
                s_rc[r, c] = -Float32.inf
