"""Per-CTA sequence bounds, shared by every attention kernel.

Vocabulary (see `FmhaFwdConfig.varlen_q` / `kv_layout`):
- `offset_q` / `offset_k`: first token of this batch entry along a packed token axis
  (0 when the batch entry has its own axis);
- `seqlen_q` / `seqlen_k`: tokens of this batch entry (from shapes, from `cu_seqlens_*`
  differences, or from `seqused_k`);
- `causal_offset`: key j is visible to query i iff j <= i + causal_offset. Dense problems
  take it from the caller (bottom-right or top-left); per-sequence (varlen) problems align
  bottom-right, seqlen_k - seqlen_q.
- the key tiles a CTA visits: `block_ranges.n_block_range` of these bounds.
- packed work tiles (`packed_tile`): for packed queries the grid enumerates query tiles
  of all sequences on one axis instead of (longest sequence's tiles) x batch. Sequence b
  owns slots [cu_q[b] // tile_m + b, ... + ceil(seqlen_q / tile_m)): these ranges are
  disjoint and increasing in b. The rows past the last sequence, [cu_q[batch], total_q)
  (CUDA-graph padding), are one more entry b = batch without keys (`read_packed`), so
  their tiles write O = 0 and LSE = -inf and the caller needs no memset. So
  total_q // tile_m + batch + 1 slots cover every tile, and at most one slot per entry is
  left empty; a warp finds a slot's entry with one ballot per 32 entries (`packed_batch`).
- single-query decode (`FmhaFwdConfig.single_query`): at most one query token per
  sequence and total_q == batch, so the sequences without a token are exactly as many as
  the tokens past cu_q[batch]. Sequence b reads and writes token cu_q[b] when it has one,
  else token cu_q[batch] + (b - cu_q[b]) (b - cu_q[b] counts the empty sequences before
  b) with no keys: every token is written once, for any valid cu_q, without a memset.
  `offset_q` is that token's index on the batch axis (`query_position`). Batched queries
  (no varlen_q) take the same tiles: sequence b's token is batch entry b. Either way the
  tile's rows are the heads of one token, the sequence's last: `causal_offset` is
  seqlen_k - 1 for every row (`rows_share_position` in the masks).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr


class SeqInfo:
    """Bounds of one (batch entry, query tile): `read` from the metadata tensors once, or
    rebuilt from values another warp read (`FmhaFwdConfig.dynamic_schedule`)."""

    def __init__(
        self,
        offset_q: Int32,
        seqlen_q: Int32,
        offset_k: Int32,
        seqlen_k: Int32,
        causal_offset: Int32,
    ):
        self.offset_q, self.seqlen_q = offset_q, seqlen_q
        self.offset_k, self.seqlen_k = offset_k, seqlen_k
        self.causal_offset = causal_offset

    @staticmethod
    def read(
        batch_idx: Int32,
        seqlen_q_static: Int32,
        seqlen_k_static: Int32,
        causal_offset: Int32,
        cu_seqlens_q: cute.Tensor | None,
        cu_seqlens_k: cute.Tensor | None,
        seqused_k: cute.Tensor | None,
    ) -> SeqInfo:
        """The bounds of `batch_idx`: from the shapes, `cu_seqlens_*` or `seqused_k`."""
        offset_q, seqlen_q = Int32(0), seqlen_q_static
        if cu_seqlens_q is not None:
            offset_q = cu_seqlens_q[batch_idx]
            seqlen_q = cu_seqlens_q[batch_idx + 1] - offset_q
        offset_k, seqlen_k = Int32(0), seqlen_k_static
        if cu_seqlens_k is not None:
            offset_k = cu_seqlens_k[batch_idx]
            seqlen_k = cu_seqlens_k[batch_idx + 1] - offset_k
        if seqused_k is not None:
            seqlen_k = seqused_k[batch_idx]
        per_sequence = any(t is not None for t in (cu_seqlens_q, cu_seqlens_k, seqused_k))
        if per_sequence:
            causal_offset = seqlen_k - seqlen_q
        return SeqInfo(offset_q, seqlen_q, offset_k, seqlen_k, causal_offset)

    @staticmethod
    @cute.jit
    def read_single_query(
        batch_idx: Int32,
        rows: Int32,
        cu_seqlens_q: cute.Tensor,
        seqused_k: cute.Tensor,
    ) -> SeqInfo:
        """`read` for single-query decode (see the module docstring): `rows` query rows
        (the group's heads) of token `offset_q`, with sequence b's keys if it has a token
        and none otherwise."""
        first = cu_seqlens_q[batch_idx]
        offset_q = first
        seqlen_k = seqused_k[batch_idx]
        if cu_seqlens_q[batch_idx + 1] == first:
            last = cute.size(cu_seqlens_q.shape[0]) - 1
            offset_q = cu_seqlens_q[last] + batch_idx - first
            seqlen_k = Int32(0)
        return SeqInfo(offset_q, rows, Int32(0), seqlen_k, seqlen_k - 1)

    @staticmethod
    @cute.jit
    def read_packed(
        batch_idx: Int32,
        total_q: Int32,
        seqlen_k_static: Int32,
        cu_seqlens_q: cute.Tensor,
        cu_seqlens_k: cute.Tensor | None,
        seqused_k: cute.Tensor | None,
    ) -> SeqInfo:
        """`read` for a packed work tile's entry (`packed_tile`): a sequence, or (b =
        batch) the rows past the last one, which have no keys."""
        last = cute.size(cu_seqlens_q.shape[0]) - 1
        info = SeqInfo.read(
            cutlass.min(batch_idx, last - 1),
            total_q,
            seqlen_k_static,
            Int32(0),
            cu_seqlens_q,
            cu_seqlens_k,
            seqused_k,
        )
        offset_q, seqlen_q = info.offset_q, info.seqlen_q
        seqlen_k, causal_offset = info.seqlen_k, info.causal_offset
        if batch_idx == last:
            offset_q = cu_seqlens_q[last]
            seqlen_q = total_q - offset_q
            seqlen_k = Int32(0)
            causal_offset = -seqlen_q
        return SeqInfo(offset_q, seqlen_q, info.offset_k, seqlen_k, causal_offset)


@cute.jit
def packed_tile(
    cu_seqlens_q: cute.Tensor,
    total_q: Int32,
    slot: Int32,
    tile_m: cutlass.Constexpr[int],
    last_first: cutlass.Constexpr[bool],
) -> tuple[Int32, Int32]:
    """(batch entry, query tile) of packed work-tile `slot` (see the module docstring);
    entry `batch` is the rows past the last sequence. Every lane of the calling warp
    takes part (`packed_batch`).

    A slot no tile owns gives a query tile past its entry's end (the CTA does nothing).
    `last_first`: a sequence's tiles are visited from its last one (causal: most keys).
    """
    batch_idx = packed_batch(cu_seqlens_q, slot, tile_m)
    first = cu_seqlens_q[batch_idx]
    m_block = slot - (first // tile_m + batch_idx)
    if const_expr(last_first):
        end = total_q
        if batch_idx < cute.size(cu_seqlens_q.shape[0]) - 1:
            end = cu_seqlens_q[batch_idx + 1]
        tiles = cute.ceil_div(end - first, tile_m)
        if m_block < tiles:
            m_block = tiles - 1 - m_block
    return batch_idx, m_block


@cute.jit
def packed_batch(cu_seqlens_q: cute.Tensor, slot: Int32, tile_m: cutlass.Constexpr[int]) -> Int32:
    """The batch entry owning packed work-tile `slot`: the largest b <= batch with
    start(b) = cu_seqlens_q[b] // tile_m + b <= slot (start(0) = 0 <= slot; b = batch:
    the rows past the last sequence).

    One warp, all lanes: a round reads the starts of 32 entries at once (lane i: entry
    base + i) and counts those at or before `slot` with a ballot. Starts increase with
    b, so the entries counted form a prefix: a round that counts fewer than 32 ends the
    search. Up to 32 sequences cost one load latency instead of a binary search's
    log2(batch) dependent loads, on every tile of every warp.
    """
    lane = cute.arch.lane_idx()
    entries = cute.size(cu_seqlens_q.shape[0])  # batch + 1
    counted = Int32(0)
    base = Int32(0)
    while base < entries:
        entry = base + lane
        at_or_before = Int32(0)
        # Nested, not `and`: the load must not run past the array's end.
        if entry < entries:  # noqa: SIM102
            if cu_seqlens_q[entry] // tile_m + entry <= slot:
                at_or_before = Int32(1)
        found = cute.arch.popc(cute.arch.vote_ballot_sync(at_or_before != 0))
        counted += found
        base += cute.arch.WARP_SIZE
        if found < cute.arch.WARP_SIZE:
            base = entries
    return cutlass.max(counted - 1, 0)


def query_position(
    batch_idx: Int32, info: SeqInfo, varlen_q: bool, single_query: bool
) -> tuple[Int32 | int, Int32 | int]:
    """(batch index, first row) of a work tile's queries, outputs and LSE: single-query
    decode tokens are batch entries (`offset_q`, from row 0); packed queries live in batch
    entry 0 from row `offset_q`; otherwise entry `batch_idx` (`offset_q` is 0)."""
    if single_query and varlen_q:
        return info.offset_q, 0
    return (0 if varlen_q else batch_idx), info.offset_q
