"""The float64 oracle and the tolerance rule the GPU tests share (test_varlen_gpu.py,
test_fuzz_gpu.py), on one sequence at a time in dense (seqlen, heads, head_dim) form.

Compared against: nothing itself; it is what those tests compare against. `reference_f64`
is textbook attention in float64 (materialized scores, logsumexp), independent of
sparsek's own reference (`sparsek/reference*.py`), so a layout bug there cannot hide one
in a kernel. `sdpa_in_dtype` is PyTorch's own error in the inputs' dtype, which sets the
tolerance (docs: CONVENTIONS.md, "Tests"):

    max|out - ref| <= 2 * max|sdpa_out - ref| + atol   (atol 1e-3 fp16, 2e-3 bf16)

applied per sequence (sequences differ in output magnitude: one key gives |out| ~ 1,
2000 keys |out| ~ 0.05, and a batch-wide bound set by the short ones would hide errors in
the long ones). The factor 2 allows a kernel a different but equally good rounding order;
atol covers cases where SDPA is (near) exact, e.g. one visible key, where out = v. Rows
that see no key must be exactly 0 with lse -inf. LSE: float32, -inf exactly where the
reference's is, elsewhere atol 2e-3, rtol 1e-3 (log-domain: scores are exact products of
the same fp16/bf16 inputs, so only fp32 accumulation error remains).

Causal masks are bottom-right aligned (query i of sq sees key j iff j <= i + sk - sq) unless
`top_left` (j <= i, torch SDPA's `is_causal`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ATOL = {torch.float16: 1e-3, torch.bfloat16: 2e-3}
LSE_ATOL, LSE_RTOL = 2e-3, 1e-3


def visible_keys(
    sq: int, sk: int, causal: bool, device: torch.device | str, *, top_left: bool = False
) -> Tensor:
    """(sq, sk) bool: query i sees key j (see the module docstring for the alignment)."""
    if not causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device)
    offset = 0 if top_left else sk - sq
    rows = torch.arange(sq, device=device).view(sq, 1)
    cols = torch.arange(sk, device=device).view(1, sk)
    return cols <= rows + offset


def reference_f64(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, *, top_left: bool = False
) -> tuple[Tensor, Tensor]:
    """One sequence in float64: softmax(q k^T * scale) v and its log-sum-exp.

    q: (sq, H, D); k: (sk, Hkv, D); v: (sk, Hkv, Dv) -> out (sq, H, Dv), lse (H, sq).
    A row with no visible key: out 0, lse -inf.
    """
    sq, h, d = q.shape
    sk, hkv, dv = v.shape
    group = h // hkv
    qf = q.double().reshape(sq, hkv, group, d)  # GQA: query head hkv * group + g
    scores = torch.einsum("qhgd,khd->hgqk", qf, k.double()) * scale
    visible = visible_keys(sq, sk, causal, q.device, top_left=top_left)
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (Hkv, group, sq); -inf for rows with no key
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("hgqk,khd->qhgd", probs, v.double())
    return out.reshape(sq, h, dv), lse.reshape(h, sq)


def sdpa_in_dtype(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, *, top_left: bool = False
) -> Tensor:
    """One sequence through torch SDPA in the inputs' dtype (PyTorch's own error): (sq, H, Dv).

    K/V heads are repeated and the mask is explicit, so SDPA picks its flash or
    memory-efficient kernels on any alignment.
    """
    sq, h, _ = q.shape
    sk, hkv, dv = v.shape
    if sq == 0 or sk == 0:
        return q.new_zeros(sq, h, dv)
    visible = visible_keys(sq, sk, causal, q.device, top_left=top_left)
    qt = q.transpose(0, 1).unsqueeze(0)
    kt, vt = (t.repeat_interleave(h // hkv, dim=1).transpose(0, 1).unsqueeze(0) for t in (k, v))
    mask = None if bool(visible.all()) else visible
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)[0]
    # SDPA leaves NaN (or anything) in rows with no visible key; the contract there is 0.
    return out.transpose(0, 1).masked_fill(~visible.any(dim=1).view(sq, 1, 1), 0)


def max_abs(a: Tensor, b: Tensor) -> float:
    """max |a - b| in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def output_bound(sdpa: Tensor, ref: Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(the bound on max|out - ref|, SDPA's own error max|sdpa - ref|) for one sequence."""
    err_sdpa = max_abs(sdpa, ref)
    return 2 * err_sdpa + ATOL[dtype], err_sdpa


def sequence_problems(
    out: Tensor,
    ref: Tensor,
    sdpa: Tensor,
    lse: Tensor | None = None,
    ref_lse: Tensor | None = None,
) -> list[str]:
    """What is wrong with one sequence's output rows (empty: nothing), without raising.

    out, ref, sdpa: (sq, H, Dv) (the kernel's rows, float64 reference, SDPA in the inputs'
    dtype); lse, ref_lse: (H, sq) or None (no LSE to check; ref_lse is still used for the
    rows that see no key when given).
    """
    problems = []
    nan = torch.isnan(out)
    if nan.any():
        problems.append(f"{int(nan.sum())} NaN output elements (unwritten or padding read)")
    err = max_abs(torch.nan_to_num(out.double(), nan=math.inf), ref)
    bound, err_sdpa = output_bound(sdpa, ref, out.dtype)
    if not err <= bound:
        problems.append(f"max error {err:.3e} > bound {bound:.3e} (sdpa error {err_sdpa:.3e})")
    if ref_lse is None:
        return problems
    no_key = torch.isneginf(ref_lse)  # (H, sq)
    rows_without_key = out.transpose(0, 1)[no_key]
    if rows_without_key.numel() and not bool((rows_without_key == 0).all()):
        problems.append("rows that see no key are not exactly 0")
    if lse is None:
        return problems
    if lse.dtype != torch.float32 or lse.shape != ref_lse.shape:
        problems.append(
            f"lse {lse.dtype} {tuple(lse.shape)}, expected float32 {tuple(no_key.shape)}"
        )
        return problems
    if not torch.equal(torch.isneginf(lse), no_key):
        problems.append("lse is not -inf exactly where the row sees no key")
    got, want = lse[~no_key].double(), ref_lse[~no_key]
    if got.numel():
        tol = LSE_ATOL + LSE_RTOL * want.abs()
        excess = ((got - want).abs() - tol).nan_to_num(nan=math.inf).max().item()
        if excess > 0:
            worst = max_abs(got.nan_to_num(nan=math.inf), want)
            problems.append(f"lse off by up to {worst:.3e} (atol {LSE_ATOL}, rtol {LSE_RTOL})")
    return problems
