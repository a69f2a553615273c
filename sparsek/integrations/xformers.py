"""sparsek as an xFormers attention operator: `SparseKAttention`.

    import xformers.ops as xops
    from sparsek.integrations.xformers import SparseKAttention

    out = xops.memory_efficient_attention_forward(q, k, v, attn_bias, op=SparseKAttention)
    out = xops.memory_efficient_attention(q, k, v, attn_bias, op=(SparseKAttention, None))

What it runs: `torch.ops.sparsek.attention` (forward only). CUDA tensors go to the sm_90a
kernels; CPU tensors run sparsek's float32 reference (the correctness oracle, not a fast
path), so code written against this operator also runs on a machine without a GPU.

Supported (everything else is refused by `not_supported_reasons`, with the reason):
  * devices: cuda (compute capability 9.0, head_dim 32, 64, 96, 128, 192 or 256),
    cpu (any head_dim; float16 only, since xFormers refuses bfloat16 off the GPU);
  * dtypes: float16, bfloat16; key/value head_dim equal to query's;
  * attn_bias: None, LowerTriangularMask (causal, top-left aligned),
    LowerTriangularFromBottomRightMask (causal, bottom-right aligned); custom `scale`;
    local (sliding-window) biases, aligned bottom-right as sparsek's `window_size`:
    LocalAttentionFromBottomRightMask(window_left, window_right) (window (window_left,
    window_right): each bound inclusive) and LowerTriangularFromBottomRightLocalAttentionMask
    (window_size) (causal, the window_size keys ending on the diagonal: window
    (window_size - 1, 0));
    block-diagonal (variable-length) biases on sparsek's varlen kernels:
    BlockDiagonalMask, BlockDiagonalCausalFromBottomRightMask, BlockDiagonalCausalMask
    (when every block has as many queries as keys, where top-left = bottom-right),
    BlockDiagonalPaddedKeysMask and BlockDiagonalCausalWithOffsetPaddedKeysMask (keys in
    a padded per-sequence cache) and their Paged... variants (keys in a paged cache;
    page_size a multiple of 16); their local forms, the window converted as above and
    aligned per block: BlockDiagonalCausalLocalAttentionFromBottomRightMask,
    BlockDiagonalCausalLocalAttentionMask (when every block has as many queries as keys),
    BlockDiagonalLocalAttentionPaddedKeysMask and
    BlockDiagonalCausalLocalAttentionPaddedKeysMask;
  * layouts: BMK, BMHK and BMGHK. Grouped-query / multi-query attention is expressed in
    xFormers by expanding K/V along the head axis with stride 0; such K/V are narrowed
    back to their real heads (a view, no copy) and run as sparsek's GQA.

Not supported: gappy-keys masks; top-left block-diagonal masks (BlockDiagonalCausalMask,
BlockDiagonalCausalLocalAttentionMask) with a block whose query and key counts differ;
tensor biases; dropout; a custom output dtype; partial attention; and backward (inputs
that require grad are refused).

Shapes handed to xFormers: output like the query with value's head_dim; LSE (when asked
for, `needs_gradient=True`) float32 of shape (B, H, Mq) for BMHK or (B, G, H, Mq) for BMGHK
(B = 1 with block-diagonal biases), natural log, -inf for rows that see no key.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

try:
    from xformers.ops.fmha import attn_bias as _xbias
    from xformers.ops.fmha.common import AttentionFwOpBase, Context, Inputs
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "sparsek.integrations.xformers needs xFormers, which is not installed "
        f"({type(exc).__name__}: {exc}); install the release it is written against: "
        "pip install xformers==0.0.35 (or, in a sparsek checkout: pip install '.[xformers]')"
    ) from exc

from sparsek import api_varlen, ops
from sparsek.masks import NO_WINDOW, make_mask
from sparsek.registry import dtype_name
from sparsek.routing import registry_blockers, static_head_dim

__all__ = ["SparseKAttention"]

# The base class adds this reason for CUDA inputs when xFormers' own C++/CUDA extension is
# not loaded. sparsek launches its own kernels and never calls that extension.
_XFORMERS_EXTENSION_REASON = "xFormers wasn't build with CUDA support"

# Block-diagonal biases served by the varlen kernels: type -> (where the keys are, causal).
# "packed": keys packed like the queries (attention_varlen); "padded": each sequence's keys
# at the start of a fixed-size slot (a contiguous KV cache); "paged": a paged KV cache.
_BLOCK_DIAGONAL: dict[type, tuple[str, bool]] = {
    _xbias.BlockDiagonalMask: ("packed", False),
    _xbias.BlockDiagonalCausalMask: ("packed", True),
    _xbias.BlockDiagonalCausalFromBottomRightMask: ("packed", True),
    _xbias.BlockDiagonalCausalLocalAttentionMask: ("packed", True),
    _xbias.BlockDiagonalCausalLocalAttentionFromBottomRightMask: ("packed", True),
    _xbias.BlockDiagonalPaddedKeysMask: ("padded", False),
    _xbias.BlockDiagonalCausalWithOffsetPaddedKeysMask: ("padded", True),
    _xbias.BlockDiagonalLocalAttentionPaddedKeysMask: ("padded", False),
    _xbias.BlockDiagonalCausalLocalAttentionPaddedKeysMask: ("padded", True),
    _xbias.PagedBlockDiagonalPaddedKeysMask: ("paged", False),
    _xbias.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask: ("paged", True),
}
# Block-diagonal biases whose mask is aligned top-left in each block: served only where
# that equals sparsek's bottom-right alignment (every block as many queries as keys).
_TOP_LEFT_BLOCKS: tuple[type, ...] = (
    _xbias.BlockDiagonalCausalMask,
    _xbias.BlockDiagonalCausalLocalAttentionMask,
)
_PAGE_MULTIPLE = 16
# Local (sliding-window) biases -> how their window reads, per xFormers' `materialize`:
# "band": key j is visible to query i iff i + offset - window_left <= j <= i + offset +
#   window_right (both bounds inclusive; offset = keys - queries, per block for the
#   block-diagonal ones): sparsek's window (window_left, window_right).
# "causal": the `_window_size` keys ending on the causal diagonal, the diagonal counted
#   (i + offset - _window_size < j <= i + offset): sparsek's window (_window_size - 1, 0).
_LOCAL: dict[type, str] = {
    _xbias.LocalAttentionFromBottomRightMask: "band",
    _xbias.BlockDiagonalLocalAttentionPaddedKeysMask: "band",
    _xbias.LowerTriangularFromBottomRightLocalAttentionMask: "causal",
    _xbias.BlockDiagonalCausalLocalAttentionMask: "causal",
    _xbias.BlockDiagonalCausalLocalAttentionFromBottomRightMask: "causal",
    _xbias.BlockDiagonalCausalLocalAttentionPaddedKeysMask: "causal",
}
# Dense biases: type -> (causal, causal diagonal aligned top-left).
_DENSE: dict[type, tuple[bool, bool]] = {
    type(None): (False, False),
    _xbias.LowerTriangularMask: (True, True),
    _xbias.LowerTriangularFromBottomRightMask: (True, False),
    _xbias.LocalAttentionFromBottomRightMask: (False, False),
    _xbias.LowerTriangularFromBottomRightLocalAttentionMask: (True, False),
}


class SparseKAttention(AttentionFwOpBase):  # type: ignore[misc]
    """xFormers forward operator backed by sparsek (`torch.ops.sparsek.attention`).

    Pass it as `op=SparseKAttention` to `memory_efficient_attention_forward` /
    `memory_efficient_attention_forward_requires_grad`, or as `op=(SparseKAttention, None)`
    to `memory_efficient_attention`. See the module docstring for what it supports;
    `SparseKAttention.not_supported_reasons(inputs)` says why a given input is refused.
    """

    OPERATOR = torch.ops.sparsek.attention
    NAME = "sparsekF"
    SUPPORTED_DEVICES: set[str] = {"cuda", "cpu"}  # noqa: RUF012 (xFormers' declared type)
    CUDA_MINIMUM_COMPUTE_CAPABILITY = (9, 0)
    SUPPORTED_DTYPES: set[torch.dtype] = {torch.float16, torch.bfloat16}  # noqa: RUF012
    # Head dims are checked per device in `not_supported_reasons`: on CUDA the registry's
    # (32, 64, 96, 128, 192, 256 on sm_90a), on CPU any (the reference is exact for every head_dim).
    SUPPORTED_MAX_K = math.inf
    SUPPORTED_MIN_K = 1
    SUPPORTED_ATTN_BIAS_TYPES: tuple[Any, ...] = (*_DENSE, *_BLOCK_DIAGONAL)
    SUPPORTS_DROPOUT = False
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = False
    SUPPORTS_OUTPUT_DTYPE = False
    SUPPORTS_PARTIAL = False
    SUPPORTS_BMGHK = True
    IS_DETERMINISTIC = True

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        """Why these inputs cannot run on this operator (empty when they can).

        Args:
            d: xFormers' normalized inputs (query/key/value in BMHK or BMGHK).

        Returns:
            One sentence per problem: xFormers' generic checks (device, dtype, compute
            capability, bias type, dropout, output dtype, ...) plus sparsek's own (bias
            types that need the varlen kernel, head dims without a kernel, gradients).
        """
        reasons: list[str] = [
            r for r in super().not_supported_reasons(d) if r != _XFORMERS_EXTENSION_REASON
        ]
        query, key, value = d.query, d.key, d.value
        reasons.extend(_bias_reasons(d.attn_bias))
        if type(d.attn_bias) in _BLOCK_DIAGONAL:
            reasons.extend(_block_diagonal_reasons(d.attn_bias, query, key))
        for name, t in (("key", key), ("value", value)):
            if t.dtype != query.dtype:
                reasons.append(f"{name}.dtype={t.dtype} differs from query.dtype={query.dtype}")
        if d.scale is not None and not (math.isfinite(d.scale) and d.scale > 0):
            reasons.append(f"scale={d.scale} must be finite and > 0")
        if any(t.requires_grad for t in (query, key, value)):
            reasons.append(
                "backward is not provided: sparsek is forward-only, but query/key/value "
                "require grad; detach them (or pick an xFormers op with a backward pass)"
            )
        head_dim = query.shape[-1]
        if (
            query.device.type == "cuda"
            and query.dtype in cls.SUPPORTED_DTYPES
            and value.shape[-1] == head_dim
        ):
            index = query.device.index if query.device.index is not None else -1
            causal, window = _mask_args(d.attn_bias)
            mask = make_mask(causal, window).spec.name
            reasons.extend(
                registry_blockers(index, static_head_dim(head_dim), dtype_name(query.dtype), mask)
            )
        return reasons

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> tuple[Tensor, Context | None]:
        """Run the forward pass.

        Args:
            inp: inputs `not_supported_reasons` accepted; query (B, Mq, H, K) or
                (B, Mq, G, H, K), key/value (B, Mk, H, K) or (B, Mk, G, H, K).
            needs_gradient: also return a `Context` holding the LSE (xFormers asks for it
                in `memory_efficient_attention_forward_requires_grad`).

        Returns:
            out: query's shape with value's head_dim, query's dtype; and a `Context` with
            lse (B, H, Mq) or (B, G, H, Mq) float32 when `needs_gradient`, else None.

        Raises:
            NotImplementedError: the bias type is not supported (see
                `not_supported_reasons`).
        """
        bias = inp.attn_bias
        if type(bias) not in cls.SUPPORTED_ATTN_BIAS_TYPES:
            raise NotImplementedError(
                f"SparseKAttention does not support attn_bias of type {type(bias).__name__}: "
                + "; ".join(_bias_reasons(bias))
            )
        query = inp.query
        q, k, v = _to_sparsek_layout(query, inp.key, inp.value)
        scale = float(inp.scale_float)
        if type(bias) in _BLOCK_DIAGONAL:
            out, lse = _block_diagonal(bias, q, k, v, scale)
        else:
            causal, top_left = _DENSE[type(bias)]
            out, lse = _attention_bshd(q, k, v, causal, scale, top_left, _window(bias))
        out = out.view(*query.shape[:-1], out.shape[-1])
        if not needs_gradient:
            return out, None
        if query.ndim == 5:
            lse = lse.reshape(lse.shape[0], query.shape[2], query.shape[3], lse.shape[-1])
        return out, Context(out=out, lse=lse)


def _window(bias: object) -> tuple[int, int]:
    """sparsek's (left, right) window of a supported bias (`_LOCAL` gives the reading);
    (-1, -1) for a bias without one."""
    kind = _LOCAL.get(type(bias))
    if kind == "band":
        return int(bias.window_left), int(bias.window_right)  # type: ignore[attr-defined]
    if kind == "causal":
        return int(bias._window_size) - 1, 0  # type: ignore[attr-defined]
    return NO_WINDOW


def _mask_args(bias: object) -> tuple[bool, tuple[int, int]]:
    """(causal, window) of a supported bias in sparsek's terms; (False, no window) for
    a bias this operator does not serve."""
    if type(bias) in _BLOCK_DIAGONAL:
        return _BLOCK_DIAGONAL[type(bias)][1], _window(bias)
    return _DENSE.get(type(bias), (False, False))[0], _window(bias)


def _bias_reasons(bias: object) -> list[str]:
    """sparsek's specific reasons for refusing a bias (empty for the supported ones)."""
    kind = type(bias).__name__
    supported = "supported: " + ", ".join("None" if t is type(None) else t.__name__ for t in _DENSE)
    if type(bias) in SparseKAttention.SUPPORTED_ATTN_BIAS_TYPES:
        return []
    blocks = ", ".join(t.__name__ for t in _BLOCK_DIAGONAL)
    if "Local" in kind:
        local = ", ".join(t.__name__ for t in _LOCAL)
        return [
            f"attn_bias {kind}: this local (sliding-window) bias is not supported "
            f"(supported local biases: {local})"
        ]
    if isinstance(bias, tuple(_xbias.VARLEN_BIASES)):
        return [f"attn_bias {kind} is not supported ({supported}; block-diagonal: {blocks})"]
    if isinstance(bias, (Tensor, _xbias.LowerTriangularMaskWithTensorBias)):
        return [f"attn_bias {kind}: tensor (additive) biases are not supported ({supported})"]
    return [f"attn_bias {kind} is not supported ({supported})"]


