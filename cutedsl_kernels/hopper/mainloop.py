"""The consumer main loop of the sm90 FMHA forward: one key tile per step.

Two schedules, chosen at compile time:

serial (`intra_wg_overlap=False`), per key tile n:
    wait K[n]; S = Q K[n]^T; release K; mask; softmax; O *= scale; P = S
    wait V[n]; O += P V[n]; release V

overlapped (`intra_wg_overlap=True`): the PV GEMM of tile n+1 (already visited) runs on
the tensor cores while the softmax of tile n runs on the ALUs:
    first:  S = Q K[n0]^T; softmax; P = S                       (no PV yet)
    step n: issue S' = Q K[n]^T and O += P V[n+1]; wait S'; release K; mask; softmax(S')
            wait PV; release V; O *= scale; P = S'
    last:   O += P V[n_last]

With `pingpong` (overlapped schedule, 2 or 3 MMA warpgroups), the warpgroups take turns,
round robin, issuing their GEMMs (named barriers WG1_TURN..WG3_TURN), so one warpgroup's
softmax hides under the others' GEMMs.

FP8 kernels (`fp8`): P is rounded to E4M3 in the 8-bit A operand's layout
(`convert.convert_p_fp8`), and (`two_level`) each tile's PV product is accumulated in a
zeroed accumulator of its own, then added to O in float32 (two-level accumulation: the
FP8 tensor cores keep fewer bits than float32 when they add into an accumulator, so O
over many key tiles would drift).

FP8 caches (`converts_kv`, one MMA warpgroup): K and V arrive in their stages as stored
(E4M3) and the warpgroup converts each tile into one K and one V tile of Q's type before
the GEMM that reads it (`convert.convert_tile_vectorized`, in 8-element vectors; V's
rows past the data become zeros, which is `zero_v_tail`'s job otherwise), then releases
the stage at once. The GEMMs read
the converted tiles, whose previous readers have completed by then (every schedule waits
for a tile's GEMMs before it converts the next).

With `zero_v_tail` (caches, whose slots past the used length may hold anything, NaN
included; packed keys, whose rows past the last sequence may be padding), each warpgroup
zeroes the V rows past the data in the first (top) tile before its PV GEMM: a masked key
has P = 0, but 0 * NaN would still poison O.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import warpgroup

from cutedsl_kernels.common.block_ranges import (
    Window,
    first_masked_n_block,
    first_unmasked_left_n_block,
)
from cutedsl_kernels.common.named_barriers import NamedBarrier
from cutedsl_kernels.common.seqlen import SeqInfo
from cutedsl_kernels.config import MaskSpec
from cutedsl_kernels.hopper.convert import (
    convert_p_fp8,
    convert_pairs,
    convert_tile,
    convert_tile_vectorized,
)
from cutedsl_kernels.hopper.fragments import acc_as_operand_a
from cutedsl_kernels.hopper.limits import THREADS_PER_WARPGROUP
from cutedsl_kernels.hopper.softmax import OnlineSoftmax, apply_mask, apply_softcap


@cute.jit
def wgmma(
    tiled_mma: cute.TiledMma,
    acc: cute.Tensor,
    tCrA: cute.Tensor,
    tCrB: cute.Tensor,
    zero_init: cutlass.Constexpr[bool],
    wait_pending: cutlass.Constexpr[int],
):
    """acc (+)= A @ B over all K slices as one wgmma group.

    `wait_pending` >= 0 waits until at most that many groups are in flight; -1 returns
    right after issuing.
    """
    warpgroup.fence()
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for k in cutlass.range_constexpr(cute.size(tCrA.shape[2])):
        cute.gemm(atom, acc, tCrA[None, None, k], tCrB[None, None, k], acc)
        atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    if const_expr(wait_pending >= 0):
        warpgroup.wait_group(wait_pending)


@cute.jit
def start_turns(pingpong: cutlass.Constexpr[bool], wg_idx: Int32):
    """Warpgroup 0 goes first: pre-arrive on its own turn barrier. Called once per CTA:
    turns then pass round robin across all of its work tiles (every warpgroup takes the
    same number of turns per tile)."""
    # Nested on purpose: a const_expr must not share an `if` with a runtime test.
    if const_expr(pingpong):  # noqa: SIM102
        if wg_idx == 0:
            cute.arch.barrier_arrive(
                barrier_id=int(NamedBarrier.WG1_TURN),
                number_of_threads=2 * THREADS_PER_WARPGROUP,
            )


@dataclass(frozen=True)
class MainloopSettings:
    """Compile-time settings of the main loop (one per kernel configuration).

    Attributes:
        tile_m, tile_n: query rows of a CTA tile, key rows of a step.
        v_dtype: V's DSL element type (`zero_v_tail` writes zeros of it).
        mask: the mask features compiled in.
        overlap: the overlapped schedule (`intra_wg_overlap`), else the serial one.
        pingpong: the MMA warpgroups take turns issuing GEMMs.
        num_mma_warpgroups: MMA warpgroups of a CTA.
        zero_v_tail: zero the V rows past the data (`Sm90Mainloop`'s `v_rows`) in the
            first visited tile (caches, whose unused slots may hold anything; packed keys,
            whose rows past the last sequence may be padding).
        rows_share_position: the tile's rows are the query heads of one token
            (`FmhaFwdConfig.single_query`): masks place every row at the tile's first.
        fp8: P in E4M3 (see the module docstring).
        two_level: (fp8) two-level accumulation of O (see the module docstring).
        converts_kv: K and V stages hold an FP8 cache's bytes, converted by this
            warpgroup (see the module docstring).
        convert_vectorized: (`converts_kv`) convert in 8-element vectors
            (`convert.convert_tile_vectorized`), else element by element.
    """

    tile_m: int
    tile_n: int
    v_dtype: type
    mask: MaskSpec
    overlap: bool
    pingpong: bool
    num_mma_warpgroups: int
    zero_v_tail: bool
    rows_share_position: bool = False
    fp8: bool = False
    two_level: bool = False
    converts_kv: bool = False
    convert_vectorized: bool = True


@dataclass
class MmaOperands:
    """One MMA warpgroup's GEMMs and operand views, loop-invariant over a work tile.

    Attributes:
        tiled_mma_qk, tiled_mma_pv: S = Q K^T (smem x smem) and O += P V (P in registers).
        tSrQ: (MMA, MMA_M, MMA_K) this tile's Q stage.
        tSrK: (MMA, MMA_N, MMA_K, STAGE) the K stages.
        tOrVt: (MMA, MMA_N, MMA_K, STAGE) the V stages as V^T.
        tOrP: (MMA, MMA_M, MMA_K) P as the register A operand.
        tScS, t0ScS: this thread's and thread 0's partitions of the score tile's
            coordinates (for the mask).
        sV: the V stages (`zero_v_tail` writes into them).
        converted: (`converts_kv`) the (K, V) tiles of Q's type the GEMMs read, each with
            one stage; None otherwise.
    """

    tiled_mma_qk: cute.TiledMma
    tiled_mma_pv: cute.TiledMma
    tSrQ: cute.Tensor
    tSrK: cute.Tensor
    tOrVt: cute.Tensor
    tOrP: cute.Tensor
    tScS: cute.Tensor
    t0ScS: cute.Tensor
    sV: cute.Tensor
    sK: cute.Tensor | None = None
    converted: tuple | None = None


class Sm90Mainloop:
    """The steps over one work tile's key tiles, for one MMA warpgroup.

    Args:
        settings: the kernel's `MainloopSettings`.
        operands: this warpgroup's `MmaOperands` for the tile.
        acc_O: (MMA, MMA_M, MMA_N) the output accumulator (rescaled and accumulated).
        softmax: the rows' `OnlineSoftmax` state.
        pipelines: (pipeline_k, pipeline_v).
        m_block, info: the query tile and its sequence bounds (`SeqInfo`).
        wg_idx: this MMA warpgroup's index.
        v_rows: (`zero_v_tail`) key rows from the sequence's first that hold data, at
            least its own (packed keys: up to the last sequence's end; V rows past them
            may be padding); None: the sequence's own rows.
        window: (`MaskSpec.window`) the band's runtime sizes.
        softcap_pre_scale: (`MaskSpec.softcap`) softmax_scale / softcap, the factor of the
            scores inside the tanh.
    """

    def __init__(
        self,
        settings: MainloopSettings,
        operands: MmaOperands,
        acc_O: cute.Tensor,
        softmax: OnlineSoftmax,
        pipelines: tuple,
        m_block: Int32,
        info: SeqInfo,
        wg_idx: Int32,
        v_rows: Int32 | None = None,
        window: Window | None = None,
        softcap_pre_scale: Float32 | None = None,
    ):
        self.settings, self.operands = settings, operands
        self.tile_m, self.tile_n = settings.tile_m, settings.tile_n
        self.mask, self.pingpong = settings.mask, settings.pingpong
        self.num_mma_warpgroups = settings.num_mma_warpgroups
        self.tiled_mma_qk, self.tiled_mma_pv = operands.tiled_mma_qk, operands.tiled_mma_pv
        self.tSrQ, self.tSrK = operands.tSrQ, operands.tSrK
        self.tOrVt, self.tOrP = operands.tOrVt, operands.tOrP
        self.tScS, self.t0ScS = operands.tScS, operands.t0ScS
        self.acc_O, self.softmax = acc_O, softmax
        self.pipeline_k, self.pipeline_v = pipelines
        self.m_block, self.seqlen_k, self.causal_offset = m_block, info.seqlen_k, info.causal_offset
        self.wg_idx = wg_idx
        self.v_rows = info.seqlen_k if v_rows is None else v_rows
        self.window, self.softcap_pre_scale = window, softcap_pre_scale
        # Two-level accumulation: each tile's PV product, added to acc_O in float32.
        self.acc_PV = cute.make_rmem_tensor_like(acc_O) if settings.two_level else acc_O

    # ------------------------------------------------------------ warpgroup turns
    @cute.jit
    def wait_turn(self):
        if const_expr(self.pingpong):
            cute.arch.barrier(
                barrier_id=int(NamedBarrier.WG1_TURN) + self.wg_idx,
                number_of_threads=2 * THREADS_PER_WARPGROUP,
            )

    @cute.jit
    def pass_turn(self):
        if const_expr(self.pingpong):
            next_wg = self.wg_idx + 1
            if const_expr(self.num_mma_warpgroups == 2):
                next_wg = 1 - self.wg_idx
            else:
                next_wg = 0 if next_wg == self.num_mma_warpgroups else next_wg
            cute.arch.barrier_arrive(
                barrier_id=int(NamedBarrier.WG1_TURN) + next_wg,
                number_of_threads=2 * THREADS_PER_WARPGROUP,
            )

    # ------------------------------------------------------------ pieces
    @cute.jit
    def probabilities_to_operand(self, acc_S: cute.Tensor):
        """P (the softmax's output in acc_S) -> the PV GEMM's register A operand."""
        if const_expr(self.settings.fp8):
            convert_p_fp8(acc_S, self.tOrP)
        else:
            convert_pairs(acc_as_operand_a(acc_S), self.tOrP)

    @cute.jit
    def pv_gemm(self, v_stage: Int32, wait_pending: cutlass.Constexpr[int]):
        """O += P V[v_stage]; two-level: into the zeroed acc_PV (`add_pv` adds it to O)."""
        wgmma(
            self.tiled_mma_pv,
            self.acc_PV,
            self.tOrP,
            self.tOrVt[None, None, None, v_stage],
            self.settings.two_level,
            wait_pending,
        )

    @cute.jit
    def add_pv(self):
        """Two-level: O += the last PV product, in float32 (after its wgmma completed)."""
        if const_expr(self.settings.two_level):
            self.acc_O.store(self.acc_O.load() + self.acc_PV.load())

    def new_scores(self) -> cute.Tensor:
        return cute.make_rmem_tensor(
            self.tiled_mma_qk.partition_shape_C((self.tile_m, self.tile_n)), Float32
        )

    @cute.jit
    def softcap_scores(self, acc_S: cute.Tensor):
        if const_expr(self.mask.softcap):
            apply_softcap(acc_S, self.softcap_pre_scale)

    @cute.jit
    def mask_scores(self, acc_S: cute.Tensor, n_block: Int32):
        apply_mask(
            acc_S,
            self.tScS,
            self.t0ScS,
            self.m_block,
            n_block,
            self.seqlen_k,
            self.causal_offset,
            self.tile_m,
            self.tile_n,
            self.mask,
            self.window,
            self.settings.rows_share_position,
        )

    @cute.jit
    def k_operand(self, kv_state: pipeline.PipelineState):
        """Wait for K's stage; return the stage of tSrK the QK GEMM reads (`converts_kv`:
        the stage is converted into the K tile and released, and that tile's stage 0)."""
        self.pipeline_k.consumer_wait(kv_state)
        stage = kv_state.index
        if const_expr(self.settings.converts_kv):
            sK_mma = self.operands.converted[0]
            self.convert_stage(self.operands.sK[None, None, stage], sK_mma[None, None, 0], None)
            self.pipeline_k.consumer_release(kv_state)
            stage = Int32(0)
        return stage

    @cute.jit
    def release_k(self, kv_state: pipeline.PipelineState):
        """Release K's stage after the QK GEMM (`converts_kv`: released at conversion)."""
        if const_expr(not self.settings.converts_kv):
            self.pipeline_k.consumer_release(kv_state)

    @cute.jit
    def v_operand(self, v_state: pipeline.PipelineState, n_block: Int32):
        """Wait for V's stage (key tile `n_block`); return the stage of tOrVt the PV GEMM
        reads (`converts_kv`: converted, rows past `v_rows` zeroed, released: stage 0)."""
        self.pipeline_v.consumer_wait(v_state)
        stage = v_state.index
        if const_expr(self.settings.converts_kv):
            sV_mma = self.operands.converted[1]
            valid = self.v_rows - n_block * self.tile_n
            self.convert_stage(self.operands.sV[None, None, stage], sV_mma[None, None, 0], valid)
            self.pipeline_v.consumer_release(v_state)
            stage = Int32(0)
        return stage

    @cute.jit
    def release_v(self, v_state: pipeline.PipelineState):
        """Release V's stage after the PV GEMM (`converts_kv`: released at conversion)."""
        if const_expr(not self.settings.converts_kv):
            self.pipeline_v.consumer_release(v_state)

    @cute.jit
    def convert_stage(self, src: cute.Tensor, dst: cute.Tensor, valid_rows: Int32 | None):
        """This warpgroup converts one stored tile into the GEMMs' tile, then makes its
        stores visible to wgmma and waits for all of its threads."""
        lane = cute.arch.thread_idx()[0] % THREADS_PER_WARPGROUP
        if const_expr(self.settings.convert_vectorized):
            convert_tile_vectorized(src, dst, lane, THREADS_PER_WARPGROUP, valid_rows)
        else:
            convert_tile(src, dst, lane, THREADS_PER_WARPGROUP, valid_rows)
        cute.arch.fence_view_async_shared()  # generic stores -> wgmma (async proxy)
        cute.arch.barrier(
            barrier_id=int(NamedBarrier.WG1_V_TAIL) + self.wg_idx,
            number_of_threads=THREADS_PER_WARPGROUP,
        )

    @cute.jit
    def zero_v_tail(self, kv_state: pipeline.PipelineState, n_block: Int32):
        """Zero V rows >= `v_rows` of tile `n_block` (this warpgroup's view, then fence)."""
        # (Converting kernels zero them as they convert: `v_operand`.)
        if const_expr(self.settings.zero_v_tail and not self.settings.converts_kv):
            sV = self.operands.sV[None, None, kv_state.index]
            valid = self.v_rows - n_block * self.tile_n
            if valid < self.tile_n:
                # Only a tile with rows to zero waits for V here, ahead of its PV GEMM.
                self.pipeline_v.consumer_wait(kv_state)
                head_dim = cute.size(sV, mode=[1])
                lane = cute.arch.thread_idx()[0] % THREADS_PER_WARPGROUP
                for e in cutlass.range(lane, self.tile_n * head_dim, THREADS_PER_WARPGROUP):
                    row = e // head_dim
                    if row >= valid:
                        sV[row, e - row * head_dim] = self.settings.v_dtype(0.0)
                cute.arch.fence_view_async_shared()  # generic stores -> wgmma (async proxy)
                cute.arch.barrier(
                    barrier_id=int(NamedBarrier.WG1_V_TAIL) + self.wg_idx,
                    number_of_threads=THREADS_PER_WARPGROUP,
                )

    # ------------------------------------------------------------ serial schedule
    @cute.jit
    def serial_step(
        self,
        kv_state: pipeline.PipelineState,
        n_block: Int32,
        is_first: cutlass.Constexpr[bool],
        masked: cutlass.Constexpr[bool],
    ) -> pipeline.PipelineState:
        k_stage = self.k_operand(kv_state)
        acc_S = self.new_scores()
        wgmma(
            self.tiled_mma_qk,
            acc_S,
            self.tSrQ,
            self.tSrK[None, None, None, k_stage],
            True,
            0,
        )
        self.release_k(kv_state)
        self.softcap_scores(acc_S)
        if const_expr(masked):
            self.mask_scores(acc_S, n_block)
        row_scale = self.softmax.update(acc_S, is_first)
        if const_expr(not is_first):
            OnlineSoftmax.rescale(self.acc_O, row_scale)
        self.probabilities_to_operand(acc_S)
        if const_expr(is_first):
            self.zero_v_tail(kv_state, n_block)
        v_stage = self.v_operand(kv_state, n_block)
        self.pv_gemm(v_stage, 0)
        self.release_v(kv_state)
        self.add_pv()
        kv_state.advance()
        return kv_state

    # ------------------------------------------------------------ overlapped schedule
    @cute.jit
    def first_block(self, kv_state: pipeline.PipelineState, n_block: Int32):
        """S = Q K^T of the first visited tile, softmax, P; its PV comes with the next step."""
        k_stage = self.k_operand(kv_state)
        acc_S = self.new_scores()
        wgmma(
            self.tiled_mma_qk,
            acc_S,
            self.tSrQ,
            self.tSrK[None, None, None, k_stage],
            True,
            0,
        )
        self.release_k(kv_state)
        self.softcap_scores(acc_S)
        self.mask_scores(acc_S, n_block)
        self.softmax.update(acc_S, True)
        self.probabilities_to_operand(acc_S)
        self.zero_v_tail(kv_state, n_block)

    @cute.jit
    def overlapped_step(
        self,
        kv_state: pipeline.PipelineState,
        n_block: Int32,
        masked: cutlass.Constexpr[bool],
    ) -> pipeline.PipelineState:
        """QK^T of tile `n_block` overlapped with PV of the tile visited before it."""
        v_state = kv_state.clone()
        kv_state.advance()
        k_stage = self.k_operand(kv_state)
        acc_S = self.new_scores()
        self.wait_turn()
        wgmma(
            self.tiled_mma_qk,
            acc_S,
            self.tSrQ,
            self.tSrK[None, None, None, k_stage],
            True,
            -1,
        )
        v_stage = self.v_operand(v_state, n_block + 1)
        self.pv_gemm(v_stage, -1)
        self.pass_turn()
        warpgroup.wait_group(1)  # S is ready; PV may still run
        self.release_k(kv_state)
        self.softcap_scores(acc_S)
        if const_expr(masked):
            self.mask_scores(acc_S, n_block)
        row_scale = self.softmax.update(acc_S, False)
        warpgroup.wait_group(0)
        self.release_v(v_state)
        self.add_pv()
        OnlineSoftmax.rescale(self.acc_O, row_scale)
        self.probabilities_to_operand(acc_S)
        return kv_state

    @cute.jit
    def last_pv(self, kv_state: pipeline.PipelineState, n_block: Int32):
        """O += P V for the last visited tile, `n_block`."""
        v_stage = self.v_operand(kv_state, n_block)
        self.pv_gemm(v_stage, 0)
        self.release_v(kv_state)
        self.add_pv()

    # ------------------------------------------------------------ whole loop
    @cute.jit
    def steps(
        self,
        kv_state: pipeline.PipelineState,
        n_from: Int32,
        n_to: Int32,
        masked: cutlass.Constexpr[bool],
    ) -> pipeline.PipelineState:
        """Key tiles n_from-1 down to n_to (none when n_to >= n_from), after the first."""
        for i in cutlass.range(n_from - n_to, unroll=1):
            if const_expr(self.settings.overlap):
                kv_state = self.overlapped_step(kv_state, n_from - 1 - i, masked)
            else:
                kv_state = self.serial_step(kv_state, n_from - 1 - i, False, masked)
        return kv_state

    @cute.jit
    def run(
        self,
        kv_state: pipeline.PipelineState,
        n_min: Int32,
        n_max: Int32,
    ) -> pipeline.PipelineState:
        """Visit key tiles n_max-1 .. n_min (n_max > n_min): masked ones first; returns the
        pipeline state past the last of them."""
        # The top key tile may be partial (and, causal, crosses the diagonal).
        overlap = self.settings.overlap
        n_top = n_max - 1
        if const_expr(overlap):
            self.first_block(kv_state, n_top)
        else:
            kv_state = self.serial_step(kv_state, n_top, True, True)
        if const_expr(self.mask.causal):
            n_mask_from = cutlass.max(
                cutlass.min(
                    first_masked_n_block(
                        self.m_block, self.causal_offset, self.tile_m, self.tile_n
                    ),
                    n_top,
                ),
                n_min,
            )
            kv_state = self.steps(kv_state, n_top, n_mask_from, True)
            n_top = n_mask_from
        if const_expr(self.mask.window):
            # Tiles crossing the right edge, then those inside the band, then those
            # crossing the left edge (`block_ranges`); a negative size has no edge.
            window = self.window
            n_mask_from = n_top
            if window.right >= 0:
                n_mask_from = cutlass.max(
                    cutlass.min(
                        first_masked_n_block(
                            self.m_block, self.causal_offset, self.tile_m, self.tile_n,
                            window.right,
                        ),
                        n_top,
                    ),
                    n_min,
                )  # fmt: skip
            kv_state = self.steps(kv_state, n_top, n_mask_from, True)
            n_full_from = n_min
            if window.left >= 0:
                n_full_from = cutlass.max(
                    cutlass.min(
                        first_unmasked_left_n_block(
                            self.m_block, self.causal_offset, self.tile_m, self.tile_n,
                            window.left,
                        ),
                        n_mask_from,
                    ),
                    n_min,
                )  # fmt: skip
            kv_state = self.steps(kv_state, n_mask_from, n_full_from, False)
            kv_state = self.steps(kv_state, n_full_from, n_min, True)
        else:
            kv_state = self.steps(kv_state, n_top, n_min, False)
        if const_expr(overlap):
            self.last_pv(kv_state, n_min)
            kv_state.advance()
        return kv_state
