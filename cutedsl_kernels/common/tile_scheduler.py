"""Which work tiles each CTA of an attention kernel runs, and in which order.

A work tile is query tile `m_block` of one (head, batch entry[, split]) with its sequence
bounds and the key tiles it visits (`WorkTile`). Three schedules, chosen at compile time
from the `FmhaFwdConfig`:

- one tile per CTA (not `persistent`): grid (query tiles, heads, batch [x splits]).
  Packed queries (`varlen_q` without split-KV) enumerate (query tile, head) of all
  sequences on grid x instead, heads fastest (`seqlen.packed_tile`, `tile_coords`), so
  the CTAs dispatched together share a query tile's length; tiles past a sequence's end
  exit without work.
- static persistent: `num_ctas` CTAs (one per SM), each taking work units u, u + grid,
  ... in (unit, head, batch) order. A unit is a query tile, or (causal) the j-th tile
  from the last followed by the j-th from the first: together they have the same number
  of key tiles for every j, so the round robin is balanced. Units of one (head, batch)
  are consecutive, so CTAs that run at the same time share its K/V in L2.
- dynamic persistent (`dynamic_schedule`: packed queries and keys, whose tiles are
  unequal; long causal problems, where equal units leave the last round part-empty):
  the producer warp takes each next tile number from a zeroed global counter (atomic
  add) once it has issued this tile's loads, resolves it (sequence bounds, key-tile
  range) and passes the result to the consumers through shared memory (`WorkTile.words`
  over a small pipeline), so only one warp waits on the metadata loads. Tile numbers go
  out in `tile_coords` order: (head, batch) pairs in groups whose K/V take up to
  `l2_group_mb` MiB, and within a group query tiles longest first, each across the
  group's heads.

Causal query tiles are visited from the last (most keys) to the first. The kernel owns
the work done per tile: `run` calls its `step(work, *role_args, *states)`, which returns
the pipeline states past the tile (they carry over from tile to tile).
"""

from __future__ import annotations

from collections.abc import Callable

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Int32, const_expr

from cutedsl_kernels.common.block_ranges import Window, n_block_range
from cutedsl_kernels.common.dtypes import dsl_type
from cutedsl_kernels.common.grid import fold_batch, unfold_batch
from cutedsl_kernels.common.seqlen import SeqInfo, packed_tile
from cutedsl_kernels.config import FmhaFwdConfig


class WorkTile:
    """One CTA work tile: query tile `m_block` of (`head_idx`, `batch_idx`[, `split_idx`]),
    its sequence bounds and the key tiles [n_min, n_max) it visits."""

    # `words`: tile number, m_block, head, batch, split, the five SeqInfo bounds, n_min, n_max.
    NUM_WORDS = 12

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


class SchedulerParams:
    """The runtime values a schedule reads, gathered once per CTA.

    Attributes:
        mQ: the query tensor as (seqlen_q, head_dim, heads, batch) (its shape: heads and
            batch entries; packed: total_q).
        mK: the key tensor as (seqlen_k, ...) (its shape: keys of dense batch entries).
        cu_seqlens_q, cu_seqlens_k, seqused_k: the sequence metadata a layout has, or None.
        num_m_blocks: query tiles per (head, batch) (packed: slots, see `packed_tile`).
        l2_group: (head, batch) pairs per group of the dynamic order (`l2_group`).
        causal_offset: the dense problems' diagonal offset (per-sequence layouts derive it).
        num_splits: split-KV factor (1 otherwise).
        tile_counter: (dynamic) the zeroed global tile counter.
        pipeline_sched, sched_tiles: (dynamic) the producer -> consumer work-tile pipeline
            and its shared-memory words (NUM_WORDS x stages).
        window: (`MaskSpec.window`) the band's sizes, else None.
    """

    def __init__(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        cu_seqlens_q: cute.Tensor | None,
        cu_seqlens_k: cute.Tensor | None,
        seqused_k: cute.Tensor | None,
        num_m_blocks: Int32,
        l2_group: Int32,
        causal_offset: Int32,
        num_splits: Int32,
        tile_counter: cute.Tensor | None,
        pipeline_sched: pipeline.PipelineAsync | None,
        sched_tiles: cute.Tensor,
        window: Window | None = None,
    ):
        self.mQ, self.mK = mQ, mK
        self.cu_seqlens_q, self.cu_seqlens_k, self.seqused_k = cu_seqlens_q, cu_seqlens_k, seqused_k
        self.num_m_blocks, self.l2_group = num_m_blocks, l2_group
        self.causal_offset, self.num_splits = causal_offset, num_splits
        self.tile_counter, self.pipeline_sched, self.sched_tiles = (
            tile_counter, pipeline_sched, sched_tiles,
        )  # fmt: skip
        self.window = window


