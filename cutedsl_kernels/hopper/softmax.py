"""Score processing of the sm90 MMA warpgroups: the logit softcap, the element-wise mask,
then the online softmax over key tiles, in registers, with exp2 and the scale folded in.

Softcap (`apply_softcap`, with `MaskSpec.softcap`): each raw score s becomes
tanh(s * softmax_scale / softcap) (hardware tanh.approx), and the softmax scale becomes
softcap, so the softmax sees softcap * tanh(softmax_scale * s / softcap). It runs before
the mask (tanh(-inf) would be -1, not -inf).

Masking (`apply_mask`): the scores of one key tile that the mask hides are set to -inf;
the main loop calls it only for the tiles `common/block_ranges.py` says need it (the
sequence end, the causal diagonal, a window's edges).

For each query row the kernel keeps the running maximum `m` of the raw scores and the
running sum `l` of `exp2(s * scale_log2 - m * scale_log2)` over the keys seen so far.
A new key tile updates them and returns the factor `exp2((m_old - m_new) * scale_log2)`
by which the partial output must be rescaled. At the end, `O /= l` and
`lse = (m * scale_log2 + log2(l)) * ln 2` (natural log, what FlashAttention returns).

Rows that have seen only masked (-inf) scores keep `m = -inf`; exponents are then taken
against 0 so they stay 0 instead of NaN, and such rows finish with O = 0, lse = -inf.
NaN in a row's scores (NaN in Q or K) makes its sum NaN, hence its O and LSE NaN.

Sinks (`MaskSpec.sinks`): head h's sink logit joins the denominator of each of its rows
that sees at least one key, at finalization: l += exp(sink - m * scale); the LSE then
includes it, log(exp(sink) + sum_j exp(scale * s_j)), and O = sum_j p_j V_j with the
sink's share of the probability going to no value. A row without keys stays O = 0,
lse = -inf. Split-KV partials leave the sink out (the combine adds it once).

FP8 kernels (`max_offset` = 8): the exponents are taken against m * scale_log2 - 8, so
the probabilities lie in [0, 256] instead of [0, 1] and use more of E4M3's range (max
448) when P is rounded to it. The row sums carry the same factor 2^8, which cancels in
O / l; the LSE subtracts it, and a sink's term takes it too. The rescale factors do not
change (the offset cancels in them).

Each thread holds a few full rows' worth of columns split across the 4 threads of a quad
(the MMA accumulator layout), so row reductions end with a 4-lane butterfly. The row sum
is reduced across the quad only once, at the end.
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cutedsl_kernels.common.block_ranges import Window
from cutedsl_kernels.config import MaskSpec
from cutedsl_kernels.hopper.fragments import acc_rows_cols

LN2 = math.log(2.0)
LOG2_E = math.log2(math.e)
LANES_PER_ROW = 4  # wgmma accumulators spread one row's columns over a quad
ILP_CHAINS = 4  # independent reduction chains: a serial chain stalls on each op's latency
FP8_MAX_OFFSET = 8  # FP8 P: probabilities in [0, 2^8], below E4M3's maximum of 448


def _add(a, b):
    return a + b


@cute.jit
def reduce_ilp(row: cute.Tensor, op: cutlass.Constexpr) -> Float32:
    """Reduce a register row (size a multiple of ILP_CHAINS) with interleaved chains."""
    chains = [row[j] for j in range(ILP_CHAINS)]
    for i in cutlass.range_constexpr(ILP_CHAINS, cute.size(row), ILP_CHAINS):
        for j in cutlass.range_constexpr(ILP_CHAINS):
            chains[j] = op(chains[j], row[i + j])
    return op(op(chains[0], chains[1]), op(chains[2], chains[3]))


class SoftmaxArgs:
    """The softmax's runtime inputs, one set per launch.

    Attributes:
        scale_log2: the scores' scale in log2 units (softcap: softcap * log2(e)).
        softcap_pre_scale: (`MaskSpec.softcap`) softmax_scale / softcap, else None.
        sinks: (`MaskSpec.sinks`, not split-KV) float32 (rows, heads) sink logits (see
            `abi`), else None.
        descales: (FP8 kernels and FP8 caches) the float32 (batch, num_kv_heads) factors
            of Q (None for caches: 16-bit queries), K and V (see `abi`), else None.
    """

    def __init__(
        self,
        scale_log2: Float32,
        softcap_pre_scale: Float32 | None,
        sinks: cute.Tensor | None,
        descales: tuple | None = None,
    ):
        self.scale_log2, self.softcap_pre_scale, self.sinks = scale_log2, softcap_pre_scale, sinks
        self.descales = descales

    @cute.jit
    def descaled(self, batch: Int32, head_kv: Int32, has_keys) -> tuple:
        """(scale_log2, softcap_pre_scale, v_scale) of one work tile with FP8 inputs or
        cache: Q's (if any) and K's factors of (batch, head_kv) multiply the scores'
        scale (inside the tanh with a softcap), V's multiplies O. A tile without keys
        (`has_keys` false; its batch index may be past the factors' rows) reads none."""
        q_descale, k_descale, v_descale = self.descales
        qk_scale, v_scale = Float32(1.0), Float32(1.0)
        if has_keys:
            qk_scale = k_descale[batch, head_kv]
            if const_expr(q_descale is not None):  # (FP8 caches: 16-bit queries)
                qk_scale = q_descale[batch, head_kv] * qk_scale
            v_scale = v_descale[batch, head_kv]
        scale_log2, pre_scale = self.scale_log2, self.softcap_pre_scale
        if const_expr(pre_scale is not None):
            pre_scale = pre_scale * qk_scale
        else:
            scale_log2 = scale_log2 * qk_scale
        return scale_log2, pre_scale, v_scale

    @cute.jit
    def row_sinks(self, t_coords: cute.Tensor, row0: Int32, head: Int32) -> cute.Tensor:
        """The sink logit of each row this thread owns (rows row0 + the tile's), as a
        register tensor: `sinks[min(row, rows - 1), head]`."""
        c_rc = acc_rows_cols(t_coords)
        num_rows = cute.size(c_rc, mode=[0])
        out = cute.make_rmem_tensor(num_rows, Float32)
        last = cute.size(self.sinks.shape[0]) - 1
        for r in cutlass.range_constexpr(num_rows):
            out[r] = self.sinks[cutlass.min(row0 + c_rc[r, 0][0], last), head]
        return out


class OnlineSoftmax:
    """Running max/sum for the rows one thread owns (state lives in registers).

    `max_offset`: the probabilities' log2 headroom (0, or 8 for FP8 P; see the module
    docstring).
    """

    def __init__(self, scale_log2: Float32, num_rows: int, max_offset: int = 0):
        self.scale_log2 = scale_log2
        self.max_offset = max_offset
        self.row_max = cute.make_rmem_tensor(num_rows, Float32)
        self.row_sum = cute.make_rmem_tensor(num_rows, Float32)

    @cute.jit
    def reset(self) -> None:
        self.row_max.fill(-Float32.inf)
        self.row_sum.fill(0.0)

    @cute.jit
    def update(self, acc_s: cute.Tensor, is_first: cutlass.Constexpr[bool]) -> cute.Tensor:
        """Turn scores `acc_s` into unnormalized probabilities in place.

        Returns the per-row factor to rescale the output accumulator by.
        """
        s_rc = acc_rows_cols(acc_s)
        row_scale = cute.make_rmem_tensor_like(self.row_max, Float32)
        for r in cutlass.range_constexpr(cute.size(self.row_max)):
            row = s_rc[r, None]
            prev_max = self.row_max[r]
            cur_max = cute.arch.fmax(reduce_ilp(row, cute.arch.fmax), prev_max)
            cur_max = cute.arch.warp_reduction(
                cur_max, cute.arch.fmax, threads_in_group=LANES_PER_ROW
            )
            self.row_max[r] = cur_max
            # A row with no visible key yet: take exponents against 0 (they are all -inf).
            safe_max = Float32(0.0) if cur_max == -Float32.inf else cur_max
            max_scaled = safe_max * self.scale_log2
            exp_base = max_scaled
            if const_expr(self.max_offset != 0):
                exp_base = max_scaled - Float32(self.max_offset)
            row.store(cute.math.exp2(row.load() * self.scale_log2 - exp_base, fastmath=True))
            tile_sum = reduce_ilp(row, _add)
            if cutlass.const_expr(is_first):
                row_scale[r] = Float32(1.0)
                self.row_sum[r] = tile_sum
            else:
                scale = cute.math.exp2(prev_max * self.scale_log2 - max_scaled, fastmath=True)
                row_scale[r] = scale
                self.row_sum[r] = self.row_sum[r] * scale + tile_sum
        return row_scale

    @cute.jit
    def finalize(self, sinks: cute.Tensor | None = None) -> cute.Tensor:
        """Reduce the row sums, turn `row_sum` into the LSE; return 1/l per row.

        `sinks`: each row's sink logit (natural log, `SoftmaxArgs.row_sinks`), added to
        the denominator of every row that saw a key; None: no sinks. After this call
        `self.row_sum[r]` holds the natural-log LSE of row r.
        """
        inv_sum = cute.make_rmem_tensor_like(self.row_max, Float32)
        for r in cutlass.range_constexpr(cute.size(self.row_sum)):
            total = cute.arch.warp_reduction(self.row_sum[r], _add, threads_in_group=LANES_PER_ROW)
            if const_expr(sinks is not None):  # noqa: SIM102 (a const_expr apart from a runtime test)
                # exp(sink - m * scale); a row without keys (m = -inf) keeps total 0.
                if self.row_max[r] != -Float32.inf:
                    sink_log2 = sinks[r] * Float32(LOG2_E)
                    if const_expr(self.max_offset != 0):
                        sink_log2 = sink_log2 + Float32(self.max_offset)
                    total += cute.math.exp2(
                        sink_log2 - self.row_max[r] * self.scale_log2, fastmath=True
                    )
            # Only a row without a visible key sums to 0. A NaN sum (NaN in Q or K) stays
            # NaN: the row's O and LSE come out NaN, as the math says.
            empty = total == Float32(0.0)
            inv_sum[r] = cute.arch.rcp_approx(Float32(1.0) if empty else total)
            log2_total = cute.math.log2(total, fastmath=True)
            if const_expr(self.max_offset != 0):
                log2_total = log2_total - Float32(self.max_offset)
            lse = (self.row_max[r] * self.scale_log2 + log2_total) * Float32(LN2)
            self.row_sum[r] = -Float32.inf if empty else lse
        return inv_sum

    @staticmethod
    @cute.jit
    def rescale(acc_o: cute.Tensor, row_scale: cute.Tensor) -> None:
        """Multiply each accumulator row by its factor."""
        o_rc = acc_rows_cols(acc_o)
        for r in cutlass.range_constexpr(cute.size(row_scale)):
            o_rc[r, None].store(o_rc[r, None].load() * row_scale[r])


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
    mask: cutlass.Constexpr[MaskSpec],
    window: Window | None = None,
    rows_share_position: cutlass.Constexpr[bool] = False,
) -> None:
    """Set masked scores of one (tile_m, tile_n) tile to -inf.

    `t_coords` / `t0_coords` are this thread's and thread 0's partitions of the tile's
    identity tensor, so that the per-element test compares against compile-time column
    offsets (thread 0's) and per-row limits shifted by this thread's own offset.
    `rows_share_position`: every row is the query at the tile's first row (the heads of
    one token as rows), so the causal and window limits are the same for all of them.
    """
    s_rc = acc_rows_cols(acc_s)
    c_rc = acc_rows_cols(t_coords)
    c0_rc = acc_rows_cols(t0_coords)
    thread_col = c_rc[0, 0][1]
    seqlen_limit = seqlen_k - n_block * tile_n - thread_col
    for r in cutlass.range_constexpr(cute.size(s_rc, mode=[0])):
        col_limit = seqlen_limit
        row = m_block * tile_m
        if cutlass.const_expr(not rows_share_position):
            row += c_rc[r, 0][0]
        if cutlass.const_expr(mask.causal):
            causal_limit = row + causal_offset + 1 - n_block * tile_n - thread_col
            col_limit = cutlass.min(col_limit, causal_limit)
        if cutlass.const_expr(mask.window):
            # Visible: left_limit <= column < col_limit (a negative size: no edge).
            diagonal = row + causal_offset - n_block * tile_n - thread_col
            if window.right >= 0:
                col_limit = cutlass.min(col_limit, diagonal + window.right + 1)
            left_limit = Int32(-tile_n)
            if window.left >= 0:
                left_limit = diagonal - window.left
            for c in cutlass.range_constexpr(cute.size(s_rc, mode=[1])):
                col = c0_rc[0, c][1]
                if col >= col_limit or col < left_limit:
                    s_rc[r, c] = -Float32.inf
        else:
            for c in cutlass.range_constexpr(cute.size(s_rc, mode=[1])):
                if c0_rc[0, c][1] >= col_limit:
                    s_rc[r, c] = -Float32.inf


@cute.jit
def apply_softcap(acc_s: cute.Tensor, pre_scale: Float32) -> None:
    """Scores s -> tanh(s * pre_scale) in place (pre_scale = softmax_scale / softcap; the
    softmax's scale is softcap, see the module docstring)."""
    for i in cutlass.range_constexpr(cute.size(acc_s)):
        acc_s[i] = cute.math.tanh(acc_s[i] * pre_scale, fastmath=True)
