"""Write new tokens' keys and values into a paged KV cache (vLLM's cache update).

For every token t with slot s = slots[t] >= 0 (slots < 0 are padding: nothing written):

    k_cache[s // page_size, s % page_size, h, :] = k[t, h, :]     for every KV head h
    v_cache[s // page_size, s % page_size, h, :] = v[t, h, :]

Shapes: k, v (tokens, heads, d); k_cache, v_cache (pages, page_size, heads, d), in the
config's dtype; slots int64 (tokens,), contiguous. Last dims contiguous; any other
strides (the caches are strided views of vLLM's (pages, heads, page_size, 2 d) layer
cache). Slots must lie below pages * page_size.

FP8 caches (`KVStoreConfig.quantizes`: 16-bit K/V, a float8_e4m3fn cache) store
k / k_scale and v / v_scale rounded to nearest E4M3, saturating at +-448 (vLLM's
`kv_cache_dtype="fp8"` with the layer's per-tensor k_scale / v_scale, float32 (1,)
tensors read when the kernel runs; the attention kernels take the same scales as their
k_descale / v_descale).

SIMT, architecture independent: one warp per (token, head) row, each lane copying
head_dim / 32 consecutive elements of K and of V. Grid: (tokens, ceil(heads / WARPS)).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, const_expr

from cutedsl_kernels.abi import KVStoreArgs
from cutedsl_kernels.common.dtypes import dsl_type
from cutedsl_kernels.common.e4m3 import quantize_e4m3x2
from cutedsl_kernels.config import KVStoreConfig
from cutedsl_kernels.simt.rows import (
    LANES,
    WARPS_PER_CTA,
    fake_rows_tensor,
    row_kernel_reasons,
)

# The cache element types a 16-bit K/V can be quantized into.
QUANTIZED_CACHE_DTYPES = ("float8_e4m3fn",)


class PagedKVStore:
    """The cache-update kernel of one `KVStoreConfig`."""

    def __init__(self, config: KVStoreConfig):
        self.config = config
        self.dtype = dsl_type(config.dtype)
        self.cache_dtype = dsl_type(config.cache_dtype or config.dtype)
        self.cols_per_lane = config.head_dim // LANES

    @staticmethod
    def can_implement(config: KVStoreConfig) -> list[str]:
        """Reasons the kernel cannot serve `config` (empty when it can)."""
        reasons = row_kernel_reasons(config.head_dim, config.dtype)
        if config.quantizes and config.cache_dtype not in QUANTIZED_CACHE_DTYPES:
            reasons.append(
                f"cache_dtype={config.cache_dtype!r} is not supported (supported: the K/V "
                f"dtype, or {', '.join(QUANTIZED_CACHE_DTYPES)})"
            )
        return reasons

    def fake_arguments(self) -> KVStoreArgs:
        """Symbolic-shape stand-ins for the runtime arguments (`abi.KVStoreArgs`)."""
        tokens, heads, pages, page_size = (cute.sym_int() for _ in range(4))
        d = self.config.head_dim

        scales = {}
        if self.config.quantizes:
            scales = {
                name: cute.runtime.make_fake_tensor(Float32, (1,), stride=(1,))
                for name in ("k_scale", "v_scale")
            }
        return KVStoreArgs(
            k=fake_rows_tensor(self.dtype, (tokens, heads, d)),
            v=fake_rows_tensor(self.dtype, (tokens, heads, d)),
            k_cache=fake_rows_tensor(self.cache_dtype, (pages, page_size, heads, d)),
            v_cache=fake_rows_tensor(self.cache_dtype, (pages, page_size, heads, d)),
            slots=cute.runtime.make_fake_tensor(Int64, (tokens,), stride=(1,)),
            **scales,
        )

    @cute.jit
    def __call__(
        self,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mKCache: cute.Tensor,
        mVCache: cute.Tensor,
        mSlots: cute.Tensor,
        mKScale: cute.Tensor | None,
        mVScale: cute.Tensor | None,
        stream,
    ):
        self.kernel(mK, mV, mKCache, mVCache, mSlots, mKScale, mVScale).launch(
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
        mKScale: cute.Tensor | None,
        mVScale: cute.Tensor | None,
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
                if const_expr(self.config.quantizes):
                    self.quantize_row(mK, mKc, mKScale[0], t, h, page, row, col0)
                    self.quantize_row(mV, mVc, mVScale[0], t, h, page, row, col0)
                else:
                    for c in cutlass.range_constexpr(self.cols_per_lane):
                        mKc[page, row, h, col0 + c] = mK[t, h, col0 + c]
                        mVc[page, row, h, col0 + c] = mV[t, h, col0 + c]

    @cute.jit
    def quantize_row(
        self,
        mSrc: cute.Tensor,
        mCache: cute.Tensor,
        scale: Float32,
        t: Int32,
        h: Int32,
        page: Int32,
        row: Int32,
        col0: Int32,
    ):
        """This lane's columns of row (t, h): cache[page, row, h, c] = E4M3(src / scale),
        written as bytes (two columns per conversion)."""
        cache_bytes = cute.recast_tensor(mCache, cutlass.Uint8)
        for c in cutlass.range_constexpr(0, self.cols_per_lane, 2):
            lo = Float32(mSrc[t, h, col0 + c])
            hi = Float32(0.0)
            if const_expr(c + 1 < self.cols_per_lane):
                hi = Float32(mSrc[t, h, col0 + c + 1])
            pair = quantize_e4m3x2(lo, hi, scale)
            cache_bytes[page, row, h, col0 + c] = cutlass.Uint8(pair & 0xFF)
            if const_expr(c + 1 < self.cols_per_lane):
                cache_bytes[page, row, h, col0 + c + 1] = cutlass.Uint8((pair >> 8) & 0xFF)