class TileScheduler:
    """The schedule of one kernel configuration (see the module docstring).

    Args:
        config: the kernel's configuration (tiles, mask, layout, schedule switches).
        sched_stages: (dynamic) work tiles in flight from the producer warp to the
            consumers.
    """

    def __init__(self, config: FmhaFwdConfig, sched_stages: int):
        self.tile_m, self.tile_n = config.tile_m, config.tile_n
        self.mask = config.mask
        self.causal = config.mask.causal
        self.varlen_q, self.split_kv = config.varlen_q, config.split_kv
        # Single-query decode: one tile per (KV head, sequence), as without varlen_q.
        self.single_query = config.single_query
        self.persistent, self.dynamic = config.persistent, config.dynamic_schedule
        # Packed queries: one grid axis over the query tiles of all sequences.
        self.packed_tiles = config.varlen_q and not config.split_kv and not config.single_query
        self.l2_group_mb = config.l2_group_mb
        # K and V bytes of one key row (`l2_group`).
        self.kv_row_bytes = (
            (config.head_dim + config.value_head_dim) * dsl_type(config.dtypes.qk).width // 8
        )
        self.sched_stages = sched_stages

    # ------------------------------------------------------------------ host side
    def launch_grid(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mCuSeqlensQ: cute.Tensor | None,
        max_seqlen_q: Int32,
        num_splits: Int32,
        num_ctas: Int32,
    ) -> tuple[list, Int32, Int32]:
        """(grid, num_m_blocks, l2_group) of a launch; tensors as in `SchedulerParams`."""
        heads = cute.size(mQ.shape[2])
        if const_expr(self.packed_tiles):
            batch = 1  # (see `packed_tile`)
            num_m_blocks = cute.size(mQ.shape[0]) // self.tile_m + cute.size(mCuSeqlensQ)
        elif const_expr(self.varlen_q and not self.single_query):
            num_m_blocks = cute.ceil_div(max_seqlen_q, self.tile_m)
            batch = cute.size(mCuSeqlensQ.shape[0]) - 1
        else:
            num_m_blocks = cute.ceil_div(cute.size(mQ.shape[0]), self.tile_m)
            batch = cute.size(mQ.shape[3])
        # Longest key range of a (head, batch) pair (packed: max_seqlen_q stands for it).
        key_rows = max_seqlen_q if const_expr(self.packed_tiles) else cute.size(mK.shape[0])
        l2_group = self.l2_group(heads * batch, key_rows)
        if const_expr(self.split_kv):
            batch = batch * num_splits
        grid_x, grid_z = fold_batch(num_m_blocks, batch)
        grid = [grid_x, heads, grid_z]
        if const_expr(self.packed_tiles):
            # Heads vary fastest: the CTAs dispatched together share a query tile's length
            # (hence work), and the long sequences' tiles are not left for the end.
            grid = [num_m_blocks * heads, 1, 1]
        if const_expr(self.persistent):
            num_units = num_m_blocks * heads * batch  # tiles
            if const_expr(not self.dynamic):
                num_units = self.units_per_head(num_m_blocks) * heads * batch
            grid = [cutlass.min(cutlass.max(num_ctas, 1), num_units), 1, 1]
        return grid, num_m_blocks, l2_group

    def l2_group(self, num_pairs: Int32, key_rows: Int32) -> Int32:
        """(head, batch) pairs per group of the dynamic tile order (`tile_coords`): as many
        as take up to `l2_group_mb` MiB of K/V with `key_rows` keys each (at least one);
        every pair when l2_group_mb is 0."""
        if const_expr(self.l2_group_mb == 0):
            return num_pairs
        kv_rows = (self.l2_group_mb << 20) // self.kv_row_bytes
        return cutlass.max(Int32(kv_rows) // cutlass.max(key_rows, 1), 1)

    def units_per_head(self, num_m_blocks: Int32) -> Int32:
        """Work units of one (head, batch) in a static persistent launch."""
        if const_expr(self.causal):
            return (num_m_blocks + 1) // 2
        return num_m_blocks

    # ------------------------------------------------------------------ device side
    @cute.jit
    def run(
        self,
        producer: cutlass.Constexpr[bool],
        step: Callable,
        role_args: tuple,
        states: tuple,
        params: SchedulerParams,
    ):
        """This CTA's work tiles, each through `step(work, *role_args, *states)` (which
        returns the states past the tile): its grid block's, or (persistent) those of
        work units block, block + grid, ..., or (dynamic) those the counter hands out.
        `producer`: the calling warp is the producer (dynamic: it resolves the tiles)."""
        num_m_blocks = params.num_m_blocks
        block_m, head_idx, batch_split = cute.arch.block_idx()
        num_heads = cute.size(params.mQ.shape[2])
        if const_expr(self.dynamic):
            # Packed slots that no sequence owns (up to one per sequence, see
            # `seqlen.packed_tile`) have no rows: the producer skips them.
            num_tiles = num_m_blocks * num_heads * cute.size(params.mQ.shape[3])
            role = pipeline.PipelineUserType.Consumer
            if const_expr(producer):
                role = pipeline.PipelineUserType.Producer
            sched_state = pipeline.make_pipeline_state(role, self.sched_stages)
            pipeline_sched, sched_tiles = params.pipeline_sched, params.sched_tiles
            if const_expr(producer):
                tile = block_m
                while tile < num_tiles:
                    block, head_idx, batch_idx = self.tile_coords(
                        tile, num_m_blocks, num_heads, params.l2_group, params
                    )
                    work = self.work_tile(block, head_idx, batch_idx, params)
                    if work.m_block * self.tile_m < work.info.seqlen_q:
                        sched_state = self.give_tile(
                            pipeline_sched, sched_tiles, sched_state, work.words(tile)
                        )
                        states = step(work, *role_args, *states)
                    tile = next_tile(params.tile_counter)
                self.give_tile(pipeline_sched, sched_tiles, sched_state, (tile,))  # the end
            else:
                pipeline_sched.consumer_wait(sched_state)
                tile = sched_tiles[0, sched_state.index]
                while tile < num_tiles:
                    work = WorkTile.from_words(sched_tiles[None, sched_state.index])
                    sched_state = self.release_tile(pipeline_sched, sched_state)
                    states = step(work, *role_args, *states)
                    pipeline_sched.consumer_wait(sched_state)
                    tile = sched_tiles[0, sched_state.index]
        elif const_expr(self.persistent):
            units_per_head = self.units_per_head(num_m_blocks)
            num_units = units_per_head * num_heads * cute.size(params.mQ.shape[3])
            tiles_per_unit = 2 if const_expr(self.causal) else 1
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
                work = self.work_tile(block, head_idx, batch_idx, params)
                if const_expr(self.causal):
                    if half == 0 or block != j:  # the middle tile of an odd count is alone
                        states = step(work, *role_args, *states)
                else:
                    states = step(work, *role_args, *states)
                slot += 1
                if half == tiles_per_unit - 1:
                    slot += (cute.arch.grid_dim()[0] - 1) * tiles_per_unit
        else:
            if const_expr(self.packed_tiles):  # grid x: (query tile slot, head)
                block_m, head_idx, _ = self.tile_coords(
                    block_m, num_m_blocks, num_heads, params.l2_group, params
                )
            else:  # a batch past the grid's z limit runs folded into x
                block_m, batch_split = unfold_batch(block_m, batch_split, num_m_blocks)
            step(self.work_tile(block_m, head_idx, batch_split, params), *role_args, *states)

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
        self,
        tile: Int32,
        num_m_blocks: Int32,
        num_heads: Int32,
        group: Int32,
        params: SchedulerParams,
    ) -> tuple[Int32, Int32, Int32]:
        """Grid block (block_m, head, batch) of dynamic work tile number `tile` (packed:
        of grid block `tile`, whose block_m is a packed slot and batch 0).

        (head, batch) pairs in groups of `group` (`l2_group`), group by group; within a
        group, query tiles from the first grid block (causal: the most keys) to the last,
        each across the group's heads. So the longest tiles of a group start first and its
        shortest fill the end, while the tiles in flight read the K/V of a few heads only
        (from L2).
        """
        num_pairs = num_heads * cute.size(params.mQ.shape[3])
        first = tile // (group * num_m_blocks) * group  # first (head, batch) of the group
        in_group = cutlass.min(group, num_pairs - first)
        local = tile - first * num_m_blocks
        block = local // in_group
        pair = first + local - block * in_group
        batch_idx = pair // num_heads
        return block, pair - batch_idx * num_heads, batch_idx

    @cute.jit
    def work_tile(
        self, block_m: Int32, head_idx: Int32, batch_split: Int32, params: SchedulerParams
    ) -> WorkTile:
        """Query tile, head, sequence (and split) of grid block (block_m, head, batch_split):
        causal tiles with more keys first (they take longest)."""
        mQ, mK = params.mQ, params.mK
        m_block = block_m
        batch_idx, split_idx = batch_split, Int32(0)
        if const_expr(self.packed_tiles):
            batch_idx, m_block = packed_tile(
                params.cu_seqlens_q, mQ.shape[0], block_m, self.tile_m, self.causal
            )
        elif const_expr(self.causal):
            m_block = params.num_m_blocks - 1 - block_m
        if const_expr(self.split_kv):
            batch_idx = batch_split // params.num_splits
            split_idx = batch_split - batch_idx * params.num_splits
        if const_expr(self.single_query and self.varlen_q):
            info = SeqInfo.read_single_query(
                batch_idx, mQ.shape[0], params.cu_seqlens_q, params.seqused_k
            )
        elif const_expr(self.packed_tiles):
            info = SeqInfo.read_packed(
                batch_idx,
                mQ.shape[0],
                mK.shape[0],
                params.cu_seqlens_q,
                params.cu_seqlens_k,
                params.seqused_k,
            )
        else:
            info = SeqInfo.read(
                batch_idx,
                mQ.shape[0],
                mK.shape[0],
                params.causal_offset,
                params.cu_seqlens_q,
                params.cu_seqlens_k,
                params.seqused_k,
            )
            if const_expr(self.single_query):  # batched decode: rows are one token's heads
                info = SeqInfo(
                    info.offset_q, info.seqlen_q, info.offset_k, info.seqlen_k, info.seqlen_k - 1
                )
        n_min, n_max = n_block_range(
            m_block,
            info.seqlen_q,
            info.seqlen_k,
            info.causal_offset,
            self.tile_m,
            self.tile_n,
            self.mask,
            split_idx,
            params.num_splits,
            self.split_kv,
            params.window,
        )
        return WorkTile(m_block, head_idx, batch_idx, split_idx, info, n_min, n_max)


@cute.jit
def next_tile(counter: cute.Tensor) -> Int32:
    """The next work tile number from the zero-initialized global `counter` (one warp):
    every CTA starts with its own block index, so numbers start at the grid size."""
    ticket = Int32(0)
    if cute.arch.lane_idx() == 0:
        ticket = cute.arch.atomic_add(counter.iterator, Int32(1))
    return cute.arch.shuffle_sync(ticket, 0) + cute.arch.grid_dim()[0]
