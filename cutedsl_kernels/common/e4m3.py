"""Rounding float32 to FP8 E4M3 in registers, shared by every kernel that writes E4M3.

The `cvt.rn.satfinite.e4m3x2.f32` instruction (sm_89 and later) rounds two floats to
nearest-even E4M3 at once, saturating finite values beyond +-448 to +-448 (NaN stays
NaN): the conversion vLLM's cache update and FlashAttention-3 use, and what
`torch.clamp(x, -448, 448).to(torch.float8_e4m3fn)` computes.

  pack_e4m3x4      four floats -> one 32-bit word, the first in its lowest byte
  quantize_e4m3x2  two floats divided by a scale (IEEE division) -> the low 16 bits
"""

from __future__ import annotations

from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op


def _asm_i32(operands: list, code: str, constraints: str, loc=None, ip=None) -> Int32:
    """One pure inline-PTX instruction block returning a 32-bit register."""
    return Int32(
        llvm.inline_asm(
            T.i32(),
            [Float32(x).ir_value(loc=loc, ip=ip) for x in operands],
            code,
            constraints,
            has_side_effects=False,
            is_align_stack=False,
            asm_dialect=llvm.AsmDialect.AD_ATT,
        )
    )


@dsl_user_op
def pack_e4m3x4(a: Float32, b: Float32, c: Float32, d: Float32, *, loc=None, ip=None) -> Int32:
    """Round four floats to E4M3 (saturating at +-448) in one 32-bit word, `a` in its
    lowest byte."""
    return _asm_i32(
        [a, b, c, d],
        "{\n.reg .b16 lo, hi;\n"
        "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"  # first source: the upper byte
        "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
        "mov.b32 $0, {lo, hi};\n}",
        "=r,f,f,f,f",
        loc,
        ip,
    )


@dsl_user_op
def quantize_e4m3x2(lo: Float32, hi: Float32, scale: Float32, *, loc=None, ip=None) -> Int32:
    """E4M3 of lo / scale (bits 0-7) and hi / scale (bits 8-15), saturating at +-448; the
    divisions round to nearest (`div.rn`), as float32 division in torch does."""
    return _asm_i32(
        [lo, hi, scale],
        "{\n.reg .f32 a, b;\n.reg .b16 pair;\n"
        "div.rn.f32 a, $1, $3;\n"
        "div.rn.f32 b, $2, $3;\n"
        "cvt.rn.satfinite.e4m3x2.f32 pair, b, a;\n"
        "cvt.u32.u16 $0, pair;\n}",
        "=r,f,f,f",
        loc,
        ip,
    )
