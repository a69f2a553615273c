"""The inputs, the call and the check of one fuzz config (`tests/fuzz_configs.py`), on any
device: the GPU fuzz (`tests/gpu/test_fuzz_gpu.py`) runs them on CUDA, where the kernels
serve them; the CPU tests run them on CPU (sparsek's reference path, to test this harness)
and build them on the meta device (to check every config against the API's validation).

Compared against: float64 attention per sequence on the dense per-sequence tensors each
layout is built from (cut from the packed tensors before any padding, or generated before
they are written into the cache), so the expected values never read a layout, a block
table, padding or unused slots; tolerance relative to a same-dtype peer's own error, per
sequence:

    max|out - ref| <= 2 * max|peer - ref| + atol   (atol 1e-3 fp16, 2e-3 bf16)

- no mask or causal: the oracle is `tests/attention_oracle.reference_f64` and the peer
  PyTorch SDPA in the inputs' dtype;
- a window, softcap or sinks (no PyTorch kernel has them): the oracle is
  `masked_attention` in float64, written here from the masks' documented semantics
  (`docs/guide/masks.md`; independent of `sparsek.masks`), and the peer the same
  computation in float32 rounded where the kernels round: the softcap's tanh to 11
  significant bits (the kernels' hardware tanh.approx has a relative error of 2^-11),
  the probabilities to the inputs' dtype before P.V, the output to that dtype.

LSE: -inf exactly where the oracle's is (rows that see no key, with or without a sink),
elsewhere within atol 2e-3, rtol 1e-3 of it (sinks included, as `sparsek.masks` defines
the LSE); rows that see no key exactly 0. Rows of a packed q past the last sequence must
be 0 with lse -inf.

Every tensor is built from `config.seed`: values from a `torch.Generator` on the device
(q, k, v, then the sink logits), the block permutation from `random.Random`. Storage that
a view does not cover (padded heads or head channels, the element before a misaligned
base) is NaN: a kernel that reads it writes NaN, which the check reports.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from attention_oracle import reference_f64, sdpa_in_dtype, sequence_problems
from fuzz_configs import NO_WINDOW, FuzzConfig, is_plain
from torch import Tensor

import sparsek

# Keys in unused cache slots are scaled up so that one read by mistake dominates its row.
GARBAGE_SCALE = 8.0
# Problems listed per config at most (the rest are counted).
MAX_PROBLEMS = 6


@dataclass
class Case:
    """One config's inputs and call, and where each sequence's rows are in the output.

    The output is compared token-major: out (rows, H, D) and lse (H, rows), whatever the
    entry point's layout (`token_major`).
    """

    config: FuzzConfig
    q_seqs: list[Tensor]  # (q_len, H, D) per sequence
    k_seqs: list[Tensor]  # (k_len, Hkv, D)
    v_seqs: list[Tensor]
    api: Callable[..., object]
    args: tuple[object, ...]
    kwargs: dict[str, object]
    rows: int  # output rows, token-major
    parts: list[slice]  # each sequence's rows
    padding: slice | None  # rows of no sequence (a packed q past cu_seqlens_q[-1])
    metadata: dict[str, list[int] | list[list[int]] | None]  # the int32 arguments, as lists
    sinks: Tensor | None = None  # (H,) float32 sink logits the call passes

    def call(self) -> tuple[Tensor, Tensor | None]:
        """Run the entry point: (out (rows, H, D), lse (H, rows) or None)."""
        return token_major(self.config, self.api(*self.args, **self.kwargs))


def token_major(config: FuzzConfig, result: object) -> tuple[Tensor, Tensor | None]:
    """An entry point's result as (out (rows, H, D), lse (H, rows) or None)."""
    if config.variant == "dense_sdpa":  # (B, H, S, D), no LSE
        assert isinstance(result, Tensor)
        out = result.transpose(1, 2)
        return out.reshape(-1, *out.shape[2:]), None
    assert isinstance(result, tuple)
    out, lse = result
    if out.dim() == 4:  # (B, S, H, D), lse (B, H, S)
        return out.reshape(-1, *out.shape[2:]), lse.transpose(0, 1).reshape(lse.shape[1], -1)
    return out, lse  # packed: (T, H, D), lse (H, T)


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype), name
    return dtype