def _block_diagonal_reasons(bias: Any, query: Tensor, key: Tensor) -> list[str]:
    """Shape conditions under which a supported block-diagonal bias maps onto the kernels."""
    kind = type(bias).__name__
    reasons = []
    if query.shape[0] != 1:
        reasons.append(f"attn_bias {kind} needs batch size 1 (got {query.shape[0]})")
    if type(bias) in _TOP_LEFT_BLOCKS:
        q_lens, k_lens = _block_lengths(bias.q_seqinfo), _block_lengths(bias.k_seqinfo)
        if q_lens != k_lens:
            bottom_right = (
                "BlockDiagonalCausalLocalAttentionFromBottomRightMask"
                if type(bias) is _xbias.BlockDiagonalCausalLocalAttentionMask
                else "BlockDiagonalCausalFromBottomRightMask"
            )
            reasons.append(
                f"attn_bias {kind} aligns each block's diagonal top-left: supported only when "
                f"every block has as many queries as keys (use {bottom_right} for "
                "bottom-right alignment)"
            )
    where, _ = _BLOCK_DIAGONAL[type(bias)]
    slots = (len(bias.k_seqinfo.seqstart_py) - 1) * getattr(bias.k_seqinfo, "padding", 0)
    if where == "padded" and key.shape[1] != slots:
        reasons.append(
            f"attn_bias {kind}: key has {key.shape[1]} rows, expected {slots} (sequences x padding)"
        )
    if where == "paged" and bias.page_size % _PAGE_MULTIPLE:
        reasons.append(
            f"attn_bias {kind}: page_size={bias.page_size} is not supported "
            f"(supported: multiples of {_PAGE_MULTIPLE})"
        )
    return reasons


