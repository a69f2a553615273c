"""Plain-PyTorch variable-length and KV-cache attention: the oracle for the varlen/paged kernels.

Two entry points, both the textbook computation (materialized scores, logsumexp, softmax,
weighted sum) in float32 or float64, on any device, without reading tensor values on the
host (no synchronization: every per-sequence length is used through masks and gathers):

  * `reference_attention_varlen`: packed sequences described by cumulative lengths
    (FlashAttention's `flash_attn_varlen_func` layout).
  * `reference_attention_kvcache`: new queries against a KV cache, contiguous or paged
    (vLLM's block-table layout with K and V in separate tensors).

Both unpack to padded (batch, max_seqlen, heads, head_dim) tensors, mask by per-sequence
lengths and pack the result again, so memory grows as batch * heads * max_seqlen_q *
max_seqlen_k. Masking semantics match `sparsek.reference`: with `causal=True` the diagonal
is bottom-right aligned per sequence (query i of a sequence with `q_len` queries and `k_len`
keys sees key j iff j <= i + k_len - q_len). A row that sees no key gets out = 0 and
lse = -inf; so do rows of a packed q that belong to no sequence (past `cu_seqlens_q[-1]`).

`check_varlen_values` / `check_kvcache_values` validate what the shapes cannot tell (monotone
`cu_seqlens`, `max_seqlen_*` large enough, lengths within the cache, block-table entries in
range). They read tensor values, so the torch ops call them for CPU tensors only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsek.fp8 import dequantize
from sparsek.masks import Mask, make_mask, reference_scores, reference_softmax, visible
from sparsek.validation import bad_entries


def reference_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Reference attention over packed variable-length sequences.

    Sequence b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and key rows
    [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v; zero-length sequences are allowed.

    Args:
        q: (total_q, num_heads, head_dim).
        k: (total_k, num_kv_heads, head_dim); num_heads % num_kv_heads == 0 (GQA).
        v: (total_k, num_kv_heads, head_dim_v).
        cu_seqlens_q: (batch + 1,) integer, non-decreasing offsets into q.
        cu_seqlens_k: (batch + 1,) integer, non-decreasing offsets into k and v.
        max_seqlen_q: >= every query length (rows past it are not computed).
        max_seqlen_k: >= every key length (keys past it are not seen).
        causal: bottom-right aligned causal mask per sequence.
        softmax_scale: multiplier of q k^T; 1/sqrt(head_dim) when None.
        window_size, softcap, sinks: sliding window (aligned like causal, per sequence),
            logit softcap and (num_heads,) sink logits, as `sparsek.masks` defines them.
        compute_dtype: torch.float32 or torch.float64; inputs are upcast to it.

    Returns:
        out: (total_q, num_heads, head_dim_v) in `compute_dtype`, contiguous.
        lse: (num_heads, total_q) in `compute_dtype`, contiguous (natural log; -inf for
            rows that see no key).

    Raises:
        ValueError: `compute_dtype` is not float32/float64, or num_heads is not a
            multiple of num_kv_heads.
    """
    _check_compute(compute_dtype, q.shape[1], k.shape[1])
    mask = make_mask(causal, window_size, softcap, sinks is not None)
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    q_pad = _unpack(q, cu_seqlens_q, q_lens, max_seqlen_q)
    k_pad = _unpack(k, cu_seqlens_k, k_lens, max_seqlen_k)
    v_pad = _unpack(v, cu_seqlens_k, k_lens, max_seqlen_k)
    out_pad, lse_pad = _padded_attention(
        q_pad, k_pad, v_pad, q_lens, k_lens, mask, sinks, softmax_scale, compute_dtype
    )
    return _pack(out_pad, lse_pad, cu_seqlens_q, q.shape[0])


