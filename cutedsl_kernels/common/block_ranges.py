"""Which key tiles a query tile visits, and which of them need an element-wise mask.

Vocabulary shared by every attention kernel:
- query row i and key column j are absolute positions within one (batch, head);
- `causal_offset`: with `MaskSpec.causal`, key j is visible to query i iff
  j <= i + causal_offset (seqlen_k - seqlen_q aligns the diagonal bottom-right, 0 aligns
  it top-left);
- `Window` (with `MaskSpec.window`): key j is visible to query i iff
  i + causal_offset - left <= j <= i + causal_offset + right (the same alignment as causal;
  causal is the window (unbounded, 0)); a negative size is unbounded;
- key columns j >= seqlen_k are padding of the last tile and always masked;
- the key tiles a CTA visits are [n_min, n_max); with split-KV, `split` of `num_splits`
  takes an equal share of the tiles its query tile needs.

The main loops walk key tiles from `n_max - 1` down to `n_min`. Only tiles that contain
the sequence end or cross the causal diagonal (or a window's right edge) are masked element
by element (each architecture's softmax does that part), and with a window the tiles that
cross its left edge (n < `first_unmasked_left_n_block`); tiles fully inside the band
(n < `first_masked_n_block`) need no mask at all. A window's tiles outside the band are not
visited: [n_min, n_max) covers the band only, so the work of a query tile (and of each
split-KV share) is the band's.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr

from cutedsl_kernels.config import MaskSpec


class Window:
    """Runtime sizes of a `MaskSpec.window` kernel's band (a negative size is unbounded):
    key j is visible to query i iff i + causal_offset - left <= j <= i + causal_offset +
    right."""

    def __init__(self, left: Int32, right: Int32):
        self.left, self.right = left, right


@cute.jit
def n_block_max(
    m_block: Int32,
    seqlen_q: Int32,
    seqlen_k: Int32,
    causal_offset: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
    mask: cutlass.Constexpr[MaskSpec],
    window: Window | None = None,
) -> Int32:
    """Number of key tiles query tile `m_block` must visit up to (may be 0 when causal or
    windowed): one past the last key its last row sees."""
    n_max = cute.ceil_div(seqlen_k, tile_n)
    if const_expr(mask.causal):
        row_end = cutlass.min(seqlen_q, (m_block + 1) * tile_m)
        col_end = cutlass.max(row_end + causal_offset, 0)
        n_max = cutlass.min(n_max, cute.ceil_div(col_end, tile_n))
    if const_expr(mask.window):
        row_end = cutlass.min(seqlen_q, (m_block + 1) * tile_m)
        band_end = cute.ceil_div(cutlass.max(row_end + causal_offset + window.right, 0), tile_n)
        if window.right >= 0:
            n_max = cutlass.min(n_max, band_end)
    return n_max


@cute.jit
def n_block_min(
    m_block: Int32,
    causal_offset: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
    mask: cutlass.Constexpr[MaskSpec],
    window: Window | None = None,
) -> Int32:
    """First key tile query tile `m_block` visits: the one holding the first key its first
    row sees (0 without a window's left edge)."""
    n_min = Int32(0)
    if const_expr(mask.window):
        band_start = cutlass.max(m_block * tile_m + causal_offset - window.left, 0) // tile_n
        if window.left >= 0:
            n_min = band_start
    return n_min


@cute.jit
def first_masked_n_block(
    m_block: Int32,
    causal_offset: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
    right: Int32 | int = 0,
) -> Int32:
    """First key tile that the causal diagonal (or a window's right edge `right` keys
    past it) of query tile `m_block` cuts into."""
    visible_end = cutlass.max(m_block * tile_m + causal_offset + right + 1, 0)
    return visible_end // tile_n


@cute.jit
def first_unmasked_left_n_block(
    m_block: Int32,
    causal_offset: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
    left: Int32,
) -> Int32:
    """First key tile that every row of query tile `m_block` sees in full on a window's
    left side (left >= 0): the tiles before it cross the left edge."""
    last_row = m_block * tile_m + tile_m - 1
    return cute.ceil_div(cutlass.max(last_row + causal_offset - left, 0), tile_n)


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
    window: Window | None = None,
) -> tuple[Int32, Int32]:
    """Key tiles [n_min, n_max) that query tile `m_block` visits (n_max <= n_min: none).

    A query tile past the end of its sequence (packed batches launch for the longest
    one) visits none. Split-KV shares out the visited tiles (a window's band only).
    """
    n_max = n_block_max(m_block, seqlen_q, seqlen_k, causal_offset, tile_m, tile_n, mask, window)
    n_min = n_block_min(m_block, causal_offset, tile_m, tile_n, mask, window)
    if m_block * tile_m >= seqlen_q:
        n_max = Int32(0)
    if const_expr(split_kv):
        if const_expr(mask.window):
            per_split = cute.ceil_div(cutlass.max(n_max - n_min, 0), num_splits)
            n_min = n_min + split_idx * per_split
        else:
            per_split = cute.ceil_div(n_max, num_splits)
            n_min = split_idx * per_split
        n_max = cutlass.min(n_max, n_min + per_split)
    return n_min, n_max
