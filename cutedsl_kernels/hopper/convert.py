"""Packed float32 -> 16-bit and -> FP8 conversion of register fragments, and FP8 -> 16-bit
conversion of shared-memory tiles (`convert_tile`, `convert_tile_vectorized`).

`TensorSSA.to(dtype)` converts element by element unless the fragment's shape happens to
vectorize (it does for 128-wide key tiles, not for e.g. 176). One `cvt.rn.{f16,bf16}x2.f32`
per pair keeps P's conversion at half an instruction per score for every tile shape.

FP8 P (`convert_p_fp8`): the 16-bit A operand of a wgmma takes the registers of the
first GEMM's accumulator as they are (`fragments.acc_as_operand_a`), the 8-bit one does
not. In a row's 16-column block, the accumulator gives lane q of a quad the columns
{2q, 2q+1, 8+2q, 9+2q}, the 8-bit A operand wants {4q .. 4q+3}. After rounding, the four
bytes of each 8-column group are one 32-bit word per lane; two shuffles within the quad
and two byte permutes per 16-column block put each byte where the A operand reads it
(the scheme of CUTLASS's and FlashAttention-3's FP8 attention, written out below).

    16-column block, words per lane q: X (cols 2q, 2q+1: rows r, r+8), Y (cols 8+2q, 9+2q)
    lane q   needs cols   first word from   second word from   byte selectors (row r, r+8)
    0        0..3         lane 0's X        lane 1's X         0x5410, 0x7632
    1        4..7         lane 3's X        lane 2's X         0x1054, 0x3276
    2        8..11        lane 1's Y        lane 0's Y         0x1054, 0x3276
    3        12..15       lane 2's Y        lane 3's Y         0x5410, 0x7632
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from cutedsl_kernels.common.e4m3 import pack_e4m3x4


@dsl_user_op
def pack_pair(lo: Float32, hi: Float32, dtype: type, *, loc=None, ip=None) -> Int32:
    """Round two floats to one 32-bit word holding (lo, hi) as f16x2 / bf16x2."""
    kind = "bf16x2" if dtype is cutlass.BFloat16 else "f16x2"
    return Int32(
        llvm.inline_asm(
            T.i32(),
            [Float32(hi).ir_value(loc=loc, ip=ip), Float32(lo).ir_value(loc=loc, ip=ip)],
            f"cvt.rn.{kind}.f32 $0, $1, $2;",  # first source lands in the upper half
            "=r,f,f",
            has_side_effects=False,
            is_align_stack=False,
            asm_dialect=llvm.AsmDialect.AD_ATT,
        )
    )


@dsl_user_op
def byte_perm(a: Int32, b: Int32, selector: Int32, *, loc=None, ip=None) -> Int32:
    """`prmt.b32`: byte i of the result is byte (selector's nibble i) of (b:a)."""
    return Int32(
        llvm.inline_asm(
            T.i32(),
            [Int32(x).ir_value(loc=loc, ip=ip) for x in (a, b, selector)],
            "prmt.b32 $0, $1, $2, $3;",
            "=r,r,r,r",
            has_side_effects=False,
            is_align_stack=False,
            asm_dialect=llvm.AsmDialect.AD_ATT,
        )
    )


# Shuffles within quads: the source lane is an index into the lane's group of 4.
QUAD_SHUFFLE = 0x1C1F
# Per lane q of a quad (nibble q): the lane whose word goes first, then second (see the
# module docstring's table).
FIRST_SOURCE_LANES = 0x2130
SECOND_SOURCE_LANES = 0x3021


@cute.jit
def convert_p_fp8(acc: cute.Tensor, dst: cute.Tensor) -> None:
    """dst = acc rounded to E4M3 in the 8-bit wgmma A operand's layout.

    acc: one warpgroup's float32 accumulator ((2, 2, V), 1, 1) of a (64, 8 V) tile, the
    probabilities of its rows (in [0, 256] after the softmax's FP8 offset); dst: the
    A fragment ((4, 2, 2), 1, V / 4) of the same tile in float8_e4m3fn. Every lane of the
    warpgroup must call it (quad shuffles).
    """
    words = cute.recast_tensor(dst, Int32)
    lane = cute.arch.lane_idx() % 4
    ends = (lane == 0) | (lane == 3)
    first_lane = (Int32(FIRST_SOURCE_LANES) >> (lane * 4)) & 0xF
    second_lane = (Int32(SECOND_SOURCE_LANES) >> (lane * 4)) & 0xF
    select_lo = Int32(0x5410) if ends else Int32(0x1054)
    select_hi = Int32(0x7632) if ends else Int32(0x3276)
    for m in cutlass.range_constexpr(cute.size(acc) // 8):
        x = pack_e4m3x4(acc[8 * m], acc[8 * m + 1], acc[8 * m + 2], acc[8 * m + 3])
        y = pack_e4m3x4(acc[8 * m + 4], acc[8 * m + 5], acc[8 * m + 6], acc[8 * m + 7])
        give_first = x if ends else y
        give_second = y if ends else x
        first = cute.arch.shuffle_sync_op(give_first, first_lane, mask_and_clamp=QUAD_SHUFFLE)
        second = cute.arch.shuffle_sync_op(give_second, second_lane, mask_and_clamp=QUAD_SHUFFLE)
        words[2 * m] = byte_perm(first, second, select_lo)
        words[2 * m + 1] = byte_perm(first, second, select_hi)


@cute.jit
def convert_pairs(src: cute.Tensor, dst: cute.Tensor) -> None:
    """dst[i] = src[i] rounded to dst's 16-bit type; sizes equal and even."""
    dst_words = cute.recast_tensor(dst, Int32)
    for i in cutlass.range_constexpr(cute.size(dst_words)):
        dst_words[i] = pack_pair(src[2 * i], src[2 * i + 1], dst.element_type)


# Elements per vector of `convert_tile_vectorized`: 16 bytes of a 16-bit tile (the unit
# a 128-byte swizzle keeps contiguous), 8 bytes of the E4M3 one.
CONVERT_VECTOR = 8


@cute.jit
def convert_tile_vectorized(
    src: cute.Tensor,
    dst: cute.Tensor,
    lane: Int32,
    threads: cutlass.Constexpr[int],
    valid_rows: Int32 | None = None,
) -> None:
    """`convert_tile` in vectors of `CONVERT_VECTOR` elements: each thread loads 8 E4M3
    values in one 64-bit shared-memory load, converts them in registers (four
    `cvt.rn.f16x2.e4m3x2`, and to bfloat16 through float32) and stores them in one
    128-bit store, one vector at a time (few registers live). The tiles: (rows, cols) of
    one shape in swizzled row-major layouts (`shared_storage.tile_layout`) that keep each
    16-byte unit contiguous (the copies check it when they compile); `threads` a
    multiple of cols / CONVERT_VECTOR and rows a multiple of the rows they cover at once.
    Rows >= `valid_rows` (when given) become 0."""
    rows, cols = cute.size(src, mode=[0]), cute.size(src, mode=[1])
    vectors_per_row = cols // CONVERT_VECTOR
    thr_layout = cute.make_ordered_layout((threads // vectors_per_row, vectors_per_row), (1, 0))
    val_layout = cute.make_layout((1, CONVERT_VECTOR))
    bits = CONVERT_VECTOR * src.element_type.width
    load_atom = cute.make_copy_atom(
        cute.nvgpu.CopyUniversalOp(), src.element_type, num_bits_per_copy=bits
    )
    store_atom = cute.make_copy_atom(
        cute.nvgpu.CopyUniversalOp(), dst.element_type, num_bits_per_copy=2 * bits
    )
    load = cute.make_tiled_copy_tv(load_atom, thr_layout, val_layout).get_slice(lane)
    store = cute.make_tiled_copy_tv(store_atom, thr_layout, val_layout).get_slice(lane)
    # (CPY, CPY_M, CPY_N): this thread's vectors, CPY_N = 1 (threads span a row)
    tSs = load.partition_S(src)
    tDs = store.partition_D(dst)
    tDc = store.partition_D(cute.make_identity_tensor((rows, cols)))
    r_src = cute.make_fragment_like(tSs[None, 0, None])
    r_dst = cute.make_fragment_like(tDs[None, 0, None])
    for m in cutlass.range_constexpr(cute.size(tSs, mode=[1])):
        cute.copy(load_atom, tSs[None, m, None], r_src)
        converted = r_src.load().to(dst.element_type)
        if const_expr(valid_rows is not None):
            row = tDc[0, m, 0][0]
            converted = converted if row < valid_rows else cute.zeros_like(converted)
        r_dst.store(converted)
        cute.copy(store_atom, r_dst, tDs[None, m, None])


@cute.jit
def convert_tile(
    src: cute.Tensor,
    dst: cute.Tensor,
    lane: Int32,
    threads: cutlass.Constexpr[int],
    valid_rows: Int32 | None = None,
) -> None:
    """dst[r, c] = src[r, c] in dst's element type, over (rows, cols) tiles of any
    (swizzled) layouts, element by element by `threads` threads (`lane`: this thread's
    index among them); rows >= `valid_rows` (when given) become 0. E4M3 values are exact
    in float16 and bfloat16."""
    cols = cute.size(src, mode=[1])
    zero = dst.element_type(0.0)
    for e in cutlass.range(lane, cute.size(src), threads):
        row = e // cols
        col = e - row * cols
        value = dst.element_type(Float32(src[row, col]))
        if const_expr(valid_rows is not None):
            value = zero if row >= valid_rows else value
        dst[row, col] = value