def reference_attention_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None = None,
    *,
    cu_seqlens_q: Tensor | None = None,
    max_seqlen_q: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference attention of new queries against a KV cache (contiguous or paged).

    The new queries are the last tokens of each sequence: `cache_seqlens[b]` counts the
    valid cache tokens of sequence b *including* them, so with `causal=True` query i of a
    sequence with q_len queries sees cache positions j <= cache_seqlens[b] - q_len + i.

    Args:
        q: (batch, seqlen_q, num_heads, head_dim) (every sequence has seqlen_q new queries),
            or packed (total_q, num_heads, head_dim) together with `cu_seqlens_q`.
        k_cache: contiguous (batch, seqlen_cache, num_kv_heads, head_dim) when
            `block_table` is None, else paged (num_blocks, block_size, num_kv_heads, head_dim).
        v_cache: like `k_cache`, with head_dim_v as last dim.
        cache_seqlens: (batch,) integer, valid cache tokens per sequence.
        block_table: (batch, max_blocks) integer: block i of sequence b is
            `k_cache[block_table[b, i]]`; entries past a sequence's last block are not read.
        cu_seqlens_q: (batch + 1,) integer offsets into a packed q, else None.
        max_seqlen_q: >= every query length of a packed q; None for a 4-D q.
        causal: bottom-right aligned causal mask per sequence.
        softmax_scale: multiplier of q k^T; 1/sqrt(head_dim) when None.
        window_size, softcap, sinks: sliding window (aligned like causal, per sequence),
            logit softcap and (num_heads,) sink logits, as `sparsek.masks` defines them.
        compute_dtype: torch.float32 or torch.float64; inputs are upcast to it.
        k_descale, v_descale: (FP8 caches) (batch, num_kv_heads) float32 factors: batch
            entry b's keys and values are the cache's times its row (`sparsek.fp8`).

    Returns:
        out: like q with head_dim_v as last dim, in `compute_dtype`, contiguous.
        lse: (batch, num_heads, seqlen_q) for a 4-D q, (num_heads, total_q) for a packed
            q; `compute_dtype`, contiguous (natural log; -inf for rows that see no key).

    Raises:
        ValueError: `compute_dtype` is not float32/float64, num_heads is not a multiple
            of num_kv_heads, or a packed q comes without `max_seqlen_q`.
    """
    _check_compute(compute_dtype, q.shape[-2], k_cache.shape[2])
    mask = make_mask(causal, window_size, softcap, sinks is not None)
    k_lens = cache_seqlens.long()
    if block_table is None:
        k_pad, v_pad = k_cache, v_cache
    else:
        k_pad, v_pad = _gather_pages(k_cache, v_cache, block_table, k_lens)
    if k_descale is not None and v_descale is not None:
        k_pad = dequantize(k_pad, k_descale, compute_dtype)
        v_pad = dequantize(v_pad, v_descale, compute_dtype)
    if cu_seqlens_q is None:
        batch, seqlen_q = q.shape[0], q.shape[1]
        q_lens = torch.full((batch,), seqlen_q, dtype=torch.long, device=q.device)
        return _padded_attention(
            q, k_pad, v_pad, q_lens, k_lens, mask, sinks, softmax_scale, compute_dtype
        )
    if max_seqlen_q is None:
        raise ValueError("max_seqlen_q is required with cu_seqlens_q (packed queries)")
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    q_pad = _unpack(q, cu_seqlens_q, q_lens, max_seqlen_q)
    out_pad, lse_pad = _padded_attention(
        q_pad, k_pad, v_pad, q_lens, k_lens, mask, sinks, softmax_scale, compute_dtype
    )
    return _pack(out_pad, lse_pad, cu_seqlens_q, q.shape[0])


# ---------------------------------------------------------------------------- value checks


def check_varlen_values(
    q: Tensor,
    k: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    """Check the metadata values of a varlen call (reads tensors: a host sync on GPUs).

    Raises:
        ValueError: a cu_seqlens tensor is negative, decreasing or past its tensor's
            end, or a max_seqlen is smaller than the longest sequence.
    """
    _check_offsets("cu_seqlens_q", cu_seqlens_q, "q", q.shape[0], "max_seqlen_q", max_seqlen_q)
    _check_offsets("cu_seqlens_k", cu_seqlens_k, "k", k.shape[0], "max_seqlen_k", max_seqlen_k)


def check_kvcache_values(
    q: Tensor,
    k_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    cu_seqlens_q: Tensor | None,
    max_seqlen_q: int | None,
) -> None:
    """Check the metadata values of a KV-cache call (reads tensors: a host sync on GPUs).

    Raises:
        ValueError: negative or too large `cache_seqlens`, a block-table entry that a
            sequence reads outside [0, num_blocks), or bad `cu_seqlens_q` / `max_seqlen_q`.
    """
    lens = cache_seqlens.long()
    if block_table is None:
        capacity = k_cache.shape[1]
        where = f"k_cache seqlen_cache={capacity}"
    else:
        block_size = k_cache.shape[1]
        capacity = block_table.shape[1] * block_size
        where = f"block_table max_blocks={block_table.shape[1]} x block_size={block_size}"
    outside = (lens < 0) | (lens > capacity)
    if bool(outside.any()):
        raise ValueError(
            f"cache_seqlens must lie in [0, {capacity}] ({where}); outside it: "
            + bad_entries("cache_seqlens", lens, outside)
        )
    if block_table is not None:
        used = _used_blocks(lens, block_table.shape[1], k_cache.shape[1])
        entries = block_table.long()
        outside = used & ((entries < 0) | (entries >= k_cache.shape[0]))
        if bool(outside.any()):
            listing = bad_entries(
                "block_table", entries, outside, of=int(used.sum()), counted="entries in use"
            )
            raise ValueError(
                "block_table entries of the blocks in use must lie in "
                f"[0, num_blocks={k_cache.shape[0]}); outside it: {listing}"
            )
    if cu_seqlens_q is not None and max_seqlen_q is not None:
        _check_offsets("cu_seqlens_q", cu_seqlens_q, "q", q.shape[0], "max_seqlen_q", max_seqlen_q)


def _check_offsets(
    name: str, cu: Tensor, target: str, total: int, max_name: str, max_len: int
) -> None:
    offsets = cu.long()
    lens = offsets[1:] - offsets[:-1]
    bad = offsets < 0
    bad[1:] |= lens < 0  # an entry below the one before it
    if bool(bad.any()):
        raise ValueError(
            f"{name} must be non-negative and non-decreasing; negative or below the entry "
            f"before: {bad_entries(name, offsets, bad)}"
        )
    if offsets.numel() and int(offsets[-1]) > total:
        raise ValueError(f"{name}[-1]={int(offsets[-1])} exceeds the {total} rows of {target}")
    longest = int(lens.max()) if lens.numel() else 0
    if longest > max_len:
        raise ValueError(f"{max_name}={max_len} is smaller than the longest sequence ({longest})")


# ---------------------------------------------------------------------------- core


def _check_compute(compute_dtype: torch.dtype, num_heads: int, num_kv_heads: int) -> None:
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}"
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")


def _unpack(x: Tensor, cu_seqlens: Tensor, lens: Tensor, max_len: int) -> Tensor:
    """Packed (total, heads, dim) -> padded (batch, max_len, heads, dim), zeros past each length."""
    batch = lens.shape[0]
    pos = torch.arange(max_len, device=x.device)
    valid = pos.unsqueeze(0) < lens.unsqueeze(1)  # (batch, max_len)
    if x.shape[0] == 0:
        return x.new_zeros((batch, max_len, *x.shape[1:]))
    rows = cu_seqlens[:-1].long().unsqueeze(1) + pos.unsqueeze(0)
    rows = torch.where(valid, rows, torch.zeros_like(rows)).clamp(0, x.shape[0] - 1)
    return x[rows].masked_fill(~valid.view(batch, max_len, 1, 1), 0)


def _pack(
    out_pad: Tensor, lse_pad: Tensor, cu_seqlens: Tensor, total: int
) -> tuple[Tensor, Tensor]:
    """Padded (batch, max_len, ...) results -> packed (total, heads, dim) and (heads, total)."""
    batch, max_len, num_heads, head_dim_v = out_pad.shape
    if batch == 0 or max_len == 0:
        out = out_pad.new_zeros((total, num_heads, head_dim_v))
        lse = lse_pad.new_full((num_heads, total), -math.inf)
        return out, lse
    offsets = cu_seqlens.long()
    rows = torch.arange(total, device=out_pad.device)
    seq = torch.searchsorted(offsets[1:], rows, right=True)  # sequence owning each row
    owned = (seq < batch) & (rows >= offsets[0])
    seq = seq.clamp(max=batch - 1)
    pos = rows - offsets[seq]
    owned &= (pos >= 0) & (pos < max_len)
    pos = torch.where(owned, pos, torch.zeros_like(pos))
    out = out_pad[seq, pos].masked_fill(~owned.view(total, 1, 1), 0)
    lse = lse_pad.permute(0, 2, 1)[seq, pos].masked_fill(~owned.view(total, 1), -math.inf)
    return out.contiguous(), lse.t().contiguous()


def _used_blocks(lens: Tensor, max_blocks: int, block_size: int) -> Tensor:
    """(batch, max_blocks) bool: the blocks that hold a sequence's valid tokens."""
    first_token = torch.arange(max_blocks, device=lens.device) * block_size
    return first_token.unsqueeze(0) < lens.unsqueeze(1)


