"""KV-cache attention on the GPU: `sparsek::attention_with_kvcache`, planned once per request.

How a request maps onto one kernel launch (plus the split-KV combine):

- one query token per sequence (decode: a 4-D q with seqlen_q = 1, or a packed q whose
  max_seqlen_q is 1 and total_q == batch): the query heads that share a KV head become
  the rows of one query tile (q read as (batch, group, kv_heads, d) in place), so each CTA
  reads its KV head's cache once for the whole group. With a single query the
  bottom-right causal mask hides nothing: the non-causal kernel runs. A packed q takes
  the `single_query` kernels, which find each sequence's token through cu_seqlens_q (any
  valid one: empty sequences, padding tokens) on the device.
- other requests: the kv "cache" / "paged" kernel, with `varlen_q` for a packed q (the
  kernel writes 0 / -inf to the rows past cu_seqlens_q[-1], which belong to no sequence).
- decode with at least one (sequence, KV head) tile per SM: `Workload.DECODE_FILLS_GPU`
  tiles (two CTAs per SM), never split.
- split-KV: when the (batch x heads x query tiles) CTAs cannot fill the GPU, the cache's
  key tiles are split across `num_splits` CTAs (chosen from the cache capacity, never from
  device values) and merged by the combine kernel.
- an FP8 cache (float8_e4m3fn under 16-bit queries) runs on the kernels that convert
  its tiles in shared memory (64-row tiles: one MMA warpgroup, split or not; no two-CTA
  tiles), decode and longer queries alike, with the cache's (batch, num_kv_heads)
  descales; a request they cannot serve gets the plan's reason (the callers dequantize
  the cache).
- masks (`sparsek.masks.Mask`) keep the routes above. A windowed decode takes the
  `single_query` kernels for batched queries too (their masks place every row, a head, at
  the sequence's last token), so each CTA reads only its window's key tiles, once per KV
  head. Sinks are read per kernel row: one per head, or, where a tile's rows are a KV
  head's query heads, as a (group, kv_heads) view; split-KV partials leave them out and
  the combine adds them.

Everything above follows from shapes, strides, dtype, device and flags alone, so it is
worked out once per distinct request (`kvcache_plan`, memoized) and a repeated request
(every decode step of a server) pays only for a dictionary lookup, its allocations, a few
views and the launches. Tensor values are never read (no host synchronization), so every
path is capturable in a CUDA graph once its kernels are loaded; data pointers are checked
per call (TMA needs 16-byte-aligned bases: misaligned inputs are copied).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from cutedsl_kernels.abi import call_combine, call_fmha_fwd
from cutedsl_kernels.config import Layout
from sparsek import memo
from sparsek.cache import KernelFn
from sparsek.launch import launcher
from sparsek.launch.launcher import ForwardKernel, contiguous_strides
from sparsek.launch.splits import choose_splits
from sparsek.launch.tma import ALIGN_BYTES, tma_compatible, tma_strides_ok
from sparsek.masks import CAUSAL, NO_MASK, Mask
from sparsek.tuning import Workload


@dataclass(frozen=True)
class View:
    """`t.as_strided(size, stride)` (with t's own storage offset)."""

    size: tuple[int, ...]
    stride: tuple[int, ...]

    def of(self, t: Tensor) -> Tensor:
        return t.as_strided(self.size, self.stride)


@dataclass(frozen=True)
class KvcachePlan:
    """What one request shape allocates, views and launches.

    answer: "launch"; "empty" (an output has no element: return the allocations); or
    "no_keys" (nothing to attend to: out 0, lse -inf). `readable` is False when q or a
    cache has strides TMA cannot read (the call copies them and plans again).
    """

    answer: Literal["launch", "empty", "no_keys"]
    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]
    readable: bool = True
    # q, out and lse as a batch of one packed sequence axis (unsqueezed); the kernel
    # writes 0 / -inf to the rows past cu_seqlens_q[-1] (they belong to no sequence)
    packed_rows: bool = False
    q_view: View | None = None  # None: the tensor as it is
    out_view: View | None = None
    lse_view: View | None = None
    lse_staging: tuple[int, ...] | None = None  # lse written here, then copied transposed
    varlen_q: bool = False
    rows: int = 0  # query rows per sequence and kernel head (the kernel's max_seqlen_q)
    splits: int = 1
    mask: Mask = NO_MASK  # the kernel's (causal dropped where a single query sees every key)
    sinks_view: View | None = None  # (rows, heads) of the (num_heads,) sinks; None: (1, H)
    kernel: ForwardKernel | None = None
    combine: KernelFn | None = None
    # (shape, contiguous strides) of every allocation a call makes: out, lse, the lse
    # staging buffer, the split-KV partial O and LSE (`torch.empty_strided` allocates
    # faster than `torch.empty`).
    allocations: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(
        init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        lse_rows = self.lse_staging or self.lse_shape
        if self.packed_rows:  # the kernel's outputs: out and lse unsqueezed
            out_k, lse_k = (1, *self.out_shape), (1, *self.lse_shape)
        else:
            out_k = self.out_view.size if self.out_view else self.out_shape
            lse_k = self.lse_view.size if self.lse_view else lse_rows
        shapes = {
            "out": self.out_shape, "lse": self.lse_shape, "lse_staging": lse_rows,
            "o_part": (self.splits, *out_k), "lse_part": (self.splits, *lse_k),
        }  # fmt: skip
        allocations = {name: (shape, contiguous_strides(shape)) for name, shape in shapes.items()}
        object.__setattr__(self, "allocations", allocations)

    def empty(self, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A fresh contiguous allocation `name` (see `allocations`)."""
        shape, stride = self.allocations[name]
        return launcher.empty(shape, dtype, device, stride)


def kvcache_plan(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    cu_seqlens_q: Tensor | None,
    max_seqlen_q: int | None,
    mask: Mask,
    num_splits: int,
) -> KvcachePlan | str:
    """The plan of this request with `mask` (loading its kernels on first use), or why no
    kernel serves it. Shapes as in `sparsek.ops`; arguments already validated."""
    key = (
        q.shape,
        q.stride(),
        q.dtype,
        q.get_device(),
        k_cache.dtype,
        k_cache.shape,
        k_cache.stride(),
        v_cache.shape,
        v_cache.stride(),
        cache_seqlens.shape[0],
        None if block_table is None else block_table.shape[1],
        cu_seqlens_q is None,
        max_seqlen_q,
        mask,
        num_splits,
    )
    found = _PLANS.get(key)
    if found is None:
        found = memo.remember(_PLANS, key, _build_plan(
            q, k_cache, v_cache, cache_seqlens.shape[0], block_table, cu_seqlens_q,
            max_seqlen_q, mask, num_splits,
        ))  # fmt: skip
    return found


_PLANS: dict[tuple[object, ...], KvcachePlan | str] = {}
memo.register(_PLANS.clear)


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    cu_seqlens_q: Tensor | None,
    max_seqlen_q: int | None,
    mask: Mask,
    softmax_scale: float,
    num_splits: int,
    plan: KvcachePlan | None = None,
    sinks: Tensor | None = None,
    descales: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a request a kernel serves (`plan`: its `kvcache_plan`, looked up when None);
    `sinks`: the (num_heads,) sink logits of a mask with sinks; `descales`: an FP8
    cache's (k_descale, v_descale), (batch, num_kv_heads) float32."""
    meta = (cache_seqlens, block_table, cu_seqlens_q, max_seqlen_q, mask)
    if plan is None:
        found = kvcache_plan(q, k_cache, v_cache, *meta, num_splits)
        assert not isinstance(found, str), found  # the caller checked
        plan = found
    out = plan.empty("out", q.dtype, q.device)
    lse = plan.empty("lse", torch.float32, q.device)
    if plan.answer != "launch":
        if plan.answer == "no_keys":
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse
    pointers = q.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr()
    if not plan.readable or pointers % ALIGN_BYTES:
        q, k_cache, v_cache = (tma_compatible(t) for t in (q, k_cache, v_cache))
        found = kvcache_plan(q, k_cache, v_cache, *meta, num_splits)
        assert not isinstance(found, str) and found.readable, found
        return attention_with_kvcache(
            q, k_cache, v_cache, *meta, softmax_scale, num_splits, found, sinks, descales
        )
    kernel = plan.kernel
    assert kernel is not None

    lse_rows = lse if plan.lse_staging is None else plan.empty("lse_staging", lse.dtype, q.device)
    if plan.packed_rows:  # the kernel writes rows past cu_seqlens_q[-1] too (0, -inf)
        q_k, out_k, lse_k = q.unsqueeze(0), out.unsqueeze(0), lse.unsqueeze(0)
    else:
        q_k = q if plan.q_view is None else plan.q_view.of(q)
        out_k = out if plan.out_view is None else plan.out_view.of(out)
        lse_k = lse_rows if plan.lse_view is None else plan.lse_view.of(lse_rows)
    cu_q = cu_seqlens_q.contiguous() if plan.varlen_q and cu_seqlens_q is not None else None
    table = block_table.contiguous() if block_table is not None else None
    seqused_k = cache_seqlens.contiguous()
    kmask = plan.mask
    k_descale, v_descale = (None, None) if descales is None else descales
    if sinks is not None:  # one logit per kernel (row, head), for the kernel or the combine
        sinks = sinks.contiguous()
        sinks = sinks.view(1, -1) if plan.sinks_view is None else plan.sinks_view.of(sinks)
    with launcher.device_guard(q.device):
        if plan.combine is None:
            call_fmha_fwd(
                kernel.fn, q_k, k_cache, v_cache, out_k, lse_k,
                cu_seqlens_q=cu_q, seqused_k=seqused_k, page_table=table, sinks=sinks,
                k_descale=k_descale, v_descale=v_descale,
                softmax_scale=float(softmax_scale), max_seqlen_q=plan.rows, num_ctas=0,
                window_left=kmask.window_left, window_right=kmask.window_right,
                softcap=kmask.softcap,
            )  # fmt: skip
        else:
            o_part = plan.empty("o_part", torch.float32, q.device)
            lse_part = plan.empty("lse_part", torch.float32, q.device)
            if plan.packed_rows:  # rows past cu_seqlens_q[-1]: empty in every split
                lse_part.fill_(float("-inf"))
            call_fmha_fwd(
                kernel.fn, q_k, k_cache, v_cache, o_part, lse_part,
                cu_seqlens_q=cu_q, seqused_k=seqused_k, page_table=table,
                k_descale=k_descale, v_descale=v_descale,
                softmax_scale=float(softmax_scale), max_seqlen_q=plan.rows,
                num_splits=plan.splits, num_ctas=0, window_left=kmask.window_left,
                window_right=kmask.window_right, softcap=kmask.softcap,
            )  # fmt: skip
            call_combine(plan.combine, o_part, lse_part, out_k, lse_k, sinks)
    if lse_rows is not lse:
        lse.copy_(lse_rows.t())
    return out, lse


def _build_plan(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    batch: int,
    block_table: Tensor | None,
    cu_seqlens_q: Tensor | None,
    max_seqlen_q: int | None,
    mask: Mask,
    num_splits: int,
) -> KvcachePlan | str:
    num_heads, head_dim, head_dim_v = q.shape[-2], q.shape[-1], v_cache.shape[-1]
    num_kv_heads = k_cache.shape[2]
    packed = cu_seqlens_q is not None
    if packed:
        total_q = q.shape[0]
        seqlen_q = int(max_seqlen_q or 0)
        out_shape: tuple[int, ...] = (total_q, num_heads, head_dim_v)
        lse_shape: tuple[int, ...] = (num_heads, total_q)
    else:
        seqlen_q = q.shape[1]
        out_shape = (batch, seqlen_q, num_heads, head_dim_v)
        lse_shape = (batch, num_heads, seqlen_q)
    paged = block_table is not None
    capacity = (block_table.shape[1] if block_table is not None else 1) * k_cache.shape[1]
    # One query per sequence, its heads as a tile's rows.
    decode = seqlen_q == 1 and (not packed or q.shape[0] == batch)
    if decode and mask.causal:  # a sequence's single query sees every key
        mask = dataclasses.replace(mask, causal=False)
    kv_layout, page_size = ("paged", k_cache.shape[1]) if paged else ("cache", 0)
    # Batched decode without a window reads no query position: the kernels without the
    # single_query flag serve it.
    single_query = decode and (packed or mask.window)
    layout = Layout(packed, kv_layout, page_size, single_query=single_query)
    spec = mask.spec
    workload = Workload.DECODE if decode else Workload.DEFAULT
    config = launcher.kernel_config(q, v_cache, spec, layout, workload)
    if isinstance(config, str):
        return config
    if math.prod(out_shape) == 0:
        return KvcachePlan("empty", out_shape, lse_shape)
    # No sequence at all (batch 0): every packed row is padding; the kernels index
    # cu_seqlens_q / cache_seqlens by sequence, so nothing is launched.
    if capacity == 0 or seqlen_q == 0 or batch == 0:
        return KvcachePlan("no_keys", out_shape, lse_shape)
    if not all(tma_strides_ok(t) for t in (q, k_cache, v_cache)):
        return KvcachePlan("launch", out_shape, lse_shape, readable=False)

    group = num_heads // num_kv_heads
    q_view = out_view = lse_view = sinks_view = None
    lse_staging = None
    if decode:
        # (batch, group, kv_heads, d): head h = kv_head * group + g, the group's heads
        # are one tile's rows. out is contiguous, so are lse and its staging buffer.
        size = (batch, group, num_kv_heads, head_dim)
        q_head = q.stride(-2)
        q_view = View(size, (q.stride(0), q_head, group * q_head, 1))
        out_view = View(
            (batch, group, num_kv_heads, head_dim_v),
            (num_heads * head_dim_v, head_dim_v, group * head_dim_v, 1),
        )
        lse_view = View((batch, num_kv_heads, group), (num_heads, group, 1))
        if packed:  # lse (num_heads, batch) is not row-contiguous per group: stage it
            lse_staging = (batch, num_heads)
        rows, kernel_heads = group, num_kv_heads
        # sinks[g, kv_head] is head kv_head * group + g's logit
        sinks_view = View((group, num_kv_heads), (1, group))
    else:
        rows, kernel_heads = seqlen_q, num_heads

    ctas = math.ceil(rows / config.tile_m) * kernel_heads * batch
    converts = k_cache.dtype != q.dtype  # an FP8 cache: its kernels have no 2-CTA tiles
    cache_dtype = k_cache.dtype if converts else None
    if decode and num_splits <= 1 and ctas >= launcher.num_sms(q.device.index) and not converts:
        # A tile per SM or more without splitting: the two-CTAs-per-SM decode tiles, which
        # have no split-KV variant (their CTAs fill under half of the CTA slots, where the
        # wave heuristic would split a long cache).
        workload = Workload.DECODE_FILLS_GPU
        config = launcher.kernel_config(q, v_cache, spec, layout, workload)
        assert not isinstance(config, str), config  # a tuning of a request served above
        splits = 1
    else:
        key_tiles = math.ceil(capacity / config.tile_n)
        splits = choose_splits(num_splits, ctas, key_tiles, q.device)
    if splits == 1:
        combine = None
    else:
        layout = dataclasses.replace(layout, split_kv=True)
        spec = dataclasses.replace(spec, sinks=False)  # partials leave sinks to the combine
        combine = launcher.combine_kernel(q.device, head_dim_v, q.dtype, mask.sinks)
    kernel = launcher.forward_kernel(
        q.device, head_dim, q.dtype, spec, layout, workload, head_dim_v=head_dim_v,
        cache_dtype=cache_dtype,
    )  # fmt: skip
    return KvcachePlan(
        "launch", out_shape, lse_shape,
        packed_rows=packed and not decode, q_view=q_view, out_view=out_view, lse_view=lse_view,
        lse_staging=lse_staging, varlen_q=packed, rows=rows, splits=splits, mask=mask,
        sinks_view=sinks_view if mask.sinks else None, kernel=kernel, combine=combine,
    )  # fmt: skip


def load_kvcache_kernels(
    device: torch.device,
    head_dim: int,
    dtype: torch.dtype,
    page_size: int,
    mask: Mask = CAUSAL,
    cache_dtype: torch.dtype | None = None,
) -> None:
    """Load (compile on a cache miss) every kernel `attention_with_kvcache` may launch for
    packed queries over a cache of `page_size` (0: contiguous) with `mask`, the canonical
    mask of the calls to come (`make_mask` of their causal, window_size, softcap and sinks;
    default: causal), the cache in `cache_dtype` (None: `dtype`; float8_e4m3fn: the
    kernels that convert it):

    - packed queries with the mask, and decode (one query per sequence: the `single_query`
      kernels, the mask without causal, since a single query sees every key), each with
      and without split-KV (split kernels leave sinks to the combine);
    - decode of a batch that fills the GPU (never split; not over an FP8 cache);
    - the combine (adding sinks when the mask has them);
    - (paged) the cache update `store_paged_kv` (quantizing into an FP8 cache).

    Serving engines call this before their first request or CUDA-graph capture, once per
    mask their layers use.

    Raises:
        UnsupportedError: no registered kernel serves one of them.
    """
    kv_layout = "paged" if page_size else "cache"
    cache_dtype = None if cache_dtype == dtype else cache_dtype
    decode_mask = dataclasses.replace(mask, causal=False)  # a single query sees every key
    for single_query, kernel_mask, workload in (
        (False, mask, Workload.DEFAULT),
        (True, decode_mask, Workload.DECODE),
    ):
        for split in (False, True):
            layout = Layout(True, kv_layout, page_size, split, single_query)
            spec = dataclasses.replace(kernel_mask.spec, sinks=kernel_mask.sinks and not split)
            launcher.forward_kernel(
                device, head_dim, dtype, spec, layout, workload, cache_dtype=cache_dtype
            )
    if cache_dtype is None:
        fills_gpu = Layout(True, kv_layout, page_size, single_query=True)
        launcher.forward_kernel(
            device, head_dim, dtype, decode_mask.spec, fills_gpu, Workload.DECODE_FILLS_GPU
        )
    launcher.combine_kernel(device, head_dim, dtype, mask.sinks)
    if page_size:
        launcher.kv_store_kernel(device, head_dim, dtype, cache_dtype)


def request_layout(
    k_cache: Tensor, block_table: Tensor | None, cu_seqlens_q: Tensor | None
) -> Layout:
    """The (non-split) kernel layout of an attention_with_kvcache request."""
    paged = block_table is not None
    return Layout(
        varlen_q=cu_seqlens_q is not None,
        kv_layout="paged" if paged else "cache",
        page_size=k_cache.shape[1] if paged else 0,
    )
