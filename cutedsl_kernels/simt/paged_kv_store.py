"""Write new tokens' keys and values into a paged KV cache (vLLM's cache update).

For every token t with slot s = slots[t] >= 0 (slots < 0 are padding: nothing written):

    k_cache[s // page_size, s % page_size, h, :] = k[t, h, :]     for every KV head h
    v_cache[s // page_size, s % page_size, h, :] = v[t, h, :]

Shapes: k, v (tokens, heads, d); k_cache, v_cache (pages, page_size, heads, d), in the
config's dtype; slots int64 (tokens,), contiguous. Last dims contiguous; any other
strides (the caches are strided views of vLLM's (pages, heads, page_size, 2 d) layer
cache). Slots must lie below pages * page_size.

SIMT, architecture independent: one warp per (token, head) row, each lane copying
head_dim / 32 consecutive elements of K and of V. Grid: (tokens, ceil(heads / WARPS)).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64

from cutedsl_kernels.abi import KVStoreArgs
from cutedsl_kernels.common.dtypes import dsl_type
from cutedsl_kernels.config import KVStoreConfig
from cutedsl_kernels.simt.rows import (
    LANES,
    WARPS_PER_CTA,
    fake_rows_tensor,
    row_kernel_reasons,
)


class PagedKVStore:
    """The cache-update kernel of one `KVStoreConfig`."""

    def __init__(self, config: KVStoreConfig):
        self.config = config
        self.dtype = dsl_type(config.dtype)
        self.cols_per_lane = config.head_dim // LANES

    @staticmethod
    def can_implement(config: KVStoreConfig) -> list[str]:
        """Reasons the kernel cannot serve `config` (empty when it can)."""
        return row_kernel_reasons(config.head_dim, config.dtype)

    def fake_arguments(self) -> KVStoreArgs:
        """Symbolic-shape stand-ins for the runtime arguments (`abi.KVStoreArgs`)."""
        tokens, heads, pages, page_size = (cute.sym_int() for _ in range(4))
        d = self.config.head_dim

        return KVStoreArgs(
            k=fake_rows_tensor(self.dtype, (tokens, heads, d)),
            v=fake_rows_tensor(self.dtype, (tokens, heads, d)),
            k_cache=fake_rows_tensor(self.dtype, (pages, page_size, heads, d)),
            v_cache=fake_rows_tensor(self.dtype, (pages, page_size, heads, d)),
            slots=cute.runtime.make_fake_tensor(Int64, (tokens,), stride=(1,)),
        )

    @cute.jit
    def __call__(
        self,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mKCache: cute.Tensor,
        mVCache: cute.Tensor,
        mSlots: cute.Tensor,
        stream,
    ):
        self.kernel(mK, mV, mKCache, mVCache, mSlots).launch(
            grid=[
                cute.size(mSlots.shape[0]),
                cute.ceil_div(cute.size(mK.shape[1]), WARPS_PER_CTA),
                1,
            ],
            block=[WARPS_PER_CTA * LANES, 1, 1],
            stream=stream,
        )

    @cute.kernel
    def kernel(
        self,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mKc: cute.Tensor,
        mVc: cute.Tensor,
        mSlots: cute.Tensor,
    ):
        t, head_block, _ = cute.arch.block_idx()
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(tidx // LANES)
        lane = tidx % LANES
        h = head_block * WARPS_PER_CTA + warp
        if h < mK.shape[1]:
            slot = mSlots[t]
            if slot >= Int64(0):
                page_size = Int64(mKc.shape[1])
                page = Int32(slot // page_size)
                row = Int32(slot % page_size)
                col0 = lane * self.cols_per_lane
                for c in cutlass.range_constexpr(self.cols_per_lane):
                    mKc[page, row, h, col0 + c] = mK[t, h, col0 + c]
                    mVc[page, row, h, col0 + c] = mV[t, h, col0 + c]
