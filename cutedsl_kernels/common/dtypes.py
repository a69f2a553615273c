"""DSL element types by the names configs use ("bfloat16"), shared by every kernel."""

from __future__ import annotations

import cutlass

DSL_TYPES: dict[str, type] = {
    "float16": cutlass.Float16,
    "bfloat16": cutlass.BFloat16,
    "float32": cutlass.Float32,
    "float8_e4m3fn": cutlass.Float8E4M3FN,
}


def dsl_type(name: str) -> type:
    """The DSL numeric type named `name` (a key of `DSL_TYPES`)."""
    return DSL_TYPES[name]
