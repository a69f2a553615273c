"""The benchmark grid: which attention problems are measured, and how each is measured.

Every problem is a `Case`. Its `suite` decides the measurement kinds:

    grid, gqa, seqlen_qk -> "kernel"   device time of one call (CUDA events, cold L2)
    latency              -> "eager"    wall time per call of back-to-back calls (host included)
                            "graph"    wall time per replay of a CUDA graph of one call
    first_call           -> "cold_first_call", "warm_first_call" (fresh processes, sparsek only)
    varlen               -> "kernel"   packed sequences of mixed lengths (`Case.seqlens`)
    decode               -> "kernel"   one query per sequence against a paged KV cache
                                       (`Case.block_size`), timed as a CUDA-graph replay
                                       (split-KV + combine without host gaps); also
                                       reported as bandwidth
    xformers             -> "kernel"   one row per xFormers bias type (opt-in, see below);
                                       block-diagonal biases on packed sequences
                                       (`Case.seqlens`), padded / paged keys of a cache
                                       (`Case.kv_seqlens`, `kv_padding`, `block_size`),
                                       local biases' sliding window (`Case.window`)
    masks                -> "kernel"   window, softcap and sinks (`Case.window`, `softcap`,
                                       `sinks`; opt-in, see below) beside the same problem
                                       without them: dense prefill, and paged decode
                                       (`Case.block_size`, timed as a CUDA-graph replay)

The `xformers` suite is not run by default: it times `sparsek_xformers` (sparsek's xFormers
operator), and xFormers cannot be imported in a process that has FlashAttention-4 installed
(FA4 takes the `flash_attn` name, which xFormers mistakes for FlashAttention-2). It must be
asked for with `--suites xformers` and is refused together with provider `fa4`.

The `masks` suite is opt-in too (`--suites masks`): FlashAttention's mask arguments
(sliding window, logit softcap, per-head sink logits) on sparsek beside the same shape
without them and beside the peers that take them (`fa4`, and `fa3`, FlashAttention-3, a
provider of this suite only); the SDPA backends have none of these masks and are not
planned there.

This module imports nothing heavy (no torch) so `bench_fmha.py --list` runs anywhere.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

# Default providers and suites (what a plain `bench_fmha.py` run measures).
PROVIDERS: tuple[str, ...] = ("sparsek", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "fa4")
VARLEN_SUITE = "varlen"
DECODE_SUITE = "decode"
MASKS_SUITE = "masks"
HEAD_DIMS_SUITE = "head_dims"
SUITES: tuple[str, ...] = (
    "first_call",
    "grid",
    "gqa",
    "seqlen_qk",
    "latency",
    VARLEN_SUITE,
    DECODE_SUITE,
)
# Opt-in: named explicitly with --providers / --suites, never part of the defaults.
XFORMERS_SUITE = "xformers"
XFORMERS_PROVIDER = "sparsek_xformers"
FA3_PROVIDER = "fa3"
OPT_IN_PROVIDERS: tuple[str, ...] = (XFORMERS_PROVIDER, FA3_PROVIDER)
OPT_IN_SUITES: tuple[str, ...] = (XFORMERS_SUITE, MASKS_SUITE, HEAD_DIMS_SUITE)
ALL_PROVIDERS: tuple[str, ...] = PROVIDERS + OPT_IN_PROVIDERS
ALL_SUITES: tuple[str, ...] = SUITES + OPT_IN_SUITES
# Providers of the xformers suite when --providers is not given (fa4 cannot share the process).
XFORMERS_SUITE_PROVIDERS: tuple[str, ...] = (
    "sparsek",
    XFORMERS_PROVIDER,
    "sdpa_flash",
    "sdpa_cudnn",
    "sdpa_efficient",
)
KINDS_BY_SUITE: dict[str, tuple[str, ...]] = {
    "grid": ("kernel",),
    "gqa": ("kernel",),
    "seqlen_qk": ("kernel",),
    "latency": ("eager", "graph"),
    "first_call": ("cold_first_call", "warm_first_call"),
    VARLEN_SUITE: ("kernel",),
    DECODE_SUITE: ("kernel",),
    XFORMERS_SUITE: ("kernel",),
    MASKS_SUITE: ("kernel",),
    HEAD_DIMS_SUITE: ("kernel",),
}
# Suites whose rows exist for sparsek only (they time sparsek's compile cache).
SPARSEK_ONLY_SUITES: frozenset[str] = frozenset({"first_call"})

# xFormers bias types the xformers suite times (the ones SparseKAttention supports), by the
# name written in the CSV's `bias` column. "None" is attn_bias=None (no mask).
BIAS_NONE = "None"
BIAS_TOP_LEFT = "LowerTriangularMask"  # causal, query i sees keys j <= i
BIAS_BOTTOM_RIGHT = "LowerTriangularFromBottomRightMask"  # j <= i + seqlen_k - seqlen_q
# Block-diagonal (one block per packed sequence, batch 1 for xFormers), keys packed like the
# queries. BlockDiagonalCausalMask is top-left per block: planned only with as many keys as
# queries per block, where it equals the bottom-right mask the reference and peers use.
BIAS_BLOCK = "BlockDiagonalMask"
BIAS_BLOCK_CAUSAL = "BlockDiagonalCausalMask"
BIAS_BLOCK_BOTTOM_RIGHT = "BlockDiagonalCausalFromBottomRightMask"
# Keys in a padded per-sequence cache (kv_padding slots per sequence, kv_seqlens valid), and
# the same in a paged cache (pages of `block_size` tokens through a block table). The causal
# ones are bottom-right per block w.r.t. its kv_seqlen (chunked prefill).
BIAS_PADDED = "BlockDiagonalPaddedKeysMask"
BIAS_PADDED_CAUSAL = "BlockDiagonalCausalWithOffsetPaddedKeysMask"
BIAS_PAGED = "PagedBlockDiagonalPaddedKeysMask"
BIAS_PAGED_CAUSAL = "PagedBlockDiagonalCausalWithOffsetPaddedKeysMask"
# Local (sliding-window) biases, aligned bottom-right (per block for the block-diagonal ones;
# BlockDiagonalCausalLocalAttentionMask is top-left per block, planned with keys = queries).
# Their window is `Case.window` in sparsek's terms (`xformers_window`): a band's
# (window_left, window_right) as it is; a causal one's window_size keys ending on the
# diagonal, (window_size - 1, 0). xFormers 0.0.35 has no paged local bias.
BIAS_LOCAL = "LocalAttentionFromBottomRightMask"  # band
BIAS_LOCAL_CAUSAL = "LowerTriangularFromBottomRightLocalAttentionMask"
BIAS_BLOCK_LOCAL = "BlockDiagonalCausalLocalAttentionMask"
BIAS_BLOCK_LOCAL_BOTTOM_RIGHT = "BlockDiagonalCausalLocalAttentionFromBottomRightMask"
BIAS_PADDED_LOCAL = "BlockDiagonalLocalAttentionPaddedKeysMask"  # band
BIAS_PADDED_LOCAL_CAUSAL = "BlockDiagonalCausalLocalAttentionPaddedKeysMask"
# By where the keys are (`Case.keys`), each group's local biases last.
DENSE_BIASES: tuple[str, ...] = (
    BIAS_NONE,
    BIAS_TOP_LEFT,
    BIAS_BOTTOM_RIGHT,
    BIAS_LOCAL,
    BIAS_LOCAL_CAUSAL,
)
PACKED_BIASES: tuple[str, ...] = (
    BIAS_BLOCK,
    BIAS_BLOCK_CAUSAL,
    BIAS_BLOCK_BOTTOM_RIGHT,
    BIAS_BLOCK_LOCAL,
    BIAS_BLOCK_LOCAL_BOTTOM_RIGHT,
)
PADDED_BIASES: tuple[str, ...] = (
    BIAS_PADDED,
    BIAS_PADDED_CAUSAL,
    BIAS_PADDED_LOCAL,
    BIAS_PADDED_LOCAL_CAUSAL,
)
PAGED_BIASES: tuple[str, ...] = (BIAS_PAGED, BIAS_PAGED_CAUSAL)
XFORMERS_BIASES: tuple[str, ...] = DENSE_BIASES + PACKED_BIASES + PADDED_BIASES + PAGED_BIASES
CAUSAL_BIASES: frozenset[str] = frozenset(
    {
        BIAS_TOP_LEFT,
        BIAS_BOTTOM_RIGHT,
        BIAS_BLOCK_CAUSAL,
        BIAS_BLOCK_BOTTOM_RIGHT,
        BIAS_PADDED_CAUSAL,
        BIAS_PAGED_CAUSAL,
        BIAS_LOCAL_CAUSAL,
        BIAS_BLOCK_LOCAL,
        BIAS_BLOCK_LOCAL_BOTTOM_RIGHT,
        BIAS_PADDED_LOCAL_CAUSAL,
    }
)
BAND_BIASES: frozenset[str] = frozenset({BIAS_LOCAL, BIAS_PADDED_LOCAL})
LOCAL_BIASES: frozenset[str] = BAND_BIASES | {
    BIAS_LOCAL_CAUSAL,
    BIAS_BLOCK_LOCAL,
    BIAS_BLOCK_LOCAL_BOTTOM_RIGHT,
    BIAS_PADDED_LOCAL_CAUSAL,
}
# Block-diagonal rows: the varlen suite's 16 sequences (H16 d128, like its MHA rows). Padded /
# paged keys: chunked prefill, each sequence's chunk (the same 16 lengths) after
# XFORMERS_CONTEXT cached tokens, kv_seqlen = chunk + context; pages of XFORMERS_PAGE_SIZE.
XFORMERS_CONTEXT = 4096
XFORMERS_PAGE_SIZE = 16
# Local biases' windows: causal ones window_size = 1024 keys (Gemma 3's sliding window; half
# the dense S, a quarter of the longest block, an eighth of the longest padded keys: it cuts
# every dense and padded sequence and the 7 packed blocks longer than 1024), the band ones
# 512 keys a side (1025 keys a query, about as many): sparsek windows (1023, 0), (512, 512).
XFORMERS_WINDOW_SIZE = 1024
XFORMERS_BAND: tuple[int, int] = (512, 512)

# The main grid keeps the work per launch comparable: batch * seqlen = 16k tokens and
# num_heads * head_dim = 2048 (FlashAttention's benchmark convention).
GRID_TOKENS = 16 * 1024
GRID_HIDDEN = 2048
GRID_SEQLENS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
GRID_HEAD_DIMS: tuple[int, ...] = (64, 128)
# The head_dims suite (opt-in): the same grid for the other registered head dims, S >= 1k,
# beside FlashAttention-3 too (it serves head dims 64-256 in bf16).
HEAD_DIMS_GRID: tuple[int, ...] = (32, 96, 192, 256)
HEAD_DIMS_SEQLENS: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
# ... and (head_dim, head_dim_v) pairs whose V is narrower (DeepSeek-style MLA prefill).
HEAD_DIMS_VALUE: tuple[tuple[int, int], ...] = ((192, 128),)
# Its decode rows: the paged cache (H32 over 8 KV heads, pages of 16) at batch x context =
# 256k tokens, for the largest head dims, read against the copy bandwidth.
HEAD_DIMS_DECODE: tuple[tuple[int, int], ...] = ((256, 256), (192, 128))
HEAD_DIMS_DECODE_SHAPES: tuple[tuple[int, int], ...] = ((8, 32768), (32, 8192))
CAUSAL_FLAGS: tuple[bool, ...] = (False, True)

# varlen: GRID_TOKENS packed into 16 sequences whose lengths come from a fixed seed (not
# --seed, which only seeds the tensor values): a quarter of the tokens in one long sequence,
# four short ones (< 128 tokens, one partial tile), the rest in between (see varlen_seqlens).
VARLEN_SEQUENCES = 16
VARLEN_SEED = 0
VARLEN_SHORT = 4
# (num_heads, num_kv_heads) at d128: MHA as in the d128 grid (H = 2048 / 128), and GQA.
VARLEN_HEADS: tuple[tuple[int, int], ...] = ((16, 16), (32, 8))

# decode: one new query per sequence, cache_seqlens = context for all, paged KV cache.
DECODE_BATCHES: tuple[int, ...] = (1, 8, 32, 128)
DECODE_CONTEXTS: tuple[int, ...] = (1024, 4096, 16384, 32768)
DECODE_BLOCK_SIZES: tuple[int, ...] = (16, 64)
DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM = 32, 8, 128
# Combos whose K + V cache (16-bit) is larger are not planned: the run also holds a dense
# copy for SDPA and the reference, and must fit an 80 GB H100 beside the other buffers.
DECODE_MAX_KV_BYTES = 20e9
# masks: FlashAttention's mask arguments. Dense rows: the grid's d128 shape at S = 16k
# (batch x S = 16k tokens, H = 2048 / 128 = 16), causal with and without a (4096, 0) window
# (the last 4096 keys and the diagonal), softcap 30, sinks; softcap also non-causal. Decode
# rows: one query per sequence against a 32k paged context (16-token pages, H32 Hkv8 d128,
# the decode suite's heads), with and without the same window.
NO_WINDOW: tuple[int, int] = (-1, -1)
MASKS_SEQLEN = 16384
MASKS_HEAD_DIM = 128
MASKS_WINDOW_LEFT = 4096
MASKS_SOFTCAP = 30.0
MASKS_DECODE_BATCHES: tuple[int, ...] = (1, 8)
MASKS_DECODE_CONTEXT = 32768
MASKS_DECODE_BLOCK_SIZE = 16
# Providers planned on the masks suite's cases (the SDPA backends take none of its masks).
MASKS_PROVIDERS: tuple[str, ...] = ("sparsek", "fa4", FA3_PROVIDER)
# The masks suite's q is torch.randn times this: scores of standard deviation 2, whose top
# values reach where softcap 30 bends them (with q ~ N(0, 1) the capped and uncapped outputs
# agree within the check's tolerance, so the check could not tell a softcap was applied).
MASKS_Q_SCALE = 2.0
# Output check of the masks suite (float64 reference): the whole output when batch x heads x
# Sq x Sk is at most this many scores, else MASKS_CHECK_ROWS query rows at the start, where
# the window starts to cut (or the middle) and at the end (`masks_check_rows`).
MASKS_FULL_CHECK_SCORES = 2**26
MASKS_CHECK_ROWS = 256

# Bytes per element of the --dtype choices (both 16-bit).
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2}


def xformers_window(
    bias: str, window_size: int = XFORMERS_WINDOW_SIZE, band: tuple[int, int] = XFORMERS_BAND
) -> tuple[int, int]:
    """sparsek's (left, right) window of an xFormers bias: `band` (window_left,
    window_right) for the band biases, (window_size - 1, 0) for the causal local ones (their
    window_size keys end on the diagonal, the diagonal counted); NO_WINDOW for the others."""
    if bias in BAND_BIASES:
        return band
    if bias in LOCAL_BIASES:
        return (window_size - 1, 0)
    return NO_WINDOW


@dataclass(frozen=True)
class Case:
    """One attention problem: q (batch, seqlen_q, num_heads, head_dim), k/v with num_kv_heads."""

    suite: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    # xFormers attn_bias type (xformers suite only; "" elsewhere). Must agree with `causal`.
    bias: str = ""
    # varlen suite: the length of each packed sequence (queries = keys); `batch` is their
    # count and seqlen_q = seqlen_k the longest (what max_seqlen_q/k get). Empty elsewhere.
    seqlens: tuple[int, ...] = ()
    # decode suite: tokens per block of the paged KV cache (0 elsewhere); seqlen_k is the
    # context (cache_seqlens of every sequence), seqlen_q is 1. xformers suite, Paged...
    # biases: the page size.
    block_size: int = 0
    # xformers suite, padded / paged keys: valid keys of each sequence (its kv_seqlen; the
    # sequence's queries are the last `seqlens[i]` of them) and the slots per sequence of the
    # padded cache (paged: pages per sequence x block_size). seqlen_k = max(kv_seqlens).
    kv_seqlens: tuple[int, ...] = ()
    kv_padding: int = 0
    # masks suite: sparsek.masks' arguments. window (left, right), -1 unbounded, aligned
    # like causal (bottom-right); with causal, right is 0. softcap: 0 none. sinks: one
    # sink logit per query head. Defaults (no mask beyond `causal`) everywhere else, but for
    # the window of the xformers suite's local biases (`xformers_window`).
    window: tuple[int, int] = NO_WINDOW
    softcap: float = 0.0
    sinks: bool = False
    # V's (and O's) head dim where it differs from head_dim (head_dims suite: 192 / 128);
    # 0: head_dim.
    head_dim_v: int = 0

    @property
    def value_head_dim(self) -> int:
        """V's and O's head dim."""
        return self.head_dim_v or self.head_dim

    @property
    def dims_text(self) -> str:
        """The head dims as the CSV and labels give them: "128", or "192/128" (q/k, v)."""
        if self.value_head_dim == self.head_dim:
            return str(self.head_dim)
        return f"{self.head_dim}/{self.value_head_dim}"

    def __post_init__(self) -> None:
        self._check_varlen()
        self._check_decode()
        self._check_masks()
        if not self.bias:
            if self.kv_seqlens or self.kv_padding:
                raise ValueError("kv_seqlens / kv_padding are given for padded / paged biases only")
            return
        if self.bias not in XFORMERS_BIASES:
            raise ValueError(f"unknown bias {self.bias!r}; known: {', '.join(XFORMERS_BIASES)}")
        if self.causal != (self.bias in CAUSAL_BIASES):
            raise ValueError(f"bias {self.bias} does not match causal={self.causal}")
        self._check_local()
        if self.bias == BIAS_TOP_LEFT and self.seqlen_q != self.seqlen_k:
            # The reference and every peer are bottom-right causal; they agree with the
            # top-left mask only when seqlen_q == seqlen_k.
            raise ValueError("LowerTriangularMask (top-left) rows need seqlen_q == seqlen_k")
        self._check_keys()

    @property
    def keys(self) -> str:
        """Where the keys are: "dense" (BMHK like q), "packed" (like the packed queries),
        "padded" (per-sequence slots of a cache) or "paged" (a paged cache)."""
        if self.bias in PACKED_BIASES:
            return "packed"
        if self.bias in PADDED_BIASES:
            return "padded"
        if self.bias in PAGED_BIASES:
            return "paged"
        return "dense"

    @property
    def key_lengths(self) -> tuple[int, ...]:
        """Valid keys per sequence: kv_seqlens, or seqlens when keys are packed like the
        queries (varlen, block-diagonal); () for dense cases."""
        return self.kv_seqlens or self.seqlens

    def _check_keys(self) -> None:
        """Block-diagonal biases: the lengths and cache geometry their keys need."""
        keys = self.keys
        if keys == "dense":
            if self.seqlens or self.kv_seqlens or self.kv_padding:
                raise ValueError(f"bias {self.bias} takes dense BMHK inputs (no seqlens)")
            return
        if self.seqlens and self.seqlen_q != max(self.seqlens):
            raise ValueError(f"bias {self.bias}: seqlen_q must be max(seqlens)")
        if keys == "packed":
            if self.seqlen_k != self.seqlen_q:
                raise ValueError(f"bias {self.bias}: seqlen_k must be seqlen_q (packed keys)")
            if self.kv_seqlens or self.kv_padding or self.block_size:
                raise ValueError(
                    f"bias {self.bias}: keys are packed like the queries (as many per "
                    "block), no kv_seqlens / kv_padding / block_size"
                )
            return
        kv = self.kv_seqlens
        if len(kv) != self.batch or min(kv) < 0 or self.seqlen_k != max(kv):
            raise ValueError(
                f"bias {self.bias}: kv_seqlens {kv} must be batch={self.batch} lengths >= 0 "
                "with seqlen_k = their max"
            )
        if self.kv_padding < max(kv):
            raise ValueError(f"bias {self.bias}: kv_padding {self.kv_padding} < max(kv_seqlens)")
        if keys == "paged" and not self.block_size:
            raise ValueError(f"bias {self.bias}: paged keys need block_size (the page size)")
        if self.block_size and self.kv_padding % self.block_size:
            raise ValueError(
                f"kv_padding {self.kv_padding} is not a multiple of the page size {self.block_size}"
            )

    def _check_local(self) -> None:
        """xformers suite: a window exactly for the local biases, in the bias's shape."""
        if (self.window != NO_WINDOW) != (self.bias in LOCAL_BIASES):
            raise ValueError(f"bias {self.bias}: a window is given exactly for the local biases")
        if self.bias not in LOCAL_BIASES:
            return
        left, right = self.window
        if self.bias in BAND_BIASES and (left < 0 or right < 0):
            raise ValueError(f"bias {self.bias}: window {self.window}, each side >= 0")
        if self.bias not in BAND_BIASES and (left < 0 or right != 0):
            raise ValueError(
                f"bias {self.bias}: window {self.window} must be (window_size - 1, 0), "
                "window_size >= 1"
            )

    def _check_varlen(self) -> None:
        block_diagonal = self.suite == XFORMERS_SUITE and self.bias not in ("", *DENSE_BIASES)
        if (self.suite == VARLEN_SUITE or block_diagonal) != bool(self.seqlens):
            raise ValueError(
                "seqlens is given exactly for the varlen suite's cases (and the xformers "
                "suite's block-diagonal biases)"
            )
        if not self.seqlens:
            return
        if len(self.seqlens) != self.batch or min(self.seqlens) < 0:
            raise ValueError(f"seqlens {self.seqlens} must be batch={self.batch} lengths >= 0")
        if self.suite == VARLEN_SUITE and (
            self.seqlen_q != max(self.seqlens) or self.seqlen_k != self.seqlen_q
        ):
            raise ValueError("varlen cases have seqlen_q = seqlen_k = max(seqlens)")

    def _check_decode(self) -> None:
        if self.suite not in (DECODE_SUITE, MASKS_SUITE, HEAD_DIMS_SUITE):
            paged = self.suite == XFORMERS_SUITE and self.bias in PAGED_BIASES
            if self.block_size and not paged:
                raise ValueError(
                    "block_size > 0 is given for the decode suite's cases, the masks suite's "
                    "decode cases and the xformers suite's paged biases only"
                )
            return
        if not self.block_size:
            if self.suite == DECODE_SUITE:
                raise ValueError("block_size > 0 is given exactly for the decode suite's cases")
            return  # a dense masks case
        if self.seqlen_q != 1 or not self.causal:
            raise ValueError("decode cases have one causal query per sequence (seqlen_q = 1)")
        if self.seqlen_k % self.block_size:
            raise ValueError(
                f"context {self.seqlen_k} is not a multiple of block_size {self.block_size}"
            )

    def _check_masks(self) -> None:
        if self.suite != MASKS_SUITE:
            local = self.suite == XFORMERS_SUITE and self.bias in LOCAL_BIASES
            if self.softcap > 0 or self.sinks or (self.window != NO_WINDOW and not local):
                raise ValueError(
                    "window, softcap and sinks are given for the masks suite only (a window "
                    "also for the xformers suite's local biases)"
                )
            return
        if self.bias or self.seqlens or self.kv_seqlens:
            raise ValueError("masks cases are dense or paged decode (no bias, no seqlens)")
        left, right = self.window
        if left < -1 or right < -1:
            raise ValueError(f"window {self.window}: each size >= 0, or -1 for unbounded")
        if self.causal and right not in (-1, 0):
            raise ValueError(f"window {self.window}: causal sets the right size to 0")
        if not self.softcap >= 0:
            raise ValueError(f"softcap {self.softcap} must be >= 0 (0: none)")

    @property
    def has_mask(self) -> bool:
        """A window, softcap or sinks: a mask beyond plain causal."""
        return self.window != NO_WINDOW or self.softcap > 0 or self.sinks

    @property
    def mask_text(self) -> str:
        """The mask beyond `causal`, as the CSV's `mask` column and --list write it
        ("window=(4096, 0) softcap=30 sinks"); "" for none."""
        parts = []
        if self.window != NO_WINDOW:
            parts.append(f"window=({self.window[0]}, {self.window[1]})")
        if self.softcap > 0:
            parts.append(f"softcap={self.softcap:g}")
        if self.sinks:
            parts.append("sinks")
        return " ".join(parts)

    @property
    def is_decode(self) -> bool:
        """One query per sequence against a paged cache (decode suite, masks decode rows):
        timed as a CUDA-graph replay and reported as bandwidth."""
        return self.block_size > 0 and not self.seqlens

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS_BY_SUITE[self.suite]

    @property
    def total_tokens(self) -> int:
        """Query tokens of the whole problem (packed length for varlen and block-diagonal)."""
        return sum(self.seqlens) if self.seqlens else self.batch * self.seqlen_q

    @property
    def key_tokens(self) -> int:
        """Valid key tokens of the whole problem (padding slots not counted)."""
        lengths = self.key_lengths
        return sum(lengths) if lengths else self.batch * self.seqlen_k

    def label(self) -> str:
        heads = f"H{self.num_heads}"
        if self.num_kv_heads != self.num_heads:
            heads += f"/Hkv{self.num_kv_heads}"
        extra = f" {self.mask_text}" if self.has_mask else ""
        if self.seqlens:
            mask = "causal" if self.causal else "full"
            if self.bias:
                mask = f"bias={self.bias}"
            seqs = f"{self.batch} seqs {self.total_tokens} tok (max {self.seqlen_q})"
            if self.kv_seqlens:
                seqs += f" kv {self.key_tokens} tok (max {self.seqlen_k}, {self.kv_padding} slots)"
            if self.block_size:
                seqs += f" page{self.block_size}"
            return f"{self.suite} {seqs} {heads} d{self.dims_text} {mask}{extra}"
        if self.block_size:
            return (
                f"{self.suite} B{self.batch} ctx{self.seqlen_k} {heads} d{self.dims_text} "
                f"block{self.block_size}{extra}"
            )
        seq = f"S{self.seqlen_q}"
        if self.seqlen_q != self.seqlen_k:
            seq = f"Sq{self.seqlen_q}/Sk{self.seqlen_k}"
        mask = "causal" if self.causal else "full"
        if self.bias:
            mask = f"bias={self.bias}"
        return f"{self.suite} B{self.batch} {seq} {heads} d{self.dims_text} {mask}{extra}"


