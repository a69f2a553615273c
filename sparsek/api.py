"""Public entry points: `attention` (FlashAttention layout) and an SDPA drop-in.

`attention` validates its inputs (`sparsek.validation`); the drop-in checks only whether
the kernels serve a call (`routing.sdpa_blockers`) and leaves the rest to PyTorch's SDPA,
so it accepts and rejects what SDPA does. Then, by `sparsek.routing`'s rule: inputs that
require grad fall back (on every device), other CPU tensors take the documented CPU path
(the op's reference; the drop-in: SDPA), and the rest run the `sparsek::attention` op
where a registered kernel serves them, else fall back to
`torch.nn.functional.scaled_dot_product_attention` (each distinct fallback reason logged
once; with `SPARSEK_STRICT=1` in the environment a fallback raises `UnsupportedError`
instead).

A plain eager call that passed validation and the kernel check is remembered by its
signature (`_eager_signature`), so a repeated call builds one key and runs its plan.

Strides: any strides are accepted. Inputs whose layout TMA cannot read are copied
(contiguously) inside the op; the values, and so the result, are unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsek import fp8, memo, ops  # ops also registers the torch.ops.sparsek ops
from sparsek.fp8 import Fp8Call, check_fp8_args
from sparsek.launch import dense, tma
from sparsek.masks import (
    CAUSAL,
    NO_MASK,
    NO_SOFTCAP,
    NO_WINDOW,
    Mask,
    check_mask_args,
    make_mask,
)
from sparsek.reference import reference_attention
from sparsek.registry import ARCH_ENV
from sparsek.routing import (
    NEEDS_GRAD,
    Path,
    dense_blockers,
    fallback,
    forward_path,
    sdpa_blockers,
)
from sparsek.validation import check_flag, check_qkv, resolve_scale


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = NO_SOFTCAP,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head attention, softmax(q k^T * scale) v, in (batch, seqlen, heads, head_dim) layout.

    Grouped-query / multi-query attention is implied by num_kv_heads < num_heads: K/V head
    j serves query heads [j * g, (j + 1) * g) with g = num_heads // num_kv_heads. The causal
    mask is bottom-right aligned (FlashAttention's convention): query i sees key j iff
    j <= i + seqlen_k - seqlen_q. Rows that see no key return 0 (lse -inf).

    Args:
        q: (batch, seqlen_q, num_heads, head_dim), float16/bfloat16 for the kernels,
            float8_e4m3fn with descales (`sparsek.fp8`; other floating dtypes fall back).
        k: (batch, seqlen_k, num_kv_heads, head_dim), same dtype and device as q.
        v: (batch, seqlen_k, num_kv_heads, head_dim_v), same dtype and device as q.
        causal: apply the bottom-right aligned causal mask.
        softmax_scale: multiplier of q k^T; finite and > 0; 1/sqrt(head_dim) when None.
        window_size: (left, right) sliding window, aligned like causal: query i sees key j
            iff i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right;
            -1 is unbounded (`causal` sets right to 0). (-1, -1): no window.
        softcap: > 0: scores s become softcap * tanh(s / softcap) before the softmax
            (Gemma 2); 0: none.
        sinks: (num_heads,) float32 sink logits on q's device (gpt-oss): each joins the
            softmax denominator of its head's rows, taking probability from the values.
            The LSE then includes it: log(exp(sink) + sum_j exp(s_j)) for a row that sees
            a key (-inf for a row that sees none).
        return_lse: also return the log-sum-exp of each row.
        q_descale, k_descale, v_descale: FP8 inputs only, and required with them:
            (batch, num_kv_heads) float32 factors that dequantize q, k and v
            (`sparsek.fp8`).
        out_dtype: FP8 inputs only: torch.bfloat16 (None) or torch.float16.

    Returns:
        out: (batch, seqlen_q, num_heads, head_dim_v), dtype of q (FP8: `out_dtype`); and,
        when `return_lse`, lse: (batch, num_heads, seqlen_q) float32 (natural log; FP8:
        of the dequantized scores).

    Raises:
        TypeError: a tensor argument is not a tensor or not floating point; `causal` or
            `return_lse` is not a bool; `softmax_scale` or `softcap` is not a real number;
            `window_size` is not a pair of ints; `sinks` is not a float32 tensor; an 8-bit
            dtype other than float8_e4m3fn; a descale that is not a float32 tensor.
        ValueError: FP8 inputs without the three descales, descales of another shape
            than (batch, num_kv_heads), descales or `out_dtype` with 16-bit inputs; wrong
            rank, mismatched batch / seqlen_k / num_kv_heads / head_dim /
            dtype / device, num_heads not a multiple of num_kv_heads, a non-finite or
            non-positive `softmax_scale`, a window size below -1, a negative or
            non-finite `softcap`, or `sinks` of another shape than (num_heads,) or on
            another device than q.
        UnsupportedError: `SPARSEK_STRICT=1` forbids the fallback of a call no kernel
            serves: an input requires grad (on any device, CPU included), or a non-CPU
            input no kernel fits. CPU tensors without grad run the reference, never an
            error.
    """
    signature = None
    if (
        type(return_lse) is bool  # (no key part: it changes neither checks nor plan)
        and q_descale is None
        and k_descale is None
        and v_descale is None
        and out_dtype is None
    ):
        signature = _eager_signature(q, k, v, softmax_scale, causal)
        if signature is not None and not (
            window_size is NO_WINDOW and softcap is NO_SOFTCAP and sinks is None
        ):  # (the defaults: the signature as it is)
            signature = _mask_signature(signature, window_size, softcap, sinks)
    plan = _SERVED.get(signature) if signature is not None else None
    if plan is not None:  # this signature passed every check below before
        out, lse = dense.run_dense(plan, q, k, v, return_lse, sinks)
        return (out, lse) if return_lse else out
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    check_qkv(("q", "k", "v"), q, k, v, layout="(batch, seqlen, heads, head_dim)", head_axis=2)
    scale = resolve_scale("softmax_scale", softmax_scale, q.shape[-1])
    window, cap = check_mask_args(
        window_size, softcap, sinks, num_heads=q.shape[2], device=q.device
    )
    mask = make_mask(causal, window, cap, sinks is not None)
    descales = (q_descale, k_descale, v_descale)
    fp8_call = check_fp8_args(q, descales, out_dtype, batch=q.shape[0], num_kv_heads=k.shape[2])
    if fp8_call is not None:
        return _attention_fp8((q, k, v), fp8_call, mask, scale, sinks, return_lse)

    path = forward_path(q, k, v, *(() if sinks is None else (sinks,)))
    if path is Path.CPU:
        # The documented CPU path: the op's float32 reference (the correctness oracle).
        cpu_result: tuple[Tensor, Tensor] = torch.ops.sparsek.attention(
            q, k, v, mask.causal, scale, False, mask.window_left, mask.window_right,
            mask.op_softcap, sinks,
        )  # fmt: skip
        return cpu_result if return_lse else cpu_result[0]
    reasons = (NEEDS_GRAD,) if path is Path.AUTOGRAD else dense_blockers(q, k, v, mask.spec)
    if not reasons:
        result = _run_kernels(_SERVED, signature, q, k, v, mask, scale, False, sinks)
        return result if return_lse else result[0]
    fallback(reasons)
    if return_lse or not mask.is_plain:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        ref_out, ref_lse = reference_attention(
            q, k, v, causal=mask.causal, softmax_scale=scale,
            window_size=(mask.window_left, mask.window_right), softcap=mask.softcap,
            sinks=sinks, compute_dtype=compute,
        )  # fmt: skip
        if return_lse:
            return ref_out.to(q.dtype), ref_lse.to(torch.float32)
        return ref_out.to(q.dtype)
    return _sdpa_bshd(q, k, v, mask.causal, scale)


