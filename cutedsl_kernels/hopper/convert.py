"""Packed float32 -> 16-bit conversion of register fragments.

`TensorSSA.to(dtype)` converts element by element unless the fragment's shape happens to
vectorize (it does for 128-wide key tiles, not for e.g. 176). One `cvt.rn.{f16,bf16}x2.f32`
per pair keeps P's conversion at half an instruction per score for every tile shape.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op


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


@cute.jit
def convert_pairs(src: cute.Tensor, dst: cute.Tensor) -> None:
    """dst[i] = src[i] rounded to dst's 16-bit type; sizes equal and even."""
    dst_words = cute.recast_tensor(dst, Int32)
    for i in cutlass.range_constexpr(cute.size(dst_words)):
        dst_words[i] = pack_pair(src[2 * i], src[2 * i + 1], dst.element_type)
