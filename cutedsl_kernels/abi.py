"""The calling convention of every compiled kernel: its arguments by name and order.

One definition per kernel kind, used by the build (fake arguments of the right names),
the host's launches, the tests and the benchmarks. No DSL and no torch here: a compiled
kernel is called with framework tensors (anything with DLPack) and Python scalars, on the
framework's current stream (TVM-FFI).

Each kind has a NamedTuple that names the arguments (`FmhaFwdArgs._fields` is the
order), and a `call_*` function that takes them by name and calls the kernel
positionally: the launch paths' form (a NamedTuple built with keywords costs ~0.9 us
of host time per call, the plain call ~0.3 us; `tests/test_abi.py` checks that each
`call_*` takes exactly its NamedTuple's fields, with the same defaults, and that each
kernel's `__call__` takes them in that order).

Forward kernels (`FmhaFwdConfig`):

    q, out: (batch, seqlen_q, num_heads, head_dim)        dtypes.qk / dtypes.out
    k, v:   (batch, seqlen_k, num_kv_heads, head_dim)     dtypes.qk / dtypes.v
    lse:    (batch, num_heads, seqlen_q)                  float32, last dim contiguous
    The last dim of q/k/v/out is contiguous; other strides are arbitrary multiples of 16
    bytes and base pointers are 16-byte aligned (TMA's rules). num_heads is a multiple
    of num_kv_heads. seqlen_q >= 1, seqlen_k >= 1.
    causal_offset (dense causal configs): key j is visible to query i iff j <= i + offset.
    window_left, window_right (`MaskSpec.window` configs): key j is visible to query i iff
    i + offset - left <= j <= i + offset + right (offset: causal_offset, or per sequence
    seqlen_k - seqlen_q); a negative size is unbounded. softcap (`MaskSpec.softcap`, > 0):
    scores become softcap * tanh(scale * s / softcap). sinks (`MaskSpec.sinks`, not split):
    float32 (rows, num_heads), the sink logit of query row r of head h at
    [min(r, rows - 1), h] (rows = 1 for one logit per head; the decode views that make a
    KV head's query heads the rows pass (group, num_kv_heads)); else None.
    Rows with no visible key get out = 0 and lse = -inf.
    FP8 configs (`ElementTypes.is_fp8`): q, k, v in float8_e4m3fn, out in dtypes.out;
    v key-major (`FmhaFwdConfig.v_key_major`): V^T in memory, (batch, num_kv_heads,
    head_dim, keys) with the key axis contiguous, passed as the (batch, seqlen_k,
    num_kv_heads, head_dim) view of it, zero past the data (packed: past the last
    sequence); q_descale, k_descale, v_descale float32 (batch, num_kv_heads), any strides
    (packed: batch is the sequence): the factors that dequantize them. Else None.
    Variable-length configs (see `FmhaFwdConfig`): `varlen_q` packs q/out/lse as a batch
    of one, (1, total_q, ...) / (1, num_heads, total_q), delimited by cu_seqlens_q
    (batch + 1 int32) with max_seqlen_q its longest sequence; kv_layout "varlen" packs
    k/v likewise with cu_seqlens_k; "cache" takes seqused_k (batch int32) keys of each
    batch entry; "paged" reads k/v as (num_pages, page_size, num_kv_heads, head_dim)
    through page_table (batch, max_pages int32) with seqused_k. Metadata a config does
    not use is passed as None; num_splits is 1 unless `split_kv`, where out and lse gain
    a leading num_splits mode and are float32 partial results. tile_counter: a (1,) int32
    tensor of zeros for `dynamic_schedule` configs (fresh per launch), else None.
    num_ctas: the CTA count of a `persistent` launch (the SM count); ignored otherwise.

Split-KV combine kernels (`CombineConfig`): see `simt/split_combine.py`.
Paged KV-cache update kernels (`KVStoreConfig`): see `simt/paged_kv_store.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class FmhaFwdArgs(NamedTuple):
    """The arguments of a compiled forward kernel, in order (see the module docstring)."""

    q: Any
    k: Any
    v: Any
    out: Any
    lse: Any
    cu_seqlens_q: Any = None
    cu_seqlens_k: Any = None
    seqused_k: Any = None
    page_table: Any = None
    tile_counter: Any = None
    sinks: Any = None
    q_descale: Any = None
    k_descale: Any = None
    v_descale: Any = None
    softmax_scale: float = 1.0
    causal_offset: int = 0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    max_seqlen_q: int = 0
    num_splits: int = 1
    num_ctas: int = 1


def call_fmha_fwd(
    kernel: Callable[..., None],
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    seqused_k: Any = None,
    page_table: Any = None,
    tile_counter: Any = None,
    sinks: Any = None,
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
    softmax_scale: float = 1.0,
    causal_offset: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    max_seqlen_q: int = 0,
    num_splits: int = 1,
    num_ctas: int = 1,
) -> None:
    """`kernel(*FmhaFwdArgs(...))` without building the tuple: arguments by name."""
    kernel(
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, tile_counter,
        sinks, q_descale, k_descale, v_descale, softmax_scale, causal_offset, window_left,
        window_right, softcap, max_seqlen_q, num_splits, num_ctas,
    )  # fmt: skip


class CombineArgs(NamedTuple):
    """The arguments of a compiled split-KV combine kernel, in order.

    o_partial: float32 (splits, batch, seqlen, heads, head_dim); lse_partial: float32
    (splits, batch, heads, seqlen); out: (batch, seqlen, heads, head_dim) of the config's
    dtype; lse: float32 (batch, heads, seqlen); sinks (`CombineConfig.sinks`, else None):
    float32 (rows, heads), row (b, s, h) reads sinks[min(s, rows - 1), h], as the forward
    kernel reads its sinks.
    """

    o_partial: Any
    lse_partial: Any
    out: Any
    lse: Any
    sinks: Any = None


def call_combine(
    kernel: Callable[..., None],
    o_partial: Any,
    lse_partial: Any,
    out: Any,
    lse: Any,
    sinks: Any = None,
) -> None:
    """`kernel(*CombineArgs(...))`: arguments by name."""
    kernel(o_partial, lse_partial, out, lse, sinks)


class KVStoreArgs(NamedTuple):
    """The arguments of a compiled paged KV-cache update kernel, in order.

    k, v: (tokens, heads, head_dim); k_cache, v_cache: (pages, page_size, heads,
    head_dim); slots: int64 (tokens,), slot = page * page_size + row, < 0 skipped;
    k_scale, v_scale: float32 (1,), the cache holds k / k_scale and v / v_scale (kernels
    that quantize, `KVStoreConfig.quantizes`), else None.
    """

    k: Any
    v: Any
    k_cache: Any
    v_cache: Any
    slots: Any
    k_scale: Any = None
    v_scale: Any = None


def call_kv_store(
    kernel: Callable[..., None],
    k: Any,
    v: Any,
    k_cache: Any,
    v_cache: Any,
    slots: Any,
    k_scale: Any = None,
    v_scale: Any = None,
) -> None:
    """`kernel(*KVStoreArgs(...))`: arguments by name."""
    kernel(k, v, k_cache, v_cache, slots, k_scale, v_scale)