def visible_pairs(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    *,
    exact: bool = False,
    window: tuple[int, int] = NO_WINDOW,
) -> float:
    """Number of (query, key) pairs attended to per (batch, head).

    Causal with seqlen_q == seqlen_k counts half the square (the usual convention) unless
    `exact`; otherwise causal counts the exact pairs of the bottom-right aligned mask: query i
    sees keys j <= i + seqlen_k - seqlen_q (seqlen * (seqlen + 1) / 2 for a square). A
    `window` (left, right) is always counted exactly (a band is no half square): query i sees
    keys i + offset - left <= j <= i + offset + right (offset = seqlen_k - seqlen_q; -1
    unbounded; causal sets right to 0), clipped to the keys there are.
    """
    if window != NO_WINDOW:
        offset = seqlen_k - seqlen_q
        left, right = window
        right = 0 if causal else right
        pairs = 0
        for i in range(seqlen_q):
            first = 0 if left < 0 else max(i + offset - left, 0)
            last = seqlen_k - 1 if right < 0 else min(i + offset + right, seqlen_k - 1)
            pairs += max(last - first + 1, 0)
        return float(pairs)
    if not causal:
        return float(seqlen_q * seqlen_k)
    if seqlen_q == seqlen_k and not exact:
        return seqlen_q * seqlen_k / 2.0
    offset = seqlen_k - seqlen_q
    return float(sum(min(max(i + offset + 1, 0), seqlen_k) for i in range(seqlen_q)))


