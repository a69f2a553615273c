"""Register-fragment views of the sm90 warpgroup MMA accumulators and operands.

A warpgroup MMA accumulator for 16-bit inputs is laid out per thread as
`((2, 2, V), MMA_M, MMA_N)`: two adjacent columns, two rows 8 apart, and V groups of 8
columns. Softmax and masking want to walk it by (row, column); the second GEMM wants the
same registers as an A operand `((2, 2, 2), MMA_M, MMA_K)`. These views re-index the
registers without moving them.
"""

from __future__ import annotations

import cutlass.cute as cute


def _row_col_layout(acc_layout: cute.Layout) -> cute.Layout:
    # Index the accumulator's own (col-major) numbering as ((rows), (cols)) and compose,
    # so the view works for value tensors and identity-coordinate tensors alike.
    numbering = cute.make_layout(acc_layout.shape)
    vshape, vstride = numbering.shape[0], numbering.stride[0]
    rows = ((vshape[1], numbering.shape[1]), (vstride[1], numbering.stride[1]))
    cols = (
        (vshape[0], vshape[2], numbering.shape[2]),
        (vstride[0], vstride[2], numbering.stride[2]),
    )
    view = cute.make_layout((rows[0], cols[0]), stride=(rows[1], cols[1]))
    return cute.composition(acc_layout, view)


def acc_rows_cols(acc: cute.Tensor) -> cute.Tensor:
    """View `((2, 2, V), MMA_M, MMA_N)` as `((2, MMA_M), (2, V, MMA_N))`: [row, col]."""
    return cute.make_tensor(acc.iterator, _row_col_layout(acc.layout))


def acc_as_operand_a(acc: cute.Tensor) -> cute.Tensor:
    """View an accumulator `((2, 2, V), MMA_M, 1)` as a wgmma A fragment.

    The A operand of a 16-bit wgmma takes `((2, 2, 2), MMA_M, MMA_K)` per thread: the
    accumulator's column groups pair up into 16-wide K slices.
    """
    lay = acc.layout
    split = cute.logical_divide(lay, ((None, None, 2), None, None))
    s, d = split.shape, split.stride
    shape = ((s[0][0], s[0][1], s[0][2][0]), s[1], (s[0][2][1], s[2]))
    stride = ((d[0][0], d[0][1], d[0][2][0]), d[1], (d[0][2][1], d[2]))
    return cute.make_tensor(acc.iterator, cute.make_layout(shape, stride=stride))


def transpose_smem(t: cute.Tensor) -> cute.Tensor:
    """Swap the first two modes of a (staged) shared-memory tensor, e.g. V as (d, n, STAGE)."""
    shape = (t.shape[1], t.shape[0], *t.shape[2:])
    order = (1, 0, *range(2, cute.rank(t)))
    return cute.composition(t, cute.make_ordered_layout(shape, order=order))


def permute_modes(t: cute.Tensor, modes: list[int]) -> cute.Tensor:
    """Reorder a tensor's modes without moving data."""
    return cute.make_tensor(t.iterator, cute.select(t.layout, mode=modes))
