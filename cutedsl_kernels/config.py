"""Compile-time configuration of the FMHA kernels.

A `FmhaFwdConfig` names one compiled forward kernel: everything that changes the generated
code (architecture, head dims, element types, mask, tile shape, pipeline depth, schedule)
and nothing that does not (batch, sequence lengths, head counts and strides are runtime
values). It is also the cache key's kernel part, so it and its parts are frozen and
hashable.

Two parts say *what* is computed and are shared by every architecture:
- `ElementTypes`: the types of Q/K, V, O and the accumulators;
- `MaskSpec`: which mask features the kernel is compiled with. Their sizes are runtime
  arguments (the causal diagonal's alignment is `causal_offset`), so one kernel serves
  every alignment and window size. A feature an architecture's kernel does not implement
  yet is refused by its `can_implement`, with the reason.
The rest says *how* (tiles, stages, schedule) and is chosen by the host's tuning tables.
"""

from __future__ import annotations

from dataclasses import dataclass

# The 16-bit element types every kernel takes (Q/K, V and O of one type).
SUPPORTED_DTYPES = ("float16", "bfloat16")
# The 8-bit type of FP8 kernels (Q, K and V; O is one of SUPPORTED_DTYPES).
FP8_DTYPE = "float8_e4m3fn"

# Where a kernel finds each batch's keys and values (see `FmhaFwdConfig.kv_layout`).
KV_LAYOUTS = ("dense", "varlen", "cache", "paged")


@dataclass(frozen=True)
class ElementTypes:
    """Element types of one kernel, by the DSL/torch name ("bfloat16", "float8_e4m3fn").

    Attributes:
        qk: Q and K (the first GEMM's operands).
        v: V (the second GEMM's B operand).
        out: O.
        acc: the GEMM accumulators, the softmax statistics and the LSE.
        cache: K and V arrive in this type (an FP8 KV cache) and are converted to `qk` /
            `v` in shared memory before the GEMMs; None: they arrive as `qk` / `v`.
    """

    qk: str
    v: str
    out: str
    acc: str = "float32"
    cache: str | None = None

    @classmethod
    def uniform(cls, dtype: str) -> ElementTypes:
        """Q, K, V and O all of `dtype`, float32 accumulators."""
        return cls(dtype, dtype, dtype)

    @classmethod
    def fp8(cls, out: str) -> ElementTypes:
        """Q, K and V in FP8 (E4M3), O of the 16-bit type `out`, float32 accumulators."""
        return cls(FP8_DTYPE, FP8_DTYPE, out)

    @classmethod
    def fp8_cache(cls, dtype: str) -> ElementTypes:
        """Q and O of the 16-bit `dtype`, K and V stored in FP8 (E4M3) and converted to it."""
        return cls(dtype, dtype, dtype, cache=FP8_DTYPE)

    @property
    def converts_kv(self) -> bool:
        """K and V are converted from `cache`'s type in shared memory."""
        return self.cache is not None

    @property
    def is_fp8(self) -> bool:
        """Q and K are FP8 (the first GEMM runs on the FP8 tensor cores)."""
        return self.qk == FP8_DTYPE

    @property
    def is_uniform(self) -> bool:
        """Q, K, V and O share one type."""
        return self.qk == self.v == self.out

    @property
    def name(self) -> str:
        """Short name: the type itself when uniform with float32 accumulators (and a
        "-kv" suffix naming a converted cache's type)."""
        cache = "" if self.cache is None else f"-kv{self.cache}"
        if self.is_uniform and self.acc == "float32":
            return self.qk + cache
        return f"{self.qk}-{self.v}-{self.out}-acc{self.acc}{cache}"


@dataclass(frozen=True)
class MaskSpec:
    """Which scores a kernel masks or transforms before the softmax (compile-time switches;
    their sizes are runtime arguments).

    Attributes:
        causal: key j is visible to query i iff j <= i + causal_offset (runtime: the
            sequence-length difference aligns it bottom-right, 0 top-left; per-sequence
            layouts align bottom-right).
        window: sliding window: key j is visible iff i + offset - left <= j <= i + offset
            + right (sizes at run time).
        softcap: scores pass through softcap * tanh(s / softcap) (softcap at run time).
        sinks: each head has a learned sink logit that joins the softmax's denominator.
    """

    causal: bool = False
    window: bool = False
    softcap: bool = False
    sinks: bool = False

    @property
    def name(self) -> str:
        """ "full", "causal", or the features joined by "+" (e.g. "causal+softcap")."""
        parts = [f for f in ("causal", "window", "softcap", "sinks") if getattr(self, f)]
        return "+".join(parts) or "full"


CAUSAL = MaskSpec(causal=True)
NO_MASK = MaskSpec()


