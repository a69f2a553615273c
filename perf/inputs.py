"""The tensors of one benchmark case, and the float32 reference output they must produce.

Four layouts, one per kind of problem:

    DenseInputs   q, k, v in (batch, seqlen, heads, head_dim)           grid, gqa, ... suites
    VarlenInputs  q, k, v packed (total, heads, head_dim) + cu_seqlens   varlen suite (and the
                                                                         xformers suite's
                                                                         block-diagonal biases)
    PagedInputs   q (batch, 1, heads, head_dim) + paged K/V cache         decode suite
                  + the same keys gathered into dense (batch, kv_heads, context, head_dim)
    CacheInputs   packed q + padded or paged K/V cache + cache_seqlens    xformers suite's
                  + the valid keys gathered and packed (total_k, ...)    padded / paged keys

Every tensor is fresh `torch.randn` (never zeros), seeded per case; a padded cache's unused
slots hold random values too (reading them would fail the check). A paged cache's block
table is a random permutation of all blocks, so consecutive blocks of a sequence are scattered
over the pool as in a serving engine; the dense / packed copy for SDPA and the reference is
gathered through that table before anything is timed.

The masks suite (dense or paged decode layouts) scales q by `shapes.MASKS_Q_SCALE` and, for
sinks, adds one sink logit per query head (`sink_logits`); its outputs are checked against
sparsek's float64 reference (`masks_reference`) instead of the float32 one (`expected`
picks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

from perf import shapes
from perf.reference import Reference, RowBlocks, reference_attention, reference_attention_varlen
from perf.shapes import Case


@dataclass(frozen=True)
class DenseInputs:
    q: Tensor  # (batch, seqlen_q, num_heads, head_dim)
    k: Tensor  # (batch, seqlen_k, num_kv_heads, head_dim)
    v: Tensor  # (batch, seqlen_k, num_kv_heads, head_dim)
    sinks: Tensor | None = None  # (num_heads,) float32: masks suite, `Case.sinks`


@dataclass(frozen=True)
class VarlenInputs:
    q: Tensor  # (total, num_heads, head_dim)
    k: Tensor  # (total, num_kv_heads, head_dim)
    v: Tensor  # (total, num_kv_heads, head_dim)
    # (batch + 1,) int32 offsets, the same for queries and keys (self-attention prefill).
    cu_seqlens: Tensor
    max_seqlen: int


@dataclass(frozen=True)
class PagedInputs:
    q: Tensor  # (batch, 1, num_heads, head_dim)
    k_cache: Tensor  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: Tensor  # (num_blocks, block_size, num_kv_heads, head_dim)
    block_table: Tensor  # (batch, context / block_size) int32
    cache_seqlens: Tensor  # (batch,) int32, = context for every sequence
    # The cache's keys and values of each sequence in order, contiguous
    # (batch, num_kv_heads, context, head_dim): what the SDPA rows and the reference read.
    k: Tensor
    v: Tensor
    sinks: Tensor | None = None  # (num_heads,) float32: masks suite, `Case.sinks`


@dataclass(frozen=True)
class CacheInputs:
    """Chunked prefill against a KV cache: each sequence's new queries are the last
    `seqlens[b]` of its `cache_seqlens[b]` keys (xFormers' ...PaddedKeysMask biases)."""

    q: Tensor  # (total_q, num_heads, head_dim), packed
    cu_seqlens_q: Tensor  # (batch + 1,) int32
    max_seqlen_q: int
    # Padded: (batch, kv_padding, num_kv_heads, head_dim), sequence b's keys in row b.
    # Paged: (num_blocks, block_size, num_kv_heads, head_dim), through block_table.
    k_cache: Tensor
    v_cache: Tensor
    cache_seqlens: Tensor  # (batch,) int32: valid keys per sequence (its kv_seqlen)
    block_table: Tensor | None  # (batch, kv_padding / block_size) int32; None when padded
    # The valid keys of each sequence in order, packed (total_k, num_kv_heads, head_dim),
    # with their offsets: what the SDPA rows and the reference read.
    k: Tensor
    v: Tensor
    cu_seqlens_k: Tensor  # (batch + 1,) int32
    max_seqlen_k: int


Inputs: TypeAlias = DenseInputs | VarlenInputs | PagedInputs | CacheInputs


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    """Random inputs of `case` (seeded with `seed`), in the layout its suite calls for."""
    torch.manual_seed(seed)
    if case.suite == shapes.MASKS_SUITE:
        return _masks(case, dtype, device)
    return _unmasked(case, dtype, device)


def _unmasked(case: Case, dtype: torch.dtype, device: torch.device) -> Inputs:
    if case.kv_seqlens:
        return _cache(case, dtype, device)
    if case.seqlens:
        return _varlen(case, dtype, device)
    if case.block_size:
        return _paged(case, dtype, device)
    q_shape = (case.batch, case.seqlen_q, case.num_heads, case.head_dim)
    kv_shape = (case.batch, case.seqlen_k, case.num_kv_heads, case.head_dim)
    v_shape = (*kv_shape[:-1], case.value_head_dim)
    return DenseInputs(
        q=torch.randn(q_shape, dtype=dtype, device=device),
        k=torch.randn(kv_shape, dtype=dtype, device=device),
        v=torch.randn(v_shape, dtype=dtype, device=device),
    )


def sink_logits(case: Case, device: torch.device) -> Tensor:
    """(num_heads,) float32 sink logits: log(seqlen_k) + linspace(-2, 2). A row that sees
    all n = seqlen_k keys has a log-sum-exp near log n + 2 (scores of standard deviation 2),
    so its sink takes from ~2% (first head) to ~50% (last head) of its probability, and more
    of a row that sees fewer keys: the check tells an output with the sinks from one
    without."""
    spread = torch.linspace(-2.0, 2.0, case.num_heads, dtype=torch.float32)
    return (spread + math.log(case.seqlen_k)).to(device)


def _masks(case: Case, dtype: torch.dtype, device: torch.device) -> Inputs:
    """The masks suite's dense or paged inputs: q times MASKS_Q_SCALE, sinks if asked for."""
    inputs = _unmasked(case, dtype, device)
    assert isinstance(inputs, (DenseInputs, PagedInputs))
    sinks = sink_logits(case, device) if case.sinks else None
    return dataclasses.replace(inputs, q=inputs.q * shapes.MASKS_Q_SCALE, sinks=sinks)


def masks_reference(case: Case, inputs: Inputs) -> Reference:
    """The masks suite's reference: `sparsek.reference.reference_attention` in float64 with
    the case's window, softcap and sinks. Decode: each sequence against its gathered keys
    (the one query is the last token). Dense: the whole output, or the blocks of query rows
    `shapes.masks_check_rows` names, each with the keys [0, stop + seqlen_k - seqlen_q) (the
    mask then puts every row on its own diagonal)."""
    from sparsek.reference import reference_attention as sparsek_reference

    if not isinstance(inputs, (DenseInputs, PagedInputs)):
        raise TypeError(f"masks cases are dense or paged decode, not {type(inputs).__name__}")
    sinks = inputs.sinks if case.sinks else None

    def ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, _ = sparsek_reference(
            q, k, v, causal=case.causal, window_size=case.window, softcap=case.softcap,
            sinks=sinks, compute_dtype=torch.float64,
        )  # fmt: skip
        return out

    if isinstance(inputs, PagedInputs):
        k, v = inputs.k.transpose(1, 2), inputs.v.transpose(1, 2)
        rows = [ref(inputs.q[b : b + 1], k[b : b + 1], v[b : b + 1]) for b in range(case.batch)]
        return torch.cat(rows)
    q, k, v = inputs.q, inputs.k, inputs.v
    blocks = shapes.masks_check_rows(case)
    if blocks is None:
        return ref(q, k, v)
    # Without a diagonal (no window, non-causal) every row sees every key.
    diagonal = case.causal or case.window != shapes.NO_WINDOW
    parts = []
    for start, stop in blocks:
        keys = slice(0, stop + case.seqlen_k - case.seqlen_q if diagonal else case.seqlen_k)
        parts.append((start, ref(q[:, start:stop], k[:, keys], v[:, keys])))
    return RowBlocks(shape=tuple(q.shape), blocks=tuple(parts))


def _offsets(lengths: tuple[int, ...]) -> list[int]:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return offsets


def _varlen(case: Case, dtype: torch.dtype, device: torch.device) -> VarlenInputs:
    total = case.total_tokens
    return VarlenInputs(
        q=torch.randn(total, case.num_heads, case.head_dim, dtype=dtype, device=device),
        k=torch.randn(total, case.num_kv_heads, case.head_dim, dtype=dtype, device=device),
        v=torch.randn(total, case.num_kv_heads, case.head_dim, dtype=dtype, device=device),
        cu_seqlens=torch.tensor(_offsets(case.seqlens), dtype=torch.int32, device=device),
        max_seqlen=max(case.seqlens),
    )


def _cache(case: Case, dtype: torch.dtype, device: torch.device) -> CacheInputs:
    """Padded cache (batch, kv_padding, ...) or, with block_size, a paged cache of
    batch * kv_padding / block_size blocks in random order; plus the valid keys packed."""
    batch, padding, block_size = case.batch, case.kv_padding, case.block_size
    kv_heads, head_dim = case.num_kv_heads, case.head_dim
    if block_size:
        cache_shape: tuple[int, ...] = (batch * padding // block_size, block_size)
    else:
        cache_shape = (batch, padding)
    cache_shape += (kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    block_table = None
    if block_size:
        block_table = torch.randperm(cache_shape[0], device=device).to(torch.int32)
        block_table = block_table.view(batch, padding // block_size)
    q = torch.randn(case.total_tokens, case.num_heads, head_dim, dtype=dtype, device=device)
    k = torch.empty(case.key_tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.empty_like(k)
    offsets_k = _offsets(case.kv_seqlens)
    # One sequence at a time: the gather's temporary stays one sequence's K (or V).
    for b, n in enumerate(case.kv_seqlens):
        start = offsets_k[b]
        if block_table is None:
            k[start : start + n], v[start : start + n] = k_cache[b, :n], v_cache[b, :n]
            continue
        blocks = block_table[b].long()
        k[start : start + n] = k_cache[blocks].reshape(padding, kv_heads, head_dim)[:n]
        v[start : start + n] = v_cache[blocks].reshape(padding, kv_heads, head_dim)[:n]
    return CacheInputs(
        q=q,
        cu_seqlens_q=torch.tensor(_offsets(case.seqlens), dtype=torch.int32, device=device),
        max_seqlen_q=max(case.seqlens),
        k_cache=k_cache,
        v_cache=v_cache,
        cache_seqlens=torch.tensor(case.kv_seqlens, dtype=torch.int32, device=device),
        block_table=block_table,
        k=k,
        v=v,
        cu_seqlens_k=torch.tensor(offsets_k, dtype=torch.int32, device=device),
        max_seqlen_k=max(case.kv_seqlens),
    )


def _paged(case: Case, dtype: torch.dtype, device: torch.device) -> PagedInputs:
    batch, context, block_size = case.batch, case.seqlen_k, case.block_size
    kv_heads, head_dim, head_dim_v = case.num_kv_heads, case.head_dim, case.value_head_dim
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim_v, dtype=dtype, device=device)
    block_table = torch.randperm(num_blocks, device=device).to(torch.int32)
    block_table = block_table.view(batch, blocks_per_seq)
    k = torch.empty(batch, kv_heads, context, head_dim, dtype=dtype, device=device)
    v = torch.empty(batch, kv_heads, context, head_dim_v, dtype=dtype, device=device)
    # One sequence at a time: the gather's temporary stays one sequence's K (or V).
    for b in range(batch):
        blocks = block_table[b].long()
        k[b] = k_cache[blocks].reshape(context, kv_heads, head_dim).transpose(0, 1)
        v[b] = v_cache[blocks].reshape(context, kv_heads, head_dim_v).transpose(0, 1)
    return PagedInputs(
        q=torch.randn(batch, 1, case.num_heads, head_dim, dtype=dtype, device=device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table,
        cache_seqlens=torch.full((batch,), context, dtype=torch.int32, device=device),
        k=k,
        v=v,
    )


def expected(case: Case, inputs: Inputs) -> Reference:
    """What every provider's output on `inputs` is checked against: `masks_reference` for
    the masks suite (float64, maybe blocks of rows), else `reference`."""
    if case.suite == shapes.MASKS_SUITE:
        return masks_reference(case, inputs)
    return reference(case, inputs)


def reference(case: Case, inputs: Inputs) -> Tensor:
    """float32 output every provider is checked against, in the layout providers return.

    Dense: (batch, seqlen_q, heads, head_dim); varlen (and block-diagonal biases): (total,
    heads, head_dim), each sequence on its own (keys = queries per block, so top-left and
    bottom-right causal agree); decode: (batch, 1, heads, head_dim), from the gathered dense
    K/V (the one query is the last token, so the bottom-right causal mask lets it see the
    whole context); padded / paged keys: (total_q, heads, head_dim), each sequence's queries
    against its kv_seqlen valid keys, causal bottom-right w.r.t. kv_seqlen (xFormers'
    ...CausalWithOffsetPaddedKeysMask). The xformers suite's local biases add their
    `case.window` on the same diagonal (per sequence for the block-diagonal ones).
    """
    causal, window = case.causal, case.window
    if isinstance(inputs, CacheInputs):
        cu_q, cu_k = inputs.cu_seqlens_q, inputs.cu_seqlens_k
        return reference_attention_varlen(inputs.q, inputs.k, inputs.v, cu_q, cu_k, causal, window)
    if isinstance(inputs, VarlenInputs):
        cu = inputs.cu_seqlens
        return reference_attention_varlen(inputs.q, inputs.k, inputs.v, cu, cu, causal, window)
    if isinstance(inputs, PagedInputs):
        k, v = inputs.k.transpose(1, 2), inputs.v.transpose(1, 2)
        return reference_attention(inputs.q, k, v, causal, window)
    return reference_attention(inputs.q, inputs.k, inputs.v, causal, window)
