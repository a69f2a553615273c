"""sparsek: fused multi-head attention for NVIDIA Hopper, written in the CuTe Python DSL.

    import sparsek
    out = sparsek.attention(q, k, v, causal=True)          # (batch, seqlen, heads, head_dim)
    out = sparsek.scaled_dot_product_attention(q, k, v)     # torch SDPA drop-in

Importing sparsek does not import the CuTe DSL: kernels are compiled (or loaded from the
on-disk cache) at first use.
"""

from sparsek.api import attention, scaled_dot_product_attention
from sparsek.errors import UnsupportedError

__version__ = "0.1.0"

__all__ = ["UnsupportedError", "__version__", "attention", "scaled_dot_product_attention"]