def int32(values: list[int] | list[list[int]], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def offsets(lens: tuple[int, ...]) -> list[int]:
    return [0, *itertools.accumulate(lens)]


class Source:
    """Random values of one config on one device (meta: shapes only)."""

    def __init__(self, config: FuzzConfig, device: torch.device) -> None:
        self.device = device
        self.dtype = torch_dtype(config.dtype)
        self.gen = None
        if device.type != "meta":
            self.gen = torch.Generator(device=device).manual_seed(config.seed)

    def randn(self, *shape: int, scale: float = 1.0) -> Tensor:
        t = torch.randn(shape, dtype=self.dtype, device=self.device, generator=self.gen)
        return t * scale if scale != 1.0 else t

    def nan(self, *shape: int) -> Tensor:
        return torch.full(shape, math.nan, dtype=self.dtype, device=self.device)

    def filler(self, nan: bool, *shape: int, scale: float = 1.0) -> Tensor:
        """What no sequence owns: NaN, or random values (`scale` times larger)."""
        return self.nan(*shape) if nan else self.randn(*shape, scale=scale)

    def sinks(self, heads: int, loc: float, spread: float) -> Tensor:
        """(heads,) float32 sink logits: loc + spread * N(0, 1)."""
        t = torch.randn(heads, dtype=torch.float32, device=self.device, generator=self.gen)
        return t * spread + loc


def place(x: Tensor, views: str) -> Tensor:
    """`x`'s values in another memory layout (a view); storage outside the view is NaN.

    "contiguous": x itself. "transposed": sequence and head axes (-3, -2) swapped in
    memory (BHSD storage; a cache's HND). "padded_heads": 3 spare heads around, the view
    starting at head 1. "padded_dim": 8 spare channels after each head. "misaligned": the
    base 2 bytes off 16-byte alignment (TMA cannot read it: the launch path copies it).
    """
    if views in ("contiguous", "packed"):
        return x
    if views == "transposed":
        return x.transpose(-3, -2).contiguous().transpose(-3, -2)
    nan = math.nan
    if views == "padded_heads":
        heads = x.shape[-2]
        storage = x.new_full((*x.shape[:-2], heads + 3, x.shape[-1]), nan)
        view = storage[..., 1 : 1 + heads, :]
    elif views == "padded_dim":
        storage = x.new_full((*x.shape[:-1], x.shape[-1] + 8), nan)
        view = storage[..., : x.shape[-1]]
    elif views == "misaligned":
        view = x.new_full((x.numel() + 1,), nan)[1:].view(x.shape)
    else:
        raise ValueError(f"views={views!r} is not one of fuzz_configs.VIEWS")
    return view.copy_(x)


def build_case(config: FuzzConfig, device: torch.device | str) -> Case:
    """The inputs and call of `config` on `device` (see the module docstring)."""
    device = torch.device(device)
    build = {"dense": dense_case, "varlen": varlen_case, "kvcache": kvcache_case}[config.path]
    src = Source(config, device)
    case = build(config, src)
    if config.sinks is not None:
        case.sinks = src.sinks(config.heads[0], *config.sinks)
    case.kwargs.update(mask_kwargs(config, case.sinks))
    return case


def mask_kwargs(config: FuzzConfig, sinks: Tensor | None) -> dict[str, object]:
    """The mask arguments of the call beyond `causal` (those left at their defaults are not
    passed, as most callers leave them out)."""
    kwargs: dict[str, object] = {}
    if config.window != NO_WINDOW:
        kwargs["window_size"] = config.window
    if config.softcap:
        kwargs["softcap"] = config.softcap
    if sinks is not None:
        kwargs["sinks"] = sinks
    return kwargs


def dense_case(config: FuzzConfig, src: Source) -> Case:
    b, sq, sk = config.batch, config.q_lens[0], config.k_lens[0]
    (h, hkv), d = config.heads, config.head_dim
    q, k, v = src.randn(b, sq, h, d), src.randn(b, sk, hkv, d), src.randn(b, sk, hkv, d)
    if config.views == "packed":  # one (B, S, H + 2 Hkv, D) tensor split along heads
        qv, kv, vv = torch.cat([q, k, v], dim=2).split([h, hkv, hkv], dim=2)
    else:
        qv, kv, vv = (place(t, config.views) for t in (q, k, v))
    api: Callable[..., object]
    if config.variant == "dense_sdpa":
        api = sparsek.scaled_dot_product_attention
        args: tuple[object, ...] = tuple(t.transpose(1, 2) for t in (qv, kv, vv))
        kwargs: dict[str, object] = {
            "is_causal": config.causal, "scale": config.scale, "enable_gqa": h != hkv
        }  # fmt: skip
    else:
        api, args = sparsek.attention, (qv, kv, vv)
        kwargs = {"causal": config.causal, "softmax_scale": config.scale, "return_lse": True}
    parts = [slice(i * sq, (i + 1) * sq) for i in range(b)]
    return Case(
        config, list(q), list(k), list(v), api, args, kwargs, b * sq, parts, None, metadata={}
    )


def varlen_case(config: FuzzConfig, src: Source) -> Case:
    (h, hkv), d = config.heads, config.head_dim
    tq, tk = sum(config.q_lens), sum(config.k_lens)
    q = src.randn(tq + config.pad_q, h, d)
    k, v = src.randn(tk + config.pad_k, hkv, d), src.randn(tk + config.pad_k, hkv, d)
    if config.nan_padding:  # serving engines allocate with torch.empty
        q[tq:], k[tk:], v[tk:] = math.nan, math.nan, math.nan
    if config.views == "packed":  # one (total, H + 2 Hkv, D) tensor split along heads
        qv, kv, vv = torch.cat([q, k, v], dim=1).split([h, hkv, hkv], dim=1)
    else:
        qv, kv, vv = (place(t, config.views) for t in (q, k, v))
    cu_q, cu_k = offsets(config.q_lens), offsets(config.k_lens)
    args = (
        qv, kv, vv, int32(cu_q, src.device), int32(cu_k, src.device),
        config.max_seqlen_q, config.max_seqlen_k,
    )  # fmt: skip
    kwargs = {"causal": config.causal, "softmax_scale": config.scale, "return_lse": True}
    return Case(
        config,
        list(q[:tq].split(config.q_lens)),
        list(k[:tk].split(config.k_lens)),
        list(v[:tk].split(config.k_lens)),
        sparsek.attention_varlen,
        args,
        kwargs,
        tq + config.pad_q,
        [slice(a, b) for a, b in itertools.pairwise(cu_q)],
        slice(tq, tq + config.pad_q) if config.pad_q else None,
        metadata={"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k},
    )


def kvcache_case(config: FuzzConfig, src: Source) -> Case:
    (h, hkv), d, b = config.heads, config.head_dim, config.batch
    ks = [src.randn(n, hkv, d) for n in config.k_lens]
    vs = [src.randn(n, hkv, d) for n in config.k_lens]
    cu_q: list[int] | None = None
    if config.packed_q:
        cu_q = offsets(config.q_lens)
        tq = cu_q[-1]
        q = src.randn(tq + config.pad_q, h, d)
        if config.nan_padding:
            q[tq:] = math.nan
        q_seqs = list(q[:tq].split(config.q_lens))
        parts = [slice(a, z) for a, z in itertools.pairwise(cu_q)]
        rows, padding = tq + config.pad_q, slice(tq, tq + config.pad_q) if config.pad_q else None
    else:
        sq = config.q_lens[0]
        q = src.randn(b, sq, h, d)
        q_seqs, parts = list(q), [slice(i * sq, (i + 1) * sq) for i in range(b)]
        rows, padding = b * sq, None
    k_cache, v_cache, table = fill_cache(config, src, ks, vs)
    if config.views == "packed":  # K and V as halves of one cache tensor (vLLM's layout)
        kv = torch.cat([k_cache, v_cache], dim=-1)
        qv, kcv, vcv = q, kv[..., :d], kv[..., d:]
    else:
        qv, kcv, vcv = (place(t, config.views) for t in (q, k_cache, v_cache))
    device = src.device
    kwargs: dict[str, object] = {
        "cu_seqlens_q": None if cu_q is None else int32(cu_q, device),
        "max_seqlen_q": config.max_seqlen_q if config.packed_q else None,
        "causal": config.causal,
        "softmax_scale": config.scale,
        "num_splits": config.num_splits,
        "return_lse": True,
    }
    seqlens = list(config.k_lens)
    args = (qv, kcv, vcv, int32(seqlens, device), None if table is None else int32(table, device))
    return Case(
        config, q_seqs, ks, vs, sparsek.attention_with_kvcache, args, kwargs, rows, parts,
        padding, metadata={"cu_seqlens_q": cu_q, "cache_seqlens": seqlens, "block_table": table},
    )  # fmt: skip


def fill_cache(
    config: FuzzConfig, src: Source, ks: list[Tensor], vs: list[Tensor]
) -> tuple[Tensor, Tensor, list[list[int]] | None]:
    """(k_cache, v_cache, block table rows or None) holding each sequence's keys and values.

    Contiguous: (B, capacity, Hkv, D). Paged: (num_blocks, block_size, Hkv, D), every
    sequence's blocks at ids of a random permutation, `spare_blocks` that no sequence uses,
    and `capacity_slack` block-table columns past the longest sequence's blocks; table
    entries past a sequence's last block point at spare blocks. Unused slots and spare
    blocks hold `Source.filler` (NaN, or large random keys).
    """
    hkv, d, nan = config.heads[1], config.head_dim, config.nan_padding
    lens = config.k_lens
    if not config.page_size:
        capacity = config.capacity
        k_cache = src.filler(nan, config.batch, capacity, hkv, d, scale=GARBAGE_SCALE)
        v_cache = src.filler(nan, config.batch, capacity, hkv, d)
        for i, (kb, vb) in enumerate(zip(ks, vs, strict=True)):
            k_cache[i, : lens[i]], v_cache[i, : lens[i]] = kb, vb
        return k_cache, v_cache, None
    block = config.page_size
    used = [-(-n // block) for n in lens]
    max_blocks = config.table_width
    num_blocks = sum(used) + config.spare_blocks
    order = list(range(num_blocks))
    random.Random(config.seed).shuffle(order)
    spare = order[sum(used) :]
    k_cache = src.filler(nan, num_blocks, block, hkv, d, scale=GARBAGE_SCALE)
    v_cache = src.filler(nan, num_blocks, block, hkv, d)
    table, start = [], 0
    for i, (kb, vb) in enumerate(zip(ks, vs, strict=True)):
        ids = order[start : start + used[i]]
        start += used[i]
        if lens[i]:  # token t: block ids[t // block], offset t % block
            t = torch.arange(lens[i], device=src.device)
            blocks = torch.tensor(ids, dtype=torch.long, device=src.device)[t // block]
            k_cache[blocks, t % block], v_cache[blocks, t % block] = kb, vb
        table.append(ids + [spare[j % len(spare)] for j in range(max_blocks - used[i])])
    return k_cache, v_cache, table


# ---------------------------------------------------------------------------- the check


def check(case: Case, out: Tensor, lse: Tensor | None) -> list[str]:
    """Every problem of one call's result (empty: it passed), per sequence."""
    config = case.config
    h, d = config.heads[0], config.head_dim
    want = (case.rows, h, d)
    if tuple(out.shape) != want or out.dtype != torch_dtype(config.dtype):
        return [f"out {out.dtype} {tuple(out.shape)}, expected {config.dtype} {want}"]
    if lse is not None and tuple(lse.shape) != (h, case.rows):
        return [f"lse shape {tuple(lse.shape)} (token-major), expected {(h, case.rows)}"]
    scale = config.scale if config.scale is not None else 1.0 / math.sqrt(d)
    problems = []
    for i, part in enumerate(case.parts):
        qb, kb, vb = case.q_seqs[i], case.k_seqs[i], case.v_seqs[i]
        ref, ref_lse, peer = expected(config, case.sinks, scale, qb, kb, vb)
        part_lse = None if lse is None else lse[:, part]
        for problem in sequence_problems(out[part], ref, peer, part_lse, ref_lse):
            problems.append(f"sequence {i} (q_len={qb.shape[0]}, k_len={kb.shape[0]}): {problem}")
    if case.padding is not None:
        pad = case.padding
        if not bool((out[pad] == 0).all()):
            problems.append(f"rows {pad.start}..{pad.stop - 1} past the last sequence are not 0")
        if lse is not None and not bool(torch.isneginf(lse[:, pad]).all()):
            problems.append(
                f"lse of rows {pad.start}..{pad.stop - 1} past the last sequence not -inf"
            )
    return problems


def expected(
    config: FuzzConfig, sinks: Tensor | None, scale: float, q: Tensor, k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(float64 out, float64 lse, same-dtype peer's out) of one sequence (see the module
    docstring)."""
    if is_plain(config.mask):
        causal, top_left = config.spec.causal, config.top_left
        ref, ref_lse = reference_f64(q, k, v, causal, scale, top_left=top_left)
        return ref, ref_lse, sdpa_in_dtype(q, k, v, causal, scale, top_left=top_left)
    mask = (config.band, config.softcap, sinks)
    ref, ref_lse = masked_attention(q, k, v, scale, *mask)
    peer, _ = masked_attention(q, k, v, scale, *mask, peer=True)
    return ref, ref_lse, peer


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    band: tuple[int, int],
    softcap: float,
    sinks: Tensor | None,
    *,
    peer: bool = False,
) -> tuple[Tensor, Tensor]:
    """One sequence with a sliding window, softcap and sinks: out (sq, H, Dv), lse (H, sq).

    q: (sq, H, D); k: (sk, Hkv, D); v: (sk, Hkv, Dv); query head h uses KV head
    h // (H / Hkv). Query i sees key j iff i + off - left <= j <= i + off + right with
    off = sk - sq (bottom-right), `band` = (left, right), -1 unbounded on that side.
    Scores s = scale * q.k become softcap * tanh(s / softcap) when softcap > 0; sinks
    (H,) join the denominator of the rows of their head that see a key: lse =
    log(exp(sink) + sum_j exp(s_j)), out = sum_j exp(s_j - lse) v_j. A row that sees no
    key: out 0, lse -inf.

    Float64 (the oracle), or with `peer` the kernels' roundings: float32 scores, tanh to
    11 significant bits, probabilities to q's dtype, the output in q's dtype.
    """
    sq, h, d = q.shape
    sk, hkv, dv = v.shape
    group = h // hkv
    compute = torch.float32 if peer else torch.float64
    qf = q.to(compute).reshape(sq, hkv, group, d)
    scores = torch.einsum("qhgd,khd->hgqk", qf, k.to(compute)) * scale
    if softcap > 0:
        capped = torch.tanh(scores / softcap)
        if peer:
            capped = capped.to(torch.float16).to(compute)
        scores = softcap * capped
    left, right = band
    diagonal = torch.arange(sq, device=q.device).view(sq, 1) + (sk - sq)
    keys = torch.arange(sk, device=q.device).view(1, sk)
    shown = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if right >= 0:
        shown &= keys <= diagonal + right
    if left >= 0:
        shown &= keys >= diagonal - left
    scores = scores.masked_fill(~shown, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (Hkv, group, sq); -inf: the row sees no key
    sees = ~torch.isneginf(lse)
    if sinks is not None:
        sink = sinks.to(compute).view(hkv, group, 1).expand_as(lse)
        lse = torch.where(sees, torch.logaddexp(lse, sink), lse)
    probs = torch.exp(scores - torch.where(sees, lse, 0.0).unsqueeze(-1))
    if peer:
        probs = probs.to(q.dtype).to(compute)
    out = torch.einsum("hgqk,khd->qhgd", probs, v.to(compute)).reshape(sq, h, dv)
    if peer:
        out = out.to(q.dtype)
    return out, lse.reshape(h, sq)


def run_config(config: FuzzConfig, device: torch.device | str) -> list[str]:
    """Build, call and check one config (on CUDA, synchronized after the call so that a
    kernel's fault is reported as this config's); the problems found, at most
    `MAX_PROBLEMS` listed. Exceptions propagate."""
    case = build_case(config, device)
    out, lse = case.call()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    problems = check(case, out, lse)
    if len(problems) > MAX_PROBLEMS:
        extra = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], f"... and {extra} more"]
    return problems
