"""Compile-time configuration of the FMHA forward kernels.

A `FmhaFwdConfig` names one compiled kernel: everything that changes the generated code
(architecture, head dim, dtype, causal masking, tile shape, pipeline depth) and nothing
that does not (batch, sequence lengths, head counts and strides are runtime values).
It is also the cache key's kernel part, so it is frozen and hashable.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class FmhaFwdConfig:
    """One FMHA forward kernel specialization.

    Attributes:
        arch: target architecture, e.g. "sm_90a".
        head_dim: head dimension of Q, K and V.
        dtype: element type of Q/K/V/O, "float16" or "bfloat16".
        is_causal: apply the causal mask `key <= query + causal_offset` (offset is a runtime
            argument: Sk - Sq for bottom-right alignment, 0 for top-left).
        tile_m: query rows per CTA tile.
        tile_n: key rows per main-loop step.
        num_stages: depth of the K/V shared-memory pipeline.
        intra_wg_overlap: overlap each warpgroup's softmax with its own next GEMMs.
        wg_pingpong: two MMA warpgroups take turns issuing GEMMs.
    """

    arch: str
    head_dim: int
    dtype: str
    is_causal: bool
    tile_m: int = 128
    tile_n: int = 128
    num_stages: int = 2
    intra_wg_overlap: bool = True
    wg_pingpong: bool = True

    @property
    def name(self) -> str:
        """Short, filesystem-safe name, unique per config."""
        mask = "causal" if self.is_causal else "full"
        return (
            f"fmha_fwd_{self.arch}_d{self.head_dim}_{self.dtype}_{mask}"
            f"_m{self.tile_m}n{self.tile_n}s{self.num_stages}"
            f"{'_ov' if self.intra_wg_overlap else ''}{'_pp' if self.wg_pingpong else ''}"
        )
