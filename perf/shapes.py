"""The benchmark grid: which attention problems are measured, and how each is measured.

Every problem is a `Case`. Its `suite` decides the measurement kinds:

    grid, gqa, seqlen_qk -> "kernel"   device time of one call (CUDA events, cold L2)
    latency              -> "eager"    wall time per call of back-to-back calls (host included)
                            "graph"    wall time per replay of a CUDA graph of one call
    first_call           -> "cold_first_call", "warm_first_call" (fresh processes, sparsek only)
    xformers             -> "kernel"   one row per xFormers bias type (opt-in, see below)

The `xformers` suite is not run by default: it times `sparsek_xformers` (sparsek's xFormers
operator), and xFormers cannot be imported in a process that has FlashAttention-4 installed
(FA4 takes the `flash_attn` name, which xFormers mistakes for FlashAttention-2). It must be
asked for with `--suites xformers` and is refused together with provider `fa4`.

This module imports nothing heavy (no torch) so `bench_fmha.py --list` runs anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

# Default providers and suites (what a plain `bench_fmha.py` run measures).
PROVIDERS: tuple[str, ...] = ("sparsek", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "fa4")
SUITES: tuple[str, ...] = ("first_call", "grid", "gqa", "seqlen_qk", "latency")
# Opt-in: named explicitly with --providers / --suites, never part of the defaults.
XFORMERS_SUITE = "xformers"
XFORMERS_PROVIDER = "sparsek_xformers"
OPT_IN_PROVIDERS: tuple[str, ...] = (XFORMERS_PROVIDER,)
OPT_IN_SUITES: tuple[str, ...] = (XFORMERS_SUITE,)
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
    XFORMERS_SUITE: ("kernel",),
}
# Suites whose rows exist for sparsek only (they time sparsek's compile cache).
SPARSEK_ONLY_SUITES: frozenset[str] = frozenset({"first_call"})

# xFormers bias types the xformers suite times (the ones SparseKAttention supports), by the
# name written in the CSV's `bias` column. "None" is attn_bias=None (no mask).
BIAS_NONE = "None"
BIAS_TOP_LEFT = "LowerTriangularMask"  # causal, query i sees keys j <= i
BIAS_BOTTOM_RIGHT = "LowerTriangularFromBottomRightMask"  # j <= i + seqlen_k - seqlen_q
XFORMERS_BIASES: tuple[str, ...] = (BIAS_NONE, BIAS_TOP_LEFT, BIAS_BOTTOM_RIGHT)

# The main grid keeps the work per launch comparable: batch * seqlen = 16k tokens and
# num_heads * head_dim = 2048 (FlashAttention's benchmark convention).
GRID_TOKENS = 16 * 1024
GRID_HIDDEN = 2048
GRID_SEQLENS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
GRID_HEAD_DIMS: tuple[int, ...] = (64, 128)
CAUSAL_FLAGS: tuple[bool, ...] = (False, True)


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

    def __post_init__(self) -> None:
        if not self.bias:
            return
        if self.bias not in XFORMERS_BIASES:
            raise ValueError(f"unknown bias {self.bias!r}; known: {', '.join(XFORMERS_BIASES)}")
        if self.causal != (self.bias != BIAS_NONE):
            raise ValueError(f"bias {self.bias} does not match causal={self.causal}")
        if self.bias == BIAS_TOP_LEFT and self.seqlen_q != self.seqlen_k:
            # The reference and every peer are bottom-right causal; they agree with the
            # top-left mask only when seqlen_q == seqlen_k.
            raise ValueError("LowerTriangularMask (top-left) rows need seqlen_q == seqlen_k")

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS_BY_SUITE[self.suite]

    def label(self) -> str:
        seq = f"S{self.seqlen_q}"
        if self.seqlen_q != self.seqlen_k:
            seq = f"Sq{self.seqlen_q}/Sk{self.seqlen_k}"
        heads = f"H{self.num_heads}"
        if self.num_kv_heads != self.num_heads:
            heads += f"/Hkv{self.num_kv_heads}"
        mask = "causal" if self.causal else "full"
        if self.bias:
            mask = f"bias={self.bias}"
        return f"{self.suite} B{self.batch} {seq} {heads} d{self.head_dim} {mask}"


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> float:
    """Number of (query, key) pairs attended to per (batch, head).

    Causal with seqlen_q == seqlen_k counts half the square (the usual convention); causal with
    seqlen_q != seqlen_k counts the exact pairs of the bottom-right aligned mask: query i sees
    keys j <= i + seqlen_k - seqlen_q.
    """
    if not causal:
        return float(seqlen_q * seqlen_k)
    if seqlen_q == seqlen_k:
        return seqlen_q * seqlen_k / 2.0
    offset = seqlen_k - seqlen_q
    return float(sum(min(max(i + offset + 1, 0), seqlen_k) for i in range(seqlen_q)))


def flops(case: Case) -> float:
    """Forward FLOPs: two matmuls (QK^T and PV) of 2 * head_dim FLOPs per visible pair."""
    pairs = visible_pairs(case.seqlen_q, case.seqlen_k, case.causal)
    return 4.0 * case.batch * case.num_heads * case.head_dim * pairs


def _grid(seqlens: tuple[int, ...], head_dims: tuple[int, ...]) -> list[Case]:
    cases = []
    for head_dim in head_dims:
        heads = GRID_HIDDEN // head_dim
        for causal in CAUSAL_FLAGS:
            for seqlen in seqlens:
                batch = GRID_TOKENS // seqlen
                cases.append(Case("grid", batch, seqlen, seqlen, heads, heads, head_dim, causal))
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
    batch: int, seqlen: int, seqlen_qk: tuple[int, int], heads: int, head_dim: int
) -> list[Case]:
    """One row per supported xFormers bias at Sq = Sk, plus bottom-right causal at Sq < Sk."""
    cases = [
        Case(XFORMERS_SUITE, batch, seqlen, seqlen, heads, heads, head_dim, b != BIAS_NONE, b)
        for b in XFORMERS_BIASES
    ]
    seqlen_q, seqlen_k = seqlen_qk
    bottom_right = Case(
        XFORMERS_SUITE, batch, seqlen_q, seqlen_k, heads, heads, head_dim, True, BIAS_BOTTOM_RIGHT
    )
    return [*cases, bottom_right]


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
        + _xformers(4, 2048, (1024, 4096), 16, 128)
    )


def quick_cases() -> list[Case]:
    """A few shapes touching every suite and code path, for smoke tests."""
    return (
        _first_call()
        + _grid((1024, 4096), GRID_HEAD_DIMS)
        + _gqa()[1:]
        + _seqlen_qk()[1:]
        + _latency()[:1]
        + _xformers(4, 2048, (1024, 4096), 16, 128)
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
    cases += _xformers(2, 64, (32, 96), 2, 64)
    return cases


def select(cases: list[Case], suites: tuple[str, ...]) -> list[Case]:
    """Keep the cases of the given suites, in plan order."""
    return [c for c in cases if c.suite in suites]


def providers_for(case: Case, providers: tuple[str, ...]) -> tuple[str, ...]:
    """Providers measured on `case` (first_call times sparsek alone; sparsek_xformers and
    the xformers suite go only together, and never with fa4)."""
    if case.suite in SPARSEK_ONLY_SUITES:
        return tuple(p for p in providers if p == "sparsek")
    if case.suite == XFORMERS_SUITE:
        return tuple(p for p in providers if p != "fa4")
    return tuple(p for p in providers if p != XFORMERS_PROVIDER)


def default_providers(suites: tuple[str, ...]) -> tuple[str, ...]:
    """Providers when --providers is not given: the xformers set if that suite is asked for."""
    return XFORMERS_SUITE_PROVIDERS if XFORMERS_SUITE in suites else PROVIDERS


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
