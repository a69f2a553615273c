"""The attention masks users pass (FlashAttention's conventions), checked and made canonical.

Every entry point takes the same four mask arguments:

- `causal`: key j is visible to query i iff j <= i + offset, with offset = seqlen_k -
  seqlen_q per sequence (bottom-right; the SDPA drop-in aligns top-left, offset 0);
- `window_size=(left, right)`: sliding-window (local) attention: key j is visible iff
  i + offset - left <= j <= i + offset + right, with the same offset; -1 is unbounded on
  that side. `causal=True` sets right to 0, so (-1, -1) with causal is causal attention;
- `softcap`: scores s = scale * q.k become softcap * tanh(s / softcap) before the softmax
  (Gemma 2, Grok); 0 is off;
- `sinks`: (num_heads,) float32 learned sink logits (gpt-oss): each joins the softmax
  denominator of its head's rows and contributes no value, so a row's probabilities sum
  to less than 1. The returned LSE includes the sink: lse = log(exp(sink) + sum_j exp(s_j))
  for a row that sees at least one key. A row that sees no key returns out = 0 and
  lse = -inf, with or without a sink.

`Mask` is that set after checking, in canonical form: the window with causal folded in,
and `spec` the kernel features it needs (`MaskSpec`): a window of (-1, 0) is the causal
kernel, one of (-1, -1) no window at all. `reference_scores` / `reference_softmax` are
the semantics above in plain PyTorch (the oracle the references use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cutedsl_kernels.config import MaskSpec

UNBOUNDED = -1
# The entry points' default window_size (no window); the dense fast path finds it by identity.
NO_WINDOW = (UNBOUNDED, UNBOUNDED)
# The entry points' default softcap (none), found by identity too. An int: under
# torch.compile a float read from a default or a global is a symbolic input, which the
# argument checks specialize, and dynamo then traces the frame a second time; an int
# default is a constant there.
NO_SOFTCAP = 0


@dataclass(frozen=True)
class Mask:
    """The mask arguments of one call, checked, canonical (see the module docstring).

    Attributes:
        causal: the causal mask alone (no window); False when the window carries it.
        window_left, window_right: the band's sizes; -1: unbounded (both -1: no window).
        softcap: > 0: the logit cap; 0: none.
        sinks: the call passes sink logits.
    """

    causal: bool = False
    window_left: int = UNBOUNDED
    window_right: int = UNBOUNDED
    softcap: float = NO_SOFTCAP
    sinks: bool = False

    @property
    def window(self) -> bool:
        """A band with at least one bounded side."""
        return self.window_left != UNBOUNDED or self.window_right != UNBOUNDED

    @property
    def spec(self) -> MaskSpec:
        """The kernel features this mask needs."""
        return MaskSpec(
            causal=self.causal,
            window=self.window,
            softcap=self.softcap > 0,
            sinks=self.sinks,
        )

    @property
    def op_softcap(self) -> float:
        """`softcap` as a float (the torch ops' and kernels' type): 0.0 without a cap."""
        return self.softcap if self.softcap > 0 else 0.0

    @property
    def is_plain(self) -> bool:
        """No window, softcap or sinks: at most the causal mask."""
        return not (self.window or self.softcap > 0 or self.sinks)


NO_MASK = Mask()
CAUSAL = Mask(causal=True)


def make_mask(
    causal: bool,
    window_size: tuple[int, int] = (UNBOUNDED, UNBOUNDED),
    softcap: float = 0.0,
    sinks: bool = False,
) -> Mask:
    """The canonical `Mask` of checked arguments (`check_mask_args`): causal sets the
    window's right size to 0; a window (-1, 0) is causal, (-1, -1) none."""
    left, right = window_size
    if causal:
        right = 0
    causal = left == UNBOUNDED and right == 0
    if causal or (left == UNBOUNDED and right == UNBOUNDED):
        left = right = UNBOUNDED
    if not (softcap > 0 or sinks) and left == right == UNBOUNDED:
        return CAUSAL if causal else NO_MASK
    return Mask(causal, left, right, float(softcap), sinks)