@dataclass(frozen=True)
class Layout:
    """Where a kernel finds each sequence's queries and keys (`FmhaFwdConfig`'s fields of
    the same names): dense, packed, cached or paged; split-KV or not."""

    varlen_q: bool = False
    kv_layout: str = "dense"
    page_size: int = 0
    split_kv: bool = False
    single_query: bool = False

    @property
    def is_varlen(self) -> bool:
        """Sequence lengths come per batch from metadata tensors (not from shapes)."""
        return self.varlen_q or self.kv_layout != "dense"


DENSE = Layout()
PACKED = Layout(varlen_q=True, kv_layout="varlen")  # packed queries and keys (varlen)


@dataclass(frozen=True)
class FmhaFwdConfig:
    """One FMHA forward kernel specialization.

    Attributes:
        arch: target architecture, e.g. "sm_90a".
        head_dim: head dimension of Q and K.
        dtypes: element types of Q/K, V, O and the accumulators.
        mask: the mask features compiled in (see `MaskSpec`).
        head_dim_v: head dimension of V and O; None (the default): `head_dim` (see
            `value_head_dim`).
        tile_m: query rows per CTA tile.
        tile_n: key rows per main-loop step.
        num_stages: depth of the K/V shared-memory pipeline.
        intra_wg_overlap: overlap each warpgroup's softmax with its own next GEMMs.
        wg_pingpong: two MMA warpgroups take turns issuing GEMMs.
        varlen_q: queries (and outputs, LSE) of all sequences are packed along one token
            axis and delimited by `cu_seqlens_q`.
        kv_layout: "dense" (batch, seqlen_k, ...), every batch the same length;
            "varlen" packed along one token axis, delimited by `cu_seqlens_k`;
            "cache" (batch, capacity, ...) with `seqused_k` keys used per batch;
            "paged" (num_pages, page_size, ...) reached through `page_table`, `seqused_k`
            keys per batch. Every layout but "dense" aligns the causal diagonal
            bottom-right per sequence.
        page_size: rows per page ("paged" only; a multiple of 16), else 0.
        single_query: ("cache" / "paged") decode: every sequence has at most one query
            token, the sequence's last, and the query heads sharing a KV head are one
            tile's rows, so q, out and lse are read as (batch, group, num_kv_heads, ...);
            masks (a window) place every row at that token. With varlen_q (packed
            queries, total_q == batch), sequence b's token is cu_seqlens_q[b] when it has
            one; otherwise its CTA writes O = 0, LSE = -inf to one of the rows no
            sequence owns (`seqlen.SeqInfo.read_single_query`). Without varlen_q, batch
            entry b is sequence b's token (a plain mask reads no position: batched
            decode without a window runs without this flag).
        split_kv: the key range of each query tile is split across `num_splits` CTAs that
            write float32 partial outputs and LSEs for a combine kernel to merge.
        persistent: launch at most `num_ctas` CTAs (one per SM) that loop over work units,
            so that the loads of a CTA's next tile overlap this tile's epilogue: a static
            round robin over equal units (dense problems: a query tile; causal: a pair of
            tiles with as many key tiles together as any other pair), unless
            `dynamic_schedule`.
        dynamic_schedule: (persistent) CTAs take work tiles one by one from a global
            counter (`tile_counter`, zeroed before the launch): tiles of unequal work
            (packed queries and keys, which need it; causal query tiles, longest first
            within groups of heads whose K/V fit in L2) leave no SM idle at the end.
        l2_group_mb: (dynamic_schedule) the K/V MiB of the (head, batch) pairs whose
            tiles are worked on together: query tiles go out longest first across such a
            group (at least one pair), group after group. Dense: > 0; packed (one batch
            entry, every sequence on its key axis): >= 0, where 0 makes one group.
        ctas_per_sm: CTAs each SM holds at once (launch bound; shared memory and registers
            are budgeted for it): with 2, one CTA's prologue and epilogue overlap the
            other's main loop.
        kv_evict_first: K/V loads carry the L2 evict-first hint: for kernels that read
            every K/V byte once (decode), so that the stream does not push other lines
            out of the L2.
        pv_two_level: (FP8 kernels) each key tile's PV product goes into a zeroed
            accumulator and is added to O in float32 (the FP8 tensor cores keep fewer
            bits when they add into an accumulator). False: O accumulates in the tensor
            cores across tiles (for A/Bs of its cost and the accuracy tests' planted
            variant; no registered kernel).
        convert_vectorized: (FP8-cache kernels) K/V tiles are converted in 8-element
            vectors; False: element by element (for A/Bs; no registered kernel).
    """

    arch: str
    head_dim: int
    dtypes: ElementTypes
    mask: MaskSpec = NO_MASK
    head_dim_v: int | None = None
    tile_m: int = 128
    tile_n: int = 128
    num_stages: int = 2
    intra_wg_overlap: bool = True
    wg_pingpong: bool = True
    varlen_q: bool = False
    kv_layout: str = "dense"
    page_size: int = 0
    split_kv: bool = False
    single_query: bool = False
    persistent: bool = False
    dynamic_schedule: bool = False
    l2_group_mb: int = 0
    ctas_per_sm: int = 1
    kv_evict_first: bool = False
    pv_two_level: bool = True
    convert_vectorized: bool = True

    @property
    def value_head_dim(self) -> int:
        """Head dimension of V and O: `head_dim_v`, or `head_dim` when it is None."""
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @property
    def name(self) -> str:
        """Short, filesystem-safe name, unique per config."""
        dims = f"d{self.head_dim}" + (
            f"v{self.value_head_dim}" if self.value_head_dim != self.head_dim else ""
        )
        return (
            f"fmha_fwd_{self.arch}_{dims}_{self.dtypes.name}_{self.mask.name}"
            f"_m{self.tile_m}n{self.tile_n}s{self.num_stages}"
            f"{'_ov' if self.intra_wg_overlap else ''}{'_pp' if self.wg_pingpong else ''}"
            f"{'_vq' if self.varlen_q else ''}{'1' if self.single_query else ''}"
            f"{'' if self.kv_layout == 'dense' else '_kv' + self.kv_layout}"
            f"{f'{self.page_size}' if self.kv_layout == 'paged' else ''}"
            f"{'_split' if self.split_kv else ''}"
            f"{'_ps' if self.persistent else ''}"
            f"{'_dyn' if self.dynamic_schedule else ''}"
            f"{f'_g{self.l2_group_mb}' if self.l2_group_mb else ''}"
            f"{f'_c{self.ctas_per_sm}' if self.ctas_per_sm != 1 else ''}"
            f"{'_ef' if self.kv_evict_first else ''}"
            f"{'' if self.pv_two_level else '_pv1'}"
            f"{'' if self.convert_vectorized else '_cv1'}"
        ).replace("+", "_")

    @property
    def v_key_major(self) -> bool:
        """V is read with the key axis contiguous (V^T in memory: (batch, num_kv_heads,
        head_dim_v, keys)), as 8-bit wgmma takes its B operand K-major only; 16-bit V is
        read as stored, head dim contiguous."""
        return self.dtypes.v == FP8_DTYPE

    @property
    def layout(self) -> Layout:
        """The layout fields as a `Layout`."""
        return Layout(
            self.varlen_q, self.kv_layout, self.page_size, self.split_kv, self.single_query
        )

    @property
    def is_varlen(self) -> bool:
        """Sequence lengths come per batch from metadata tensors (not from shapes)."""
        return self.layout.is_varlen


