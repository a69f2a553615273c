"""The tensors of one benchmark case, and the float32 reference output they must produce.

Three layouts, one per kind of problem:

    DenseInputs   q, k, v in (batch, seqlen, heads, head_dim)           grid, gqa, ... suites
    VarlenInputs  q, k, v packed (total, heads, head_dim) + cu_seqlens   varlen suite
    PagedInputs   q (batch, 1, heads, head_dim) + paged K/V cache         decode suite
                  + the same keys gathered into dense (batch, kv_heads, context, head_dim)

Every tensor is fresh `torch.randn` (never zeros), seeded per case. The paged cache's block
table is a random permutation of all blocks, so consecutive blocks of a sequence are scattered
over the pool as in a serving engine; the dense copy for SDPA and the reference is gathered
through that table before anything is timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

from perf.reference import reference_attention, reference_attention_varlen
from perf.shapes import Case


@dataclass(frozen=True)
class DenseInputs:
    q: Tensor  # (batch, seqlen_q, num_heads, head_dim)
    k: Tensor  # (batch, seqlen_k, num_kv_heads, head_dim)
    v: Tensor  # (batch, seqlen_k, num_kv_heads, head_dim)


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


Inputs: TypeAlias = DenseInputs | VarlenInputs | PagedInputs


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    """Random inputs of `case` (seeded with `seed`), in the layout its suite calls for."""
    torch.manual_seed(seed)
    if case.seqlens:
        return _varlen(case, dtype, device)
    if case.block_size:
        return _paged(case, dtype, device)
    q_shape = (case.batch, case.seqlen_q, case.num_heads, case.head_dim)
    kv_shape = (case.batch, case.seqlen_k, case.num_kv_heads, case.head_dim)
    return DenseInputs(
        q=torch.randn(q_shape, dtype=dtype, device=device),
        k=torch.randn(kv_shape, dtype=dtype, device=device),
        v=torch.randn(kv_shape, dtype=dtype, device=device),
    )


def _varlen(case: Case, dtype: torch.dtype, device: torch.device) -> VarlenInputs:
    total = case.total_tokens
    offsets = [0]
    for n in case.seqlens:
        offsets.append(offsets[-1] + n)
    return VarlenInputs(
        q=torch.randn(total, case.num_heads, case.head_dim, dtype=dtype, device=device),
        k=torch.randn(total, case.num_kv_heads, case.head_dim, dtype=dtype, device=device),
        v=torch.randn(total, case.num_kv_heads, case.head_dim, dtype=dtype, device=device),
        cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=device),
        max_seqlen=max(case.seqlens),
    )


def _paged(case: Case, dtype: torch.dtype, device: torch.device) -> PagedInputs:
    batch, context, block_size = case.batch, case.seqlen_k, case.block_size
    kv_heads, head_dim = case.num_kv_heads, case.head_dim
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    block_table = torch.randperm(num_blocks, device=device).to(torch.int32)
    block_table = block_table.view(batch, blocks_per_seq)
    k = torch.empty(batch, kv_heads, context, head_dim, dtype=dtype, device=device)
    v = torch.empty_like(k)
    # One sequence at a time: the gather's temporary stays one sequence's K (or V).
    for b in range(batch):
        blocks = block_table[b].long()
        k[b] = k_cache[blocks].reshape(context, kv_heads, head_dim).transpose(0, 1)
        v[b] = v_cache[blocks].reshape(context, kv_heads, head_dim).transpose(0, 1)
    return PagedInputs(
        q=torch.randn(batch, 1, case.num_heads, head_dim, dtype=dtype, device=device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table,
        cache_seqlens=torch.full((batch,), context, dtype=torch.int32, device=device),
        k=k,
        v=v,
    )


def reference(case: Case, inputs: Inputs) -> Tensor:
    """float32 output every provider is checked against, in the layout providers return.

    Dense: (batch, seqlen_q, heads, head_dim); varlen: (total, heads, head_dim); decode:
    (batch, 1, heads, head_dim), from the gathered dense K/V (the one query is the last
    token, so the bottom-right causal mask lets it see the whole context).
    """
    if isinstance(inputs, VarlenInputs):
        cu = inputs.cu_seqlens
        return reference_attention_varlen(inputs.q, inputs.k, inputs.v, cu, cu, case.causal)
    if isinstance(inputs, PagedInputs):
        k, v = inputs.k.transpose(1, 2), inputs.v.transpose(1, 2)
        return reference_attention(inputs.q, k, v, causal=case.causal)
    return reference_attention(inputs.q, inputs.k, inputs.v, causal=case.causal)
