"""CUDA grid limits, and the batch axis of launches that may exceed them.

A grid's y and z extents are at most 65,535 (x: 2^31 - 1). One-tile-per-CTA launches put
the batch (times splits) on z, so a decode batch of 70,000 sequences would not launch:
`fold_batch` moves such a z into x (x' = x * z, z' = 1) and `unfold_batch` recovers the
block's (x, z) on the device. A grid with z = 1 is read as folded; with one batch entry
both readings agree, so launches that fit keep their grid and their CTA order.
"""

from __future__ import annotations

import cutlass.cute as cute
from cutlass import Int32

MAX_GRID_Z = 65535


@cute.jit
def fold_batch(x: Int32, z: Int32) -> tuple[Int32, Int32]:
    """Host side: grid (x, z) extents with z folded into x when it exceeds `MAX_GRID_Z`."""
    folded_x, folded_z = x, z
    if z > MAX_GRID_Z:
        folded_x, folded_z = x * z, Int32(1)
    return folded_x, folded_z


@cute.jit
def unfold_batch(block_x: Int32, block_z: Int32, x_blocks: Int32) -> tuple[Int32, Int32]:
    """Device side: this block's (x, z) coordinates in the unfolded grid of `x_blocks`
    blocks along x (`fold_batch`)."""
    x, z = block_x, block_z
    if cute.arch.grid_dim()[2] == 1:
        z = block_x // x_blocks
        x = block_x - z * x_blocks
    return x, z