@dataclass(frozen=True)
class CombineConfig:
    """The split-KV combine kernel for one output type (see `simt/split_combine.py`).

    Attributes:
        arch: target architecture, e.g. "sm_90a".
        head_dim: head dimension of the output (a multiple of 32).
        dtype: element type of the merged output, "float16" or "bfloat16".
        sinks: the rows' sink logits join the merged denominator (`MaskSpec.sinks`: the
            split-KV partials leave them out).
    """

    arch: str
    head_dim: int
    dtype: str
    sinks: bool = False

    @property
    def name(self) -> str:
        """Short, filesystem-safe name, unique per config."""
        sinks = "_sinks" if self.sinks else ""
        return f"fmha_combine_{self.arch}_d{self.head_dim}_{self.dtype}{sinks}"


@dataclass(frozen=True)
class KVStoreConfig:
    """The paged KV-cache update kernel for one K/V type (see `simt/paged_kv_store.py`).

    Attributes:
        arch: target architecture, e.g. "sm_90a".
        head_dim: head dimension of K and V (a multiple of 32).
        dtype: element type of the new K/V, "float16" or "bfloat16".
        cache_dtype: element type of the cache: None for `dtype` (a copy), or
            "float8_e4m3fn" (each element divided by its tensor's scale and rounded).
    """

    arch: str
    head_dim: int
    dtype: str
    cache_dtype: str | None = None

    @property
    def quantizes(self) -> bool:
        """Whether the cache's elements differ in type from the new K/V's (scaled)."""
        return self.cache_dtype not in (None, self.dtype)

    @property
    def name(self) -> str:
        """Short, filesystem-safe name, unique per config."""
        into = f"_to_{self.cache_dtype}" if self.quantizes else ""
        return f"kv_store_{self.arch}_d{self.head_dim}_{self.dtype}{into}"


# Every compiled kernel's configuration (the kernel part of a cache key).
KernelConfig = FmhaFwdConfig | CombineConfig | KVStoreConfig