def _block_lengths(seqinfo: Any) -> list[int]:
    starts = seqinfo.seqstart_py
    return [b - a for a, b in itertools.pairwise(starts)]


def _block_diagonal(
    bias: Any, q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """A block-diagonal bias on (1, M, heads, K) tensors -> (out (1, Mq, H, Kv), lse (1, H, Mq))."""
    where, causal = _BLOCK_DIAGONAL[type(bias)]
    window = _window(bias)
    q3, k3, v3 = q[0], k[0], v[0]
    cu_q = bias.q_seqinfo.seqstart.to(q.device)
    max_q = int(bias.q_seqinfo.max_seqlen)
    if where == "packed":
        out, lse = api_varlen.attention_varlen(
            q3, k3, v3, cu_q, bias.k_seqinfo.seqstart.to(q.device), max_q,
            int(bias.k_seqinfo.max_seqlen), causal=causal, softmax_scale=scale,
            window_size=window, return_lse=True,
        )  # fmt: skip
    else:
        rows = bias.page_size if where == "paged" else bias.k_seqinfo.padding
        table = bias.block_tables.to(q.device) if where == "paged" else None
        out, lse = api_varlen.attention_with_kvcache(
            q3, k3.reshape(-1, rows, *k3.shape[1:]), v3.reshape(-1, rows, *v3.shape[1:]),
            bias.k_seqinfo.seqlen.to(q.device), table, cu_seqlens_q=cu_q, max_seqlen_q=max_q,
            causal=causal, softmax_scale=scale, window_size=window, return_lse=True,
        )  # fmt: skip
    return out.unsqueeze(0), lse.unsqueeze(0)


def _to_sparsek_layout(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, M, [G,] H, K) xFormers tensors -> sparsek's (B, M, heads, K), views where possible.

    The query's (G, H) axes merge into G*H heads (group-major, as xFormers numbers them).
    K/V expanded along H with stride 0 (xFormers' way to write GQA/MQA) keep one head per
    group, so K/V head g serves query heads [g*H, (g+1)*H): sparsek's GQA convention. A K/V
    head axis that is expanded altogether becomes a single head (MQA). Nothing is copied
    except a query (or a partly expanded K/V) whose axes cannot merge as a view.
    """
    if query.ndim == 5:
        batch, seqlen_q, groups, heads, head_dim = query.shape
        query = query.reshape(batch, seqlen_q, groups * heads, head_dim)
        if heads == 1 or (key.stride(3) == 0 and value.stride(3) == 0):
            key, value = key[:, :, :, 0], value[:, :, :, 0]
        else:
            key = key.reshape(batch, key.shape[1], groups * heads, key.shape[-1])
            value = value.reshape(batch, value.shape[1], groups * heads, value.shape[-1])
    if key.shape[2] > 1 and key.stride(2) == 0 and value.stride(2) == 0:
        key, value = key[:, :, :1], value[:, :, :1]
    return _unit_dims_strided(query), _unit_dims_strided(key), _unit_dims_strided(value)


def _unit_dims_strided(t: Tensor) -> Tensor:
    """`t` with stride-0 axes of size 1 given ordinary strides (a view of the same memory).

    Such strides are legal (an axis of size 1 is never stepped along) but the kernel's TMA
    rules want positive strides and would copy the tensor; here any stride is equally right.
    """
    if not any(n == 1 and s == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True)):
        return t
    strides = list(t.stride())
    for axis in range(t.ndim - 2, -1, -1):
        if t.shape[axis] == 1 and strides[axis] == 0:
            strides[axis] = strides[axis + 1] * t.shape[axis + 1]
    return t.as_strided(t.shape, strides, t.storage_offset())


def _attention_bshd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    top_left: bool,
    window: tuple[int, int] = NO_WINDOW,
) -> tuple[Tensor, Tensor]:
    """The sparsek op on BSHD tensors -> (out (B, Sq, H, Kv), lse (B, H, Sq) float32);
    `window` is sparsek's (left, right), aligned like the causal diagonal."""
    if q.device.type == "cuda":
        return ops.call_attention(q, k, v, causal, scale, top_left, make_mask(causal, window))
    result: tuple[Tensor, Tensor] = torch.ops.sparsek.attention(
        q, k, v, causal, scale, top_left, *window
    )
    return result