def flops(case: Case) -> float:
    """Forward FLOPs: two matmuls per visible pair, QK^T of 2 * head_dim FLOPs and PV of
    2 * head_dim_v.

    varlen and the block-diagonal xFormers biases count every sequence's exact pairs (a
    sequence of 50 tokens is no half square; padded / paged keys: its kv_seqlen keys, the
    causal ones bottom-right w.r.t. kv_seqlen; padding slots are never visible). A window
    (the masks suite's, the local biases') counts the exact pairs of its band, per sequence
    for the block-diagonal ones; softcap and sinks add none (the tanh and the sink's exp are
    not counted).
    """
    if case.seqlens:
        lengths = zip(case.seqlens, case.key_lengths, strict=True)
        pairs = sum(
            visible_pairs(n, m, case.causal, exact=True, window=case.window) for n, m in lengths
        )
        return 2.0 * case.num_heads * (case.head_dim + case.value_head_dim) * pairs
    pairs = visible_pairs(case.seqlen_q, case.seqlen_k, case.causal, window=case.window)
    return 2.0 * case.batch * case.num_heads * (case.head_dim + case.value_head_dim) * pairs


def key_span(case: Case) -> int:
    """Key tokens of one sequence that some query of it sees, for a dense or decode case:
    all seqlen_k without a window; with one, the keys from the first query's left edge to
    the last query's right edge, widened to whole pages of a paged cache (a page is read
    whole or not at all). One query at the end of a 32k context with a (4096, 0) window
    sees keys 28671..32767 (4097), which lie in pages 1791..2047 of 16 tokens: 4112 tokens.
    """
    return _span(case, case.seqlen_q, case.seqlen_k)


