"""sparsek: fused multi-head attention for NVIDIA Hopper, written in the CuTe Python DSL.

    import sparsek
    out = sparsek.attention(q, k, v, causal=True)          # (batch, seqlen, heads, head_dim)
    out = sparsek.scaled_dot_product_attention(q, k, v)     # torch SDPA drop-in
    out = sparsek.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)   # packed sequences
    out = sparsek.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table)

`import sparsek` imports neither torch nor the CuTe DSL: the entry points (and torch) are
imported at their first use, which also registers the `torch.ops.sparsek` ops
(`import sparsek.ops` registers them alone). The command line (`sparsek --help`,
`--version`) therefore starts in milliseconds instead of seconds. Kernels are compiled (or
loaded from the on-disk cache) at first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The one place the version is written: pyproject.toml reads it (`[tool.setuptools.dynamic]`).
__version__ = "0.2.0"

if TYPE_CHECKING:
    from sparsek.api import attention, scaled_dot_product_attention
    from sparsek.api_varlen import attention_varlen, attention_with_kvcache
    from sparsek.errors import UnsupportedError

# Public name -> the module defining it, imported at the first use of any of them.
_LAZY = {
    "attention": "sparsek.api",
    "scaled_dot_product_attention": "sparsek.api",
    "attention_varlen": "sparsek.api_varlen",
    "attention_with_kvcache": "sparsek.api_varlen",
    "UnsupportedError": "sparsek.errors",
}

__all__ = [
    "UnsupportedError",
    "__version__",
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "scaled_dot_product_attention",
]


def __getattr__(name: str) -> Any:
    """Import the public entry points at the first use of one (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    namespace = globals()
    for public, module in _LAZY.items():
        namespace[public] = getattr(importlib.import_module(module), public)
    # Every name is bound now, so this function goes: CPython never specializes attribute
    # lookups on a module that has a __getattr__, and `sparsek.attention` took 43 ns per
    # call with it against 14 ns without (timeit, CPython 3.11).
    namespace.pop("__getattr__", None)
    return namespace[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