def check_mask_args(
    window_size: object,
    softcap: object,
    sinks: object,
    *,
    num_heads: int,
    device: torch.device,
) -> tuple[tuple[int, int], float]:
    """Check the mask arguments of a call; returns (window_size, softcap) as ints/float.

    Raises:
        TypeError: `window_size` is not a pair of ints, `softcap` not a real number,
            `sinks` not a tensor or not float32.
        ValueError: a window size below -1, a softcap that is negative or not finite,
            `sinks` of another shape than (num_heads,) or on another device than q.
    """
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(
            f"window_size must be a pair of ints (left, right), -1 for unbounded; got "
            f"{window_size!r}"
        )
    left, right = int(window_size[0]), int(window_size[1])
    if left < UNBOUNDED or right < UNBOUNDED:
        raise ValueError(
            f"window_size={(left, right)}: each size must be >= 0, or -1 for unbounded"
        )
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a real number (0 for none), got {type(softcap).__name__}")
    cap = float(softcap)
    # Comparisons rather than math.isfinite: under torch.compile a float argument may be
    # symbolic, and a comparison is what Dynamo guards on (NaN fails both).
    if not (0 <= cap < math.inf):
        raise ValueError(f"softcap={softcap!r} must be finite and >= 0 (0 for none)")
    if sinks is not None:
        if not isinstance(sinks, Tensor):
            raise TypeError(
                f"sinks must be a float32 tensor of shape (num_heads,) or None, got "
                f"{type(sinks).__name__}"
            )
        if sinks.dtype != torch.float32:
            raise TypeError(f"sinks must be float32 (one logit per head), got {sinks.dtype}")
        if tuple(sinks.shape) != (num_heads,):
            raise ValueError(
                f"sinks has shape {tuple(sinks.shape)}; it must be (num_heads,) = ({num_heads},)"
            )
        if sinks.device != device:
            raise ValueError(f"sinks is on {sinks.device}; it must be on q's device ({device})")
    return (left, right), cap


# ---------------------------------------------------------------------------- reference


def visible(rows: Tensor, cols: Tensor, offset: Tensor | int, mask: Mask) -> Tensor | None:
    """Which (query row, key column) pairs the mask shows (rows, cols and offset
    broadcast), or None when every pair is visible. `offset`: where the diagonal of row 0
    lies (seqlen_k - seqlen_q bottom-right, 0 top-left; per sequence: a tensor)."""
    diagonal = rows + offset
    shown: Tensor | None = None
    if mask.causal:
        shown = cols <= diagonal
    if mask.window_right != UNBOUNDED:
        right = cols <= diagonal + mask.window_right
        shown = right if shown is None else shown & right
    if mask.window_left != UNBOUNDED:
        left = cols >= diagonal - mask.window_left
        shown = left if shown is None else shown & left
    return shown


def reference_scores(scores: Tensor, softcap: float) -> Tensor:
    """Scaled scores after the softcap (before any mask)."""
    if softcap > 0:
        return softcap * torch.tanh(scores / softcap)
    return scores


def reference_softmax(scores: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """(probabilities, lse) over the last axis of masked scores (-inf where hidden);
    `sinks`, broadcastable to lse's shape (the scores' without the key axis), join each
    row's denominator when the row sees a key. A row without keys: probabilities 0,
    lse -inf."""
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    if sinks is not None:
        sink = sinks.to(scores.dtype).expand_as(lse)
        lse = torch.where(empty, lse, torch.logaddexp(lse, sink))
    # Rows without keys: subtract 0 instead so exp(-inf - 0) = 0 (not NaN).
    shift = torch.where(empty, torch.zeros_like(lse), lse)
    return torch.exp(scores - shift.unsqueeze(-1)), lse
