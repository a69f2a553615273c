"""Named hardware barrier ids used by the attention kernels (id 0 is __syncthreads)."""

from __future__ import annotations

import enum


class NamedBarrier(enum.IntEnum):
    """Barrier ids; each names the threads that meet there."""

    EPILOGUE = 1  # all MMA warpgroups before writing O to shared memory (it reuses Q's)
    EPILOGUE_STORE = 2  # MMA warpgroups + the storing warp once O is in shared memory
    WG1_TURN = 3  # ping-pong: warpgroup 1 may issue its GEMMs
    WG2_TURN = 4  # ping-pong: warpgroup 2 may issue its GEMMs
    WG3_TURN = 5  # ping-pong: warpgroup 3 may issue its GEMMs
    WG1_V_TAIL = 6  # warpgroup 1 (2: +1, 3: +2) has zeroed the unused V rows of a tile
