"""The global-memory tensors of one sm90 FMHA forward launch, by name, as the kernel's
roles see them (tiled modes first)."""

from __future__ import annotations

from dataclasses import dataclass

import cutlass.cute as cute


@dataclass
class FwdTensors:
    """What the producer and the MMA warpgroups read and write.

    Attributes:
        mQ, mK, mV: TMA coordinate tensors (s, d, h, b) (paged K/V: (page, d, h, pages)).
        tma_O: TMA coordinates of O (s, d, h, b), or None (split-KV writes directly).
        mO: O itself, (s, d, h, b[, split]).
        mLSE: (s_q, h, b[, split]).
        mCuSeqlensQ, mCuSeqlensK, mSeqUsedK, mPageTable: the sequence metadata of the
            layout, or None.
    """

    mQ: cute.Tensor
    mK: cute.Tensor
    mV: cute.Tensor
    tma_O: cute.Tensor | None
    mO: cute.Tensor
    mLSE: cute.Tensor
    mCuSeqlensQ: cute.Tensor | None
    mCuSeqlensK: cute.Tensor | None
    mSeqUsedK: cute.Tensor | None
    mPageTable: cute.Tensor | None
