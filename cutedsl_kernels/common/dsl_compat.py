"""Names that moved inside nvidia-cutlass-dsl 4.8.x, resolved once.

4.8.1 deprecates `cutlass.utils.LayoutEnum`, `cutlass.utils.SmemAllocator` and
`warpgroup.OperandMajorMode` in favour of new homes; 4.8.0 (pinned by vLLM 0.33) may only
have the old ones. Kernels import these names from here.
"""

from __future__ import annotations

import cutlass.cute as cute

try:
    from cutlass.tensor_utils import LayoutEnum
except ImportError:  # older 4.8.x
    from cutlass.utils import LayoutEnum  # type: ignore[no-redef]

try:
    from cutlass.memory import SmemAllocator
except ImportError:  # older 4.8.x
    from cutlass.utils import SmemAllocator  # type: ignore[no-redef]

OperandMajorMode = getattr(cute.nvgpu, "OperandMajorMode", None)
if OperandMajorMode is None:  # older 4.8.x
    from cutlass.cute.nvgpu.warpgroup import OperandMajorMode  # type: ignore[no-redef]

__all__ = ["LayoutEnum", "OperandMajorMode", "SmemAllocator"]
