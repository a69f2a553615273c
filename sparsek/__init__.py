"""sparsek: fused multi-head attention for NVIDIA Hopper, written in the CuTe Python DSL.

    import sparsek
    out = sparsek.attention(q, k, v, causal=True)          # (batch, seqlen, heads, head_dim)
    out = sparsek.scaled_dot_product_attention(q, k, v)     # torch SDPA drop-in
    out = sparsek.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)   # packed sequences
    out = sparsek.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table)

Importing sparsek does not import the CuTe DSL: kernels are compiled (or loaded from the
on-disk cache) at first use.
"""

from sparsek.api import attention, scaled_dot_product_attention
from sparsek.api_varlen import attention_varlen, attention_with_kvcache
from sparsek.errors import UnsupportedError

__version__ = "0.1.0"

__all__ = [
    "UnsupportedError",
    "__version__",
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "scaled_dot_product_attention",
]