def _span(case: Case, seqlen_q: int, seqlen_k: int) -> int:
    """`key_span` of one sequence of seqlen_q queries and seqlen_k keys under case's mask."""
    if case.window == NO_WINDOW:
        return seqlen_k
    if seqlen_q <= 0 or seqlen_k <= 0:
        return 0
    offset = seqlen_k - seqlen_q
    left, right = case.window
    right = 0 if case.causal else right
    first = 0 if left < 0 else max(offset - left, 0)
    last = seqlen_k - 1 if right < 0 else min(seqlen_q - 1 + offset + right, seqlen_k - 1)
    if last < first:
        return 0
    if case.block_size:
        first = first // case.block_size * case.block_size
        last = min((last // case.block_size + 1) * case.block_size, seqlen_k) - 1
    return last - first + 1


def kv_bytes(case: Case, dtype_bytes: int = 2) -> int:
    """Bytes of K and V a forward must read at least once: every key token some query sees,
    of every sequence (a window's span when it hides keys from all queries: a windowed
    decode reads only the window's pages, a local bias's sequence only the keys its window
    reaches), num_kv_heads x head_dim elements each for K, x head_dim_v for V (q and the
    output not counted)."""
    if case.window == NO_WINDOW:
        tokens = case.key_tokens
    elif case.seqlens:
        lengths = zip(case.seqlens, case.key_lengths, strict=True)
        tokens = sum(_span(case, n, m) for n, m in lengths)
    else:
        tokens = case.batch * key_span(case)
    dims = case.head_dim + case.value_head_dim
    return tokens * case.num_kv_heads * dims * dtype_bytes


def bandwidth_gbps(num_bytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes per second) moving `num_bytes` in `ms`."""
    return num_bytes / (ms * 1e-3) / 1e9


def varlen_seqlens(
    total: int = GRID_TOKENS,
    count: int = VARLEN_SEQUENCES,
    seed: int = VARLEN_SEED,
    num_short: int = VARLEN_SHORT,
) -> tuple[int, ...]:
    """`count` sequence lengths summing to `total`, the same for a given seed on every machine.

    One long sequence of total / 4 tokens; `num_short` short ones of 16..127 tokens; the
    others share the rest with weights in [1, 4), so each is below total / 4 (the long one
    stays the only one that long). Only `Random.random()` is used: Python keeps its sequence
    stable across versions (randint and shuffle carry no such promise). Order shuffled.
    """
    rng = random.Random(seed)
    longest = total // 4
    short = [16 + int(rng.random() * 112) for _ in range(num_short)]
    num_mid = count - 1 - num_short
    rest = total - longest - sum(short)
    if num_mid < 1 or rest < num_mid:
        raise ValueError(f"cannot split {total} tokens into {count} sequences this way")
    weights = [1.0 + 3.0 * rng.random() for _ in range(num_mid)]
    mid = [int(w / sum(weights) * rest) for w in weights]
    for i in range(rest - sum(mid)):  # hand out what rounding down left
        mid[i % num_mid] += 1
    lengths = [longest, *short, *mid]
    for i in range(len(lengths) - 1, 0, -1):  # Fisher-Yates on random()
        j = int(rng.random() * (i + 1))
        lengths[i], lengths[j] = lengths[j], lengths[i]
    return tuple(lengths)


def _grid(
    seqlens: tuple[int, ...],
    head_dims: tuple[int, ...] | tuple[tuple[int, int], ...],
    suite: str = "grid",
) -> list[Case]:
    """B x S = GRID_TOKENS, H = GRID_HIDDEN // head_dim; head_dims: ints, or (head_dim,
    head_dim_v) pairs."""
    cases = []
    for dims in head_dims:
        head_dim, head_dim_v = dims if isinstance(dims, tuple) else (dims, dims)
        heads = GRID_HIDDEN // head_dim
        shape = (heads, heads, head_dim)
        value = head_dim_v if head_dim_v != head_dim else 0
        for causal in CAUSAL_FLAGS:
            for seqlen in seqlens:
                batch = GRID_TOKENS // seqlen
                cases.append(Case(suite, batch, seqlen, seqlen, *shape, causal, head_dim_v=value))
    return cases


def _head_dims() -> list[Case]:
    """The head_dims suite: the grid of HEAD_DIMS_GRID and HEAD_DIMS_VALUE, then decode."""
    cases = _grid(HEAD_DIMS_SEQLENS, HEAD_DIMS_GRID, HEAD_DIMS_SUITE)
    cases += _grid(HEAD_DIMS_SEQLENS, HEAD_DIMS_VALUE, HEAD_DIMS_SUITE)
    for head_dim, head_dim_v in HEAD_DIMS_DECODE:
        value = head_dim_v if head_dim_v != head_dim else 0
        for batch, context in HEAD_DIMS_DECODE_SHAPES:
            shape = (batch, 1, context, 32, 8, head_dim, True)
            cases.append(Case(HEAD_DIMS_SUITE, *shape, block_size=16, head_dim_v=value))
    return cases


def _gqa() -> list[Case]:
    seqlen = 4096
    return [Case("gqa", GRID_TOKENS // seqlen, seqlen, seqlen, 32, 8, 128, c) for c in CAUSAL_FLAGS]


def _seqlen_qk() -> list[Case]:
    # batch * seqlen_k = 16k tokens of context, as in the grid.
    seqlen_q, seqlen_k = 1024, 8192
    heads = GRID_HIDDEN // 128
    batch = GRID_TOKENS // seqlen_k
    return [
        Case("seqlen_qk", batch, seqlen_q, seqlen_k, heads, heads, 128, c) for c in CAUSAL_FLAGS
    ]


def _latency() -> list[Case]:
    shapes = ((1, 8, 128, 64), (1, 8, 512, 64), (1, 16, 512, 128))
    return [Case("latency", b, s, s, h, h, d, False) for b, h, s, d in shapes]


def _xformers(
    batch: int,
    seqlen: int,
    seqlen_qk: tuple[int, int],
    heads: int,
    head_dim: int,
    seqlens: tuple[int, ...],
    context: int = XFORMERS_CONTEXT,
    page_size: int = XFORMERS_PAGE_SIZE,
    window_size: int = XFORMERS_WINDOW_SIZE,
    band: tuple[int, int] = XFORMERS_BAND,
) -> list[Case]:
    """One row per supported xFormers bias.

    Dense biases: (batch, seqlen) with Sq = Sk, plus bottom-right causal at `seqlen_qk`.
    Block-diagonal: the packed `seqlens` (keys = queries per block). Padded / paged keys:
    the same query lengths after `context` cached tokens (kv_seqlen = n + context), in
    max(kv_seqlen) slots per sequence rounded up to whole pages of `page_size`. Local biases
    on the problem of their group, causal ones with `window_size` keys, band ones with
    `band` = (window_left, window_right) (`xformers_window`).
    """

    def window(bias: str) -> tuple[int, int]:
        return xformers_window(bias, window_size, band)

    dims = (heads, heads, head_dim)
    cases = [
        Case(XFORMERS_SUITE, batch, seqlen, seqlen, *dims, b in CAUSAL_BIASES, b, window=window(b))
        for b in DENSE_BIASES
    ]
    seqlen_q, seqlen_k = seqlen_qk
    cases.append(Case(XFORMERS_SUITE, batch, seqlen_q, seqlen_k, *dims, True, BIAS_BOTTOM_RIGHT))
    count, top = len(seqlens), max(seqlens)
    for bias in PACKED_BIASES:
        causal = bias in CAUSAL_BIASES
        cases.append(
            Case(XFORMERS_SUITE, count, top, top, *dims, causal, bias, seqlens, window=window(bias))
        )
    kv_seqlens = tuple(n + context for n in seqlens)
    padding = -(-max(kv_seqlens) // page_size) * page_size
    for bias in PADDED_BIASES + PAGED_BIASES:
        cases.append(
            Case(
                XFORMERS_SUITE,
                count,
                top,
                max(kv_seqlens),
                heads,
                heads,
                head_dim,
                bias in CAUSAL_BIASES,
                bias,
                seqlens,
                block_size=page_size if bias in PAGED_BIASES else 0,
                kv_seqlens=kv_seqlens,
                kv_padding=padding,
                window=window(bias),
            )
        )
    return cases


def _varlen(
    seqlens: tuple[int, ...], heads: tuple[tuple[int, int], ...], head_dim: int = 128
) -> list[Case]:
    top = max(seqlens)
    return [
        Case(VARLEN_SUITE, len(seqlens), top, top, h, hkv, head_dim, c, seqlens=seqlens)
        for h, hkv in heads
        for c in CAUSAL_FLAGS
    ]


def _decode(
    batches: tuple[int, ...], contexts: tuple[int, ...], block_sizes: tuple[int, ...]
) -> list[Case]:
    cases = []
    for batch in batches:
        for context in contexts:
            for block_size in block_sizes:
                case = Case(
                    DECODE_SUITE,
                    batch,
                    1,
                    context,
                    DECODE_HEADS,
                    DECODE_KV_HEADS,
                    DECODE_HEAD_DIM,
                    True,
                    block_size=block_size,
                )
                if kv_bytes(case) <= DECODE_MAX_KV_BYTES:
                    cases.append(case)
    return cases


def _masks(
    batch: int,
    seqlen: int,
    heads: tuple[int, int],
    head_dim: int,
    window_left: int,
    *,
    noncausal_softcap: bool = True,
    decode_batches: tuple[int, ...] = MASKS_DECODE_BATCHES,
    decode: tuple[int, int, int, int, int] = (
        MASKS_DECODE_CONTEXT,
        MASKS_DECODE_BLOCK_SIZE,
        DECODE_HEADS,
        DECODE_KV_HEADS,
        DECODE_HEAD_DIM,
    ),
    decode_window_left: int = MASKS_WINDOW_LEFT,
) -> list[Case]:
    """The masks suite: each masked case right after the plain case it is compared with.

    Dense (batch, seqlen, heads, head_dim): causal; causal with a (window_left, 0) window;
    causal with softcap; causal with sinks; then non-causal with and without softcap.
    Decode, per batch: one query against `decode` = (context, block size, heads, kv heads,
    head_dim), without and with a (decode_window_left, 0) window.
    """
    h, hkv = heads
    dims = (MASKS_SUITE, batch, seqlen, seqlen, h, hkv, head_dim)
    cases = [
        Case(*dims, True),
        Case(*dims, True, window=(window_left, 0)),
        Case(*dims, True, softcap=MASKS_SOFTCAP),
        Case(*dims, True, sinks=True),
    ]
    if noncausal_softcap:
        cases += [Case(*dims, False), Case(*dims, False, softcap=MASKS_SOFTCAP)]
    context, block_size, dh, dhkv, dd = decode
    for b in decode_batches:
        plain = Case(MASKS_SUITE, b, 1, context, dh, dhkv, dd, True, block_size=block_size)
        cases += [plain, dataclasses.replace(plain, window=(decode_window_left, 0))]
    return cases


def masks_check_rows(case: Case) -> tuple[tuple[int, int], ...] | None:
    """The query rows [start, stop) the masks suite checks against its float64 reference,
    or None for the whole output (decode rows, and problems of at most
    MASKS_FULL_CHECK_SCORES scores).

    Otherwise MASKS_CHECK_ROWS rows at the start (the causal edge, where rows see few keys),
    around the row where a window's left edge starts to hide keys (the middle without a
    window) and at the end (a full window), merged where they overlap. Each block is
    checked against the reference of its rows with the keys [0, stop + seqlen_k - seqlen_q)
    (bottom-right alignment puts them on the same diagonal), so the mask must hide every key
    right of the diagonal (causal, or a window's right size 0) or not depend on it (no
    window, non-causal).
    """
    scores = case.batch * case.num_heads * case.seqlen_q * case.seqlen_k
    if case.is_decode or scores <= MASKS_FULL_CHECK_SCORES:
        return None
    left, right = case.window
    if not (case.causal or right == 0 or case.window == NO_WINDOW):
        raise ValueError(
            f"{case.label()}: row blocks need a mask that hides every key right of the "
            "diagonal, or none"
        )
    n = min(MASKS_CHECK_ROWS, case.seqlen_q)
    middle = left + 1 if left >= 0 else case.seqlen_q // 2
    starts = sorted({0, min(max(middle - n // 2, 0), case.seqlen_q - n), case.seqlen_q - n})
    blocks: list[tuple[int, int]] = []
    for start in starts:
        if blocks and start <= blocks[-1][1]:
            blocks[-1] = (blocks[-1][0], max(blocks[-1][1], start + n))
        else:
            blocks.append((start, start + n))
    return tuple(blocks)


def _first_call() -> list[Case]:
    return [Case("first_call", 1, 512, 512, 16, 16, 128, False)]


def full_cases() -> list[Case]:
    """The whole plan, in run order (first_call first: its fresh processes start clean).

    Includes the opt-in xformers suite; `select` keeps the suites asked for.
    """
    return (
        _first_call()
        + _grid(GRID_SEQLENS, GRID_HEAD_DIMS)
        + _gqa()
        + _seqlen_qk()
        + _latency()
        + _varlen(varlen_seqlens(), VARLEN_HEADS)
        + _decode(DECODE_BATCHES, DECODE_CONTEXTS, DECODE_BLOCK_SIZES)
        + _xformers(4, 2048, (1024, 4096), 16, 128, varlen_seqlens())
        + _masks_full()
        + _head_dims()
    )


def _masks_full() -> list[Case]:
    heads = GRID_HIDDEN // MASKS_HEAD_DIM
    batch = GRID_TOKENS // MASKS_SEQLEN
    return _masks(batch, MASKS_SEQLEN, (heads, heads), MASKS_HEAD_DIM, MASKS_WINDOW_LEFT)


def quick_cases() -> list[Case]:
    """A few shapes touching every suite and code path, for smoke tests."""
    return (
        _first_call()
        + _grid((1024, 4096), GRID_HEAD_DIMS)
        + _gqa()[1:]
        + _seqlen_qk()[1:]
        + _latency()[:1]
        + _varlen(varlen_seqlens(), VARLEN_HEADS)[1:2]
        + _decode((8,), (4096,), DECODE_BLOCK_SIZES)
        + _xformers(4, 2048, (1024, 4096), 16, 128, varlen_seqlens())
        # S = 4k (B4: 16k tokens), a (1024, 0) window (a quarter of S, as 4096 of 16k);
        # causal rows only, decode at batch 8.
        + _masks(4, 4096, (16, 16), 128, 1024, noncausal_softcap=False, decode_batches=(8,))
    )


def dry_run_cases() -> list[Case]:
    """Tiny CPU-sized problems covering every suite (for `--dry-run` with fake providers)."""
    cases = [Case("first_call", 1, 32, 32, 2, 2, 64, False)]
    for causal in CAUSAL_FLAGS:
        for seqlen in (64, 128):
            cases.append(Case("grid", 2, seqlen, seqlen, 2, 2, 64, causal))
    cases.append(Case("gqa", 1, 64, 64, 4, 2, 64, True))
    cases += [Case("seqlen_qk", 1, 32, 96, 2, 2, 64, c) for c in CAUSAL_FLAGS]
    cases.append(Case("latency", 1, 32, 32, 2, 2, 64, False))
    # One long, one very short, lengths off any tile size.
    cases += _varlen((37, 5, 64, 18, 12), ((2, 2), (4, 2)), head_dim=32)
    cases += [
        Case(DECODE_SUITE, 3, 1, 64, 4, 2, 32, True, block_size=b) for b in DECODE_BLOCK_SIZES
    ]
    # Block-diagonal: the varlen lengths; padded / paged keys after 20 cached tokens (kv up
    # to 84, 96 slots = 6 pages of 16 per sequence). Local biases: window_size 16 (a quarter
    # of S), a band of 8 keys a side.
    cases += _xformers(
        2, 64, (32, 96), 2, 64, (37, 5, 64, 18, 12), context=20, window_size=16, band=(8, 8)
    )
    # GQA, a (24, 0) window; decode over 64 keys in pages of 16 with a (20, 0) window (2 of
    # the 4 pages).
    cases += _masks(
        2, 80, (4, 2), 32, 24, decode_batches=(3,), decode=(64, 16, 4, 2, 32), decode_window_left=20
    )
    cases += [Case(HEAD_DIMS_SUITE, 2, 64, 64, 2, 2, d, True) for d in HEAD_DIMS_GRID]
    cases.append(Case(HEAD_DIMS_SUITE, 2, 64, 64, 2, 2, 192, True, head_dim_v=128))
    cases.append(Case(HEAD_DIMS_SUITE, 2, 1, 64, 4, 2, 192, True, block_size=16, head_dim_v=128))
    return cases


def select(cases: list[Case], suites: tuple[str, ...]) -> list[Case]:
    """Keep the cases of the given suites, in plan order."""
    return [c for c in cases if c.suite in suites]


def providers_for(case: Case, providers: tuple[str, ...]) -> tuple[str, ...]:
    """Providers measured on `case` (first_call times sparsek alone; sparsek_xformers and
    the xformers suite go only together, and never with fa4; the masks suite takes
    sparsek, fa4 and fa3; fa3 plays there and in the head_dims suite only)."""
    if case.suite in SPARSEK_ONLY_SUITES:
        return tuple(p for p in providers if p == "sparsek")
    if case.suite == MASKS_SUITE:
        return tuple(p for p in providers if p in MASKS_PROVIDERS)
    if case.suite == XFORMERS_SUITE:
        return tuple(p for p in providers if p not in ("fa4", FA3_PROVIDER))
    if case.suite == HEAD_DIMS_SUITE:
        return tuple(p for p in providers if p != XFORMERS_PROVIDER)
    return tuple(p for p in providers if p not in (XFORMERS_PROVIDER, FA3_PROVIDER))


def default_providers(suites: tuple[str, ...]) -> tuple[str, ...]:
    """Providers when --providers is not given: the xformers set if that suite is asked for,
    else the defaults; fa3 added when the masks or head_dims suite is asked for."""
    chosen = XFORMERS_SUITE_PROVIDERS if XFORMERS_SUITE in suites else PROVIDERS
    with_fa3 = MASKS_SUITE in suites or HEAD_DIMS_SUITE in suites
    return (*chosen, FA3_PROVIDER) if with_fa3 else chosen


def conflict(suites: tuple[str, ...], providers: tuple[str, ...]) -> str | None:
    """Why these suites and providers cannot run in one invocation (None when they can)."""
    if XFORMERS_SUITE in suites and "fa4" in providers:
        return (
            "the xformers suite cannot run in the same invocation as provider fa4: xFormers "
            "and FlashAttention-4 cannot be imported in one process (FA4 installs the "
            "`flash_attn` package, which xFormers mistakes for FlashAttention-2). Run fa4 and "
            "the xformers suite in separate invocations, e.g. --suites xformers --providers "
            + ",".join(XFORMERS_SUITE_PROVIDERS)
        )
    return None