def _attention_fp8(
    qkv: tuple[Tensor, Tensor, Tensor],
    fp8_call: Fp8Call,
    mask: Mask,
    scale: float,
    sinks: Tensor | None,
    return_lse: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """`attention` of checked FP8 inputs (`sparsek.fp8`). CPU tensors without grad run the
    op's reference of the dequantized inputs. Elsewhere an FP8 kernel runs where one is
    registered (`registry.registered_fp8_configs`); otherwise the inputs are dequantized
    to bfloat16 and take the 16-bit path (a fallback: logged once, `UnsupportedError`
    under SPARSEK_STRICT=1)."""
    (q, k, v), descales, out_dtype = qkv, fp8_call.descales, fp8_call.out_dtype
    path = forward_path(q, k, v, *(t for t in (sinks, *descales) if t is not None))
    mask_args = (mask.window_left, mask.window_right, mask.op_softcap, sinks)
    if path is Path.CPU:
        cpu_result: tuple[Tensor, Tensor] = torch.ops.sparsek.attention(
            q, k, v, mask.causal, scale, False, *mask_args, *descales, out_dtype
        )
        return cpu_result if return_lse else cpu_result[0]
    if path is Path.KERNELS:
        reasons = dense_blockers(q, k, v, mask.spec, out_dtype)
        if not reasons:
            served = ops.call_attention(
                q, k, v, mask.causal, scale, False, mask, sinks, descales, out_dtype
            )
            return served if return_lse else served[0]
        fallback(reasons, action="dequantizing the FP8 inputs to bfloat16")
    # (An input that requires grad: the 16-bit path's own fallback says so.)
    q16, k16, v16 = (
        fp8.dequantize(t, descale, torch.bfloat16)
        for t, descale in zip((q, k, v), descales, strict=True)
    )
    result = attention(
        q16, k16, v16, causal=mask.causal, softmax_scale=scale,
        window_size=(mask.window_left, mask.window_right), softcap=mask.softcap,
        sinks=sinks, return_lse=True,
    )  # fmt: skip
    return fp8.fp8_result(result, out_dtype, return_lse)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention`.

    Same arguments, layout and semantics as PyTorch's SDPA (top-left aligned
    `is_causal`), and the same answer: a call the kernels serve returns what SDPA returns
    (within SDPA's own rounding), every other call is handed to SDPA itself, so what it
    accepts (any rank >= 2, broadcast batch dims, masks, dropout, any scale) gives its
    result and what it rejects raises its exception.

    The kernels serve 4-D float16/bfloat16 CUDA inputs of a registered head_dim (value's
    equal to query's) with one batch size, `num_heads` equal to `num_kv_heads` or a
    multiple with `enable_gqa`, no `attn_mask`, `dropout_p=0`, a finite `scale > 0` or
    None, and no input that requires grad. CPU tensors that do not require grad go to
    SDPA as the documented CPU path (not a fallback); any other call SDPA answers is a
    fallback: logged once per reason, or `UnsupportedError` under `SPARSEK_STRICT=1`,
    raised after SDPA has checked the arguments (inputs that require grad count as a
    fallback on every device: see `sparsek.routing`).

    Args:
        query: (..., num_heads, seqlen_q, head_dim); the kernels: (batch, num_heads,
            seqlen_q, head_dim).
        key: (..., num_kv_heads, seqlen_k, head_dim).
        value: (..., num_kv_heads, seqlen_k, head_dim_v).
        attn_mask: boolean or additive mask broadcastable to (..., num_heads, seqlen_q,
            seqlen_k), or None. Any mask goes to PyTorch.
        dropout_p: dropout probability; > 0 goes to PyTorch.
        is_causal: top-left aligned causal mask (query i sees key j iff j <= i).
        scale: multiplier of query key^T; 1/sqrt(head_dim) when None.
        enable_gqa: allow num_kv_heads < num_heads (num_heads must be a multiple).

    Returns:
        (..., num_heads, seqlen_q, head_dim_v), dtype of query.

    Raises:
        RuntimeError, TypeError: whatever PyTorch's SDPA raises for arguments it rejects
            (mismatched shapes, dtypes or devices, a flag that is not a bool, ...).
        UnsupportedError: the kernels do not serve the call and `SPARSEK_STRICT=1`
            forbids the fallback.
    """
    signature = None
    if attn_mask is None and type(dropout_p) is float and dropout_p == 0.0:
        signature = _eager_signature(query, key, value, scale, is_causal, enable_gqa)
    plan = _SERVED_SDPA.get(signature) if signature is not None else None
    if plan is not None:  # this signature passed every check below before
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        return dense.run_dense(plan, q, k, v, False)[0].transpose(1, 2)
    path = Path.KERNELS
    if isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor):
        path = forward_path(query, key, value)
    if path is Path.CPU:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
    if path is Path.AUTOGRAD:
        reasons: tuple[str, ...] = (NEEDS_GRAD,)
    else:
        call = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        mask_spec = (CAUSAL if is_causal is True else NO_MASK).spec
        reasons = sdpa_blockers(*call) or dense_blockers(query, key, value, mask_spec)
    if not reasons:
        resolved = resolve_scale("scale", scale, query.shape[-1])
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        mask = CAUSAL if is_causal else NO_MASK
        out = _run_kernels(_SERVED_SDPA, signature, q, k, v, mask, resolved, True)[0]
        return out.transpose(1, 2)
    # PyTorch first: arguments it rejects raise its own error, never a fallback's.
    result = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
    )  # fmt: skip
    fallback(reasons)
    return result


# ---------------------------------------------------------------------------- dispatch


def _eager_signature(
    q: object, k: object, v: object, softmax_scale: object, *flags: object
) -> tuple[object, ...] | None:
    """The key under which an entry point memoizes a call that passed validation and the
    kernel check (`_SERVED`, `_SERVED_SDPA`), or None for calls never memoized: anything
    but plain eager calls on plain tensors without grad, flags of another type than bool,
    a scale of another type than float (True == 1.0 as a key), and any tensor argument
    that is no tensor. Everything validation and the kernel check read is in the key:
    shapes, strides, dtypes, devices, the scale, the flags and the SPARSEK_ARCH value."""
    if (
        type(q) is not Tensor
        or type(k) is not Tensor
        or type(v) is not Tensor
        or (softmax_scale is not None and type(softmax_scale) is not float)
    ):
        return None
    for flag in flags:
        if type(flag) is not bool:
            return None
    # `routing.plain_eager` and `routing.needs_grad`, inline: this runs on every call.
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0:
        return None
    if (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled():
        return None
    try:
        strides = q.stride(), k.stride(), v.stride()
    except RuntimeError:  # sparse or nested: validation names the argument
        return None
    return (
        q.shape, k.shape, v.shape, strides, q.dtype, k.dtype, v.dtype,
        q.device, k.device, v.device, softmax_scale, flags, os.environ.get(ARCH_ENV),
    )  # fmt: skip


# `_eager_signature` -> the plan of a call the kernels serve, per entry point (`attention`
# reads (batch, seqlen, heads, head_dim) tensors, the SDPA drop-in (batch, heads, ...)).
_SERVED: dict[tuple[object, ...], dense.DensePlan] = {}
_SERVED_SDPA: dict[tuple[object, ...], dense.DensePlan] = {}
memo.register(_SERVED.clear)
memo.register(_SERVED_SDPA.clear)


def _run_kernels(
    served: dict[tuple[object, ...], dense.DensePlan],
    signature: tuple[object, ...] | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask,
    scale: float,
    causal_top_left: bool,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a checked request on the kernels: a plain eager call (`signature`) is planned,
    remembered in `served` under its signature and run; any other (tracing, autograd,
    dispatch modes) goes through the torch op."""
    if signature is None:
        return ops.call_attention(q, k, v, mask.causal, scale, causal_top_left, mask, sinks)
    k, v = tma.one_kv_head(k, v)
    plan = dense.dense_plan(q, k, v, mask, scale, causal_top_left)
    return dense.run_dense(memo.remember(served, signature, plan), q, k, v, sinks=sinks)


def _mask_signature(
    signature: tuple[object, ...], window_size: object, softcap: object, sinks: object
) -> tuple[object, ...] | None:
    """`signature` extended by the mask arguments, or None (not memoized) unless they are
    of the exact types validation accepts: a tuple of two ints, a float, a plain tensor
    (whose shape, dtype, device and grad flag validation reads)."""
    if (
        type(window_size) is not tuple
        or len(window_size) != 2
        or type(window_size[0]) is not int
        or type(window_size[1]) is not int
        or type(softcap) is not float
    ):
        return None
    if sinks is None:
        return (*signature, window_size, softcap, None)
    if type(sinks) is not Tensor or sinks.requires_grad:
        return None
    return (*signature, window_size, softcap, sinks.shape, sinks.dtype, sinks.device)


def _sdpa_bshd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """torch SDPA on (batch, seqlen, heads, head_dim) inputs with bottom-right causal masking."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = False
    if q.shape[2] != k.shape[2]:  # a Python bool even for symbolic head counts
        gqa = True
    if not causal or seqlen_q == seqlen_k:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        return out.transpose(1, 2)
    offset = seqlen_k - seqlen_q
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device).tril(offset)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, scale=scale, enable_gqa=gqa)
    # Rows with no visible key (i < seqlen_q - seqlen_k) are 0 by sparsek's contract.
    masked_rows = torch.arange(seqlen_q, device=q.device) < -offset
    return out.masked_fill(masked_rows.view(1, 1, seqlen_q, 1), 0.0).transpose(1, 2)