def _gather_pages(
    k_cache: Tensor, v_cache: Tensor, block_table: Tensor, lens: Tensor
) -> tuple[Tensor, Tensor]:
    """Paged caches -> contiguous (batch, max_blocks * block_size, heads, dim) views of them."""
    batch, max_blocks = block_table.shape
    block_size = k_cache.shape[1]
    if k_cache.shape[0] == 0:
        shape = (batch, max_blocks * block_size, k_cache.shape[2])
        return k_cache.new_zeros((*shape, k_cache.shape[3])), v_cache.new_zeros(
            (*shape, v_cache.shape[3])
        )
    # Entries past a sequence's last block may hold anything (vLLM leaves them stale):
    # point them at block 0 so the gather stays in range; the length mask hides them.
    used = _used_blocks(lens, max_blocks, block_size)
    table = torch.where(used, block_table.long(), torch.zeros_like(block_table, dtype=torch.long))
    k = k_cache[table].reshape(batch, max_blocks * block_size, *k_cache.shape[2:])
    v = v_cache[table].reshape(batch, max_blocks * block_size, *v_cache.shape[2:])
    return k, v


def _padded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_lens: Tensor,
    k_lens: Tensor,
    mask: Mask,
    sinks: Tensor | None,
    softmax_scale: float | None,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Attention on padded tensors, sequence b using q_lens[b] queries and k_lens[b] keys.

    q: (batch, seqlen_q, num_heads, head_dim); k, v: (batch, seqlen_k, num_kv_heads, dim).
    Returns out (batch, seqlen_q, num_heads, head_dim_v) and lse (batch, num_heads,
    seqlen_q); padded rows (i >= q_lens[b]) come back as 0 / -inf.
    """
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    rows = torch.arange(seqlen_q, device=q.device).view(1, seqlen_q, 1)
    cols = torch.arange(seqlen_k, device=q.device).view(1, 1, seqlen_k)
    q_len, k_len = q_lens.view(batch, 1, 1), k_lens.view(batch, 1, 1)
    key_valid = cols < k_len  # (batch, 1, seqlen_k)
    qf = q.to(compute_dtype).view(batch, seqlen_q, num_kv_heads, group, head_dim)
    kf = k.to(compute_dtype)
    # Cache slots past a sequence's length may hold anything (NaN in torch.empty memory):
    # zero them, since a zero probability times NaN is still NaN.
    vf = v.to(compute_dtype).masked_fill(~key_valid.view(batch, seqlen_k, 1, 1), 0)

    # (batch, num_kv_heads, group, seqlen_q, seqlen_k): GQA without repeating K/V.
    scores = reference_scores(torch.einsum("bqhgd,bkhd->bhgqk", qf, kf) * scale, mask.softcap)
    seen = key_valid & (rows < q_len)
    shown = visible(rows, cols, k_len - q_len, mask)
    if shown is not None:
        seen &= shown
    scores = scores.masked_fill(~seen.view(batch, 1, 1, seqlen_q, seqlen_k), -math.inf)
    head_sinks = None if sinks is None else sinks.view(num_kv_heads, group, 1)
    probs, lse = reference_softmax(scores, head_sinks)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vf)
    out = out.reshape(batch, seqlen_q, num_heads, vf.shape[-1]).contiguous()
    return out, lse.reshape(batch, num_heads, seqlen_q).contiguous()
