"""Which key tiles a query tile visits, and which of them need an element-wise mask.

Vocabulary shared by every attention kernel:
- query row i and key column j are absolute positions within one (batch, head);
- `causal_offset`: with `MaskSpec.causal`, key j is visible to query i iff
  j <= i + causal_offset (seqlen_k - seqlen_q aligns the diagonal bottom-right, 0 aligns
  it top-left);
- key columns j >= seqlen_k are padding of the last tile and always masked;
- the key tiles a CTA visits are [n_min, n_max); with split-KV, `split` of `num_splits`
  takes an equal share of the tiles its query tile needs.

The main loops walk key tiles from `n_max - 1` down to `n_min`. Only tiles that contain
the sequence end or cross the causal diagonal are masked element by element (each
architecture's softmax does that part); tiles fully left of the diagonal
(n < `first_masked_n_block`) need no mask at all.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr

from cutedsl_kernels.config import MaskSpec


@cute.jit
def n_block_max(
    m_block: Int32,
    seqlen_q: Int32,
    seqlen_k: Int32,
    causal_offset: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
    mask: cutlass.Constexpr[MaskSpec],
) -> Int32:
    """Number of key tiles query tile `m_block` must visit (may be 0 when causal)."""
    n_max = cute.ceil_div(seqlen_k, tile_n)
    if const_expr(mask.causal):
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
def n_block_range(
    m_block: Int32,
    seqlen_q: Int32,
    seqlen_k: Int32,
    causal_offset: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
    mask: cutlass.Constexpr[MaskSpec],
    split_idx: Int32,
    num_splits: Int32,
    split_kv: cutlass.Constexpr[bool],
) -> tuple[Int32, Int32]:
    """Key tiles [n_min, n_max) that query tile `m_block` visits (n_max <= n_min: none).

    A query tile past the end of its sequence (packed batches launch for the longest
    one) visits none.
    """
    n_max = n_block_max(m_block, seqlen_q, seqlen_k, causal_offset, tile_m, tile_n, mask)
    n_min = Int32(0)
    if m_block * tile_m >= seqlen_q:
        n_max = Int32(0)
    if const_expr(split_kv):
        per_split = cute.ceil_div(n_max, num_splits)
        n_min = split_idx * per_split
        n_max = cutlass.min(n_max, n_min + per_split)
    return n_min, n_max
