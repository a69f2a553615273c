"""Seeded random configurations for the GPU fuzz (`tests/gpu/test_fuzz_gpu.py`), drawn over
what the registry serves, and the kernel pool they run on.

A `FuzzConfig` is plain data (no tensors): one call of a public entry point (the path:
"dense" `sparsek.attention` / the SDPA drop-in, "varlen" `sparsek.attention_varlen`,
"kvcache" `sparsek.attention_with_kvcache` over a contiguous or paged cache) with its
dtype, head dim, mask, head counts, per-sequence lengths, memory layout of the inputs and
the path's own knobs. Its repr is complete: `tests/fuzz_cases.run_config(config, device)`
reproduces it, and so does `SPARSEK_FUZZ_ONLY=<index>` with the same seed and count.

What is drawn from the registry at run time, never listed here: the dtypes
(`registry.DTYPES`), head dims (`registry.registered_head_dims(arch)`), masks
(`registry.MASKS`, each as the public API's `causal` flag) and paged block sizes (those of
`registry.PRECOMPILED`, so every kernel a config needs is in the precompiled pool,
`registry.registered_kernels(arch)`). A new head dim or dtype joins the fuzz by being
registered; a new mask makes `registry_axes` raise until the fuzz can express it.

`generate(seed, count, axes)`: first one config per (variant x cache kind x dtype x head
dim x mask), shuffled (the coverage block, `coverage_plan`), then random draws, all from one
`random.Random(seed)`: the same seed and count give the same list on every machine. Shapes
are small (sequences up to ~1-2k, one long-query shape of ~4k) and the float64 reference's
work is capped (`MAX_SEQ_WORK`, `MAX_WORK`).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cutedsl_kernels.config import DENSE, PACKED, KernelConfig, Layout
from sparsek import cache, registry

SEED_ENV = "SPARSEK_FUZZ_SEED"
COUNT_ENV = "SPARSEK_FUZZ_CONFIGS"
ONLY_ENV = "SPARSEK_FUZZ_ONLY"  # comma-separated config indexes: run just those
REPORT_ENV = "SPARSEK_FUZZ_REPORT"  # a file path: the summary is written there too
JOBS_ENV = "SPARSEK_FUZZ_JOBS"  # processes that precompile the kernel pool (0: none)
DEFAULT_SEED = 20261207
DEFAULT_COUNT = 600

PATHS = ("dense", "varlen", "kvcache")
# Named shape classes, each on one path. The kv* variants are drawn for every cache kind.
VARIANTS: dict[str, str] = {
    "dense": "dense",
    "dense_sdpa": "dense",  # the SDPA drop-in: (B, H, S, D), top-left causal, no LSE
    "dense_decode": "dense",  # one query per sequence: planned as KV-cache decode
    "dense_long": "dense",  # >= tuning.LONG_SEQLEN_Q causal queries: the LONG_Q kernels
    "varlen": "varlen",
    "varlen_nan": "varlen",  # NaN in q/k/v rows past cu_seqlens[-1] (serving engines' empty)
    "kv_batched": "kvcache",  # 4-D q, several new queries per sequence
    "kv_packed": "kvcache",  # packed q with cu_seqlens_q (chunked prefill)
    "kv_decode": "kvcache",  # 4-D q, one query per sequence
    "kv_decode_wide": "kvcache",  # decode with more (sequence, KV head) tiles than SMs
    "kv_packed_decode": "kvcache",  # packed q, max_seqlen_q 1, some sequences without a query
    "kv_split": "kvcache",  # num_splits > 1
}
# Random draws after the coverage block: each variant's weight.
WEIGHTS: dict[str, float] = {
    "dense": 18, "dense_sdpa": 5, "dense_decode": 5, "dense_long": 1,
    "varlen": 16, "varlen_nan": 8,
    "kv_batched": 8, "kv_packed": 14, "kv_decode": 8, "kv_decode_wide": 3,
    "kv_packed_decode": 5, "kv_split": 9,
}  # fmt: skip
# Memory layouts of the inputs (`fuzz_cases.place`); "packed": q/k/v as views of one
# tensor split along heads (dense, varlen), K/V as halves of one cache tensor (kvcache).
VIEWS = ("contiguous", "transposed", "padded_heads", "padded_dim", "misaligned", "packed")
# (num_heads, num_kv_heads): MHA, GQA 2:1 to 8:1, MQA.
HEADS = (
    (1, 1), (2, 2), (4, 4), (8, 8), (2, 1), (4, 1), (8, 1),
    (4, 2), (6, 2), (8, 2), (12, 4), (16, 2), (32, 8),
)  # fmt: skip
# Lengths at tile edges (16-row MMA steps, 64/128/192-row query tiles, 128-row key tiles).
EDGE_LENS = (1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257)
PAD_ROWS = (1, 2, 3, 7, 8, 64, 127, 128, 200)
# Score elements (heads x sq x sk) of one sequence and of one config: the float64
# reference materializes them (8 bytes each, scores and probabilities).
MAX_SEQ_WORK = 1 << 27
MAX_WORK = 1 << 28


@dataclass(frozen=True)
class Axes:
    """What the registry serves on one architecture (see `registry_axes`)."""

    arch: str
    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...]
    masks: tuple[str, ...]  # `MaskSpec.name` of each registered mask
    page_sizes: tuple[int, ...]  # paged block sizes with precompiled kernels

    @property
    def caches(self) -> tuple[str, ...]:
        """The cache kinds a kvcache config may draw: contiguous, then paged<size>."""
        return ("contiguous", *(f"paged{p}" for p in self.page_sizes))


def registry_axes(arch: str) -> Axes:
    """The registry's dtypes, head dims, masks and precompiled page sizes for `arch`.

    Raises:
        NotImplementedError: a registered mask is not one the public API expresses with
            its `causal` flag: the fuzz (calls and oracle) has to learn it first.
    """
    for mask in registry.MASKS:
        if mask != registry.mask_of(mask.causal):
            raise NotImplementedError(
                f"registry.MASKS has mask={mask.name}, which the fuzz cannot express (it "
                "calls the public API, which takes `causal` only): teach tests/fuzz_cases.py "
                "(the call and the oracle) the new mask"
            )
    page_sizes = {layout.page_size for layout, _ in registry.PRECOMPILED if layout.page_size}
    return Axes(
        arch=arch,
        dtypes=tuple(registry.DTYPES),
        head_dims=tuple(registry.registered_head_dims(arch)),
        masks=tuple(mask.name for mask in registry.MASKS),
        page_sizes=tuple(sorted(page_sizes)),
    )


def is_causal(mask: str) -> bool:
    """The public API's `causal` flag of a registered mask name."""
    for spec in registry.MASKS:
        if spec.name == mask:
            return spec.causal
    raise ValueError(f"mask={mask} is not registered ({[m.name for m in registry.MASKS]})")


@dataclass(frozen=True)
class FuzzConfig:
    """One fuzz case (see the module docstring); plain data, complete in its repr.

    Sequences: q_lens[b] new queries and k_lens[b] keys (dense: all equal; kvcache: k_lens
    are `cache_seqlens`, the new queries included). Packed layouts have `pad_q` / `pad_k`
    rows past the last sequence (NaN when `nan_padding`, else random); caches have unused
    slots, spare blocks and block-table columns (NaN when `nan_padding`, else large random
    keys that would dominate a row that read them).
    """

    index: int
    variant: str
    dtype: str
    head_dim: int
    mask: str
    heads: tuple[int, int]  # (num_heads, num_kv_heads)
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    seed: int  # of the tensor values and the block permutation
    views: str = "contiguous"
    scale: float | None = None  # softmax_scale; None: 1/sqrt(head_dim)
    pad_q: int = 0
    pad_k: int = 0
    nan_padding: bool = False
    max_seqlen_slack: int = 0  # packed q/k: max_seqlen = longest + this
    cache: str = ""  # kvcache: "contiguous" or "paged<block_size>"
    capacity_slack: int = 0  # contiguous: slots past the longest; paged: spare table columns
    spare_blocks: int = 0  # paged: blocks no sequence uses
    packed_q: bool = False  # kvcache: q (total_q, H, D) with cu_seqlens_q
    num_splits: int = 0

    @property
    def path(self) -> str:
        return VARIANTS[self.variant]

    @property
    def causal(self) -> bool:
        return is_causal(self.mask)

    @property
    def batch(self) -> int:
        return len(self.q_lens)

    @property
    def page_size(self) -> int:
        return int(self.cache.removeprefix("paged")) if self.cache.startswith("paged") else 0

    @property
    def max_seqlen_q(self) -> int:
        """The `max_seqlen_q` argument of a packed q."""
        if self.variant == "kv_packed_decode":
            return 1
        return max(self.q_lens, default=0) + self.max_seqlen_slack

    @property
    def max_seqlen_k(self) -> int:
        return max(self.k_lens, default=0) + self.max_seqlen_slack

    def layout(self) -> Layout:
        """The registry layout of the request's kernel identity (unsplit)."""
        if self.path == "dense":
            return DENSE
        if self.path == "varlen":
            return PACKED
        kv_layout = "paged" if self.page_size else "cache"
        return Layout(self.packed_q, kv_layout, self.page_size)

    def work(self) -> list[int]:
        """Score elements of each sequence (heads x sq x sk)."""
        return [self.heads[0] * sq * sk for sq, sk in zip(self.q_lens, self.k_lens, strict=True)]

    def features(self) -> set[str]:
        """Tags of what this config exercises (the coverage the CPU test counts)."""
        h, hkv = self.heads
        lens = (*self.q_lens, *self.k_lens)
        tags = {
            self.path, f"variant:{self.variant}", f"dtype:{self.dtype}", f"d{self.head_dim}",
            f"mask:{self.mask}", f"views:{self.views}", "mha" if h == hkv else "gqa",
        }  # fmt: skip
        tags |= {"mqa"} if hkv == 1 and h > 1 else set()
        tags |= {"zero_len"} if 0 in lens else set()
        tags |= {"odd_len"} if any(n % 2 and n > 1 for n in lens) else set()
        tags |= {"sq!=sk"} if self.q_lens != self.k_lens else set()
        tags |= {"pad_q"} if self.pad_q else set()
        tags |= {"pad_k"} if self.pad_k else set()
        tags |= {"nan_padding"} if self.nan_padding else set()
        tags |= {"custom_scale"} if self.scale is not None else set()
        if self.path == "kvcache":
            tags.add(f"cache:{self.cache}")
            tags.add("packed_q" if self.packed_q else "batched_q")
            tags.add({0: "splits:auto", 1: "splits:none"}.get(self.num_splits, "splits:n"))
        if self.path == "varlen" and self.nan_padding and self.pad_k:
            tags.add("nan_kv_padding")  # known bug (b)
        if self.variant == "kv_packed_decode" and 0 in self.q_lens:
            tags.add("packed_decode_empty_seq")  # known bug (a)
        return tags


# ---------------------------------------------------------------------------- generation


def coverage_plan(axes: Axes) -> list[tuple[str, str, str, int, str]]:
    """(variant, cache kind, dtype, head dim, mask): every combination once (cache kind ""
    for the dense and varlen variants)."""
    return [
        (variant, cache_kind, dtype, head_dim, mask)
        for variant, path in VARIANTS.items()
        for cache_kind in (axes.caches if path == "kvcache" else ("",))
        for dtype in axes.dtypes
        for head_dim in axes.head_dims
        for mask in axes.masks
    ]


def generate(seed: int, count: int, axes: Axes) -> list[FuzzConfig]:
    """`count` configs (see the module docstring): the coverage block first (shuffled, so a
    shorter run is still a random sample of it), then weighted random variants."""
    rng = random.Random(seed)
    plan = coverage_plan(axes)
    rng.shuffle(plan)
    configs: list[FuzzConfig] = []
    for variant, cache_kind, dtype, head_dim, mask in plan[:count]:
        configs.append(draw(rng, axes, len(configs), variant, dtype, head_dim, mask, cache_kind))
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    while len(configs) < count:
        variant = rng.choices(names, weights)[0]
        dtype, head_dim = rng.choice(axes.dtypes), rng.choice(axes.head_dims)
        mask = rng.choice(axes.masks)
        cache_kind = rng.choice(axes.caches) if VARIANTS[variant] == "kvcache" else ""
        configs.append(draw(rng, axes, len(configs), variant, dtype, head_dim, mask, cache_kind))
    return configs


def draw(
    rng: random.Random,
    axes: Axes,
    index: int,
    variant: str,
    dtype: str,
    head_dim: int,
    mask: str,
    cache_kind: str = "",
) -> FuzzConfig:
    """One config of `variant` with the given identity and random shapes."""
    config = FuzzConfig(
        index=index,
        variant=variant,
        dtype=dtype,
        head_dim=head_dim,
        mask=mask,
        heads=rng.choice(HEADS),
        q_lens=(),
        k_lens=(),
        seed=rng.randrange(1 << 31),
        scale=rng.choice((0.02, 0.08, 0.3)) if rng.random() < 0.15 else None,
    )
    path = VARIANTS[variant]
    if path == "dense":
        config = draw_dense(rng, config)
    elif path == "varlen":
        config = draw_varlen(rng, config)
    else:
        config = draw_kvcache(rng, replace(config, cache=cache_kind))
    return fit(config)


def draw_len(rng: random.Random, longest: int, zero: float = 0.0) -> int:
    """A sequence length: 0 with probability `zero`, else a tile edge or uniform in
    [1, longest]."""
    r = rng.random()
    if r < zero:
        return 0
    if r < zero + 0.35:
        return rng.choice([n for n in EDGE_LENS if n <= longest])
    return rng.randint(1, longest)


def draw_pad(rng: random.Random, force: bool = False) -> int:
    """Rows past the last sequence of a packed tensor (0 about half the time unless forced)."""
    return rng.choice(PAD_ROWS) if force or rng.random() < 0.5 else 0


def draw_views(rng: random.Random, packed_ok: bool) -> str:
    views = [v for v in VIEWS if packed_ok or v != "packed"]
    return "contiguous" if rng.random() < 0.3 else rng.choice(views)


def draw_dense(rng: random.Random, config: FuzzConfig) -> FuzzConfig:
    batch = rng.randint(1, 4)
    variant, heads = config.variant, config.heads
    if variant == "dense_long":
        # One CTA wave fits b * h * ceil(sq / 64) <= SMs tiles: 4 heads of 4k+ queries do
        # not on any Hopper part, so the LONG_Q workload (not ONE_WAVE) is planned.
        batch, heads = 1, rng.choice(((4, 1), (4, 2), (4, 4)))
        sq = rng.randint(4096, 4111)
        sk = sq + rng.randint(-64, 16)
    elif variant == "dense_decode":
        batch, sq, sk = rng.randint(1, 8), 1, draw_len(rng, 2048)
    else:
        sq = draw_len(rng, 1100)
        sk = sq if rng.random() < 0.3 else draw_len(rng, 1100, zero=0.03)
    return replace(
        config,
        heads=heads,
        q_lens=(sq,) * batch,
        k_lens=(sk,) * batch,
        views=draw_views(rng, packed_ok=sq == sk),
    )


def draw_varlen(rng: random.Random, config: FuzzConfig) -> FuzzConfig:
    count = rng.randint(1, 10)
    q_lens = tuple(draw_len(rng, 1000, zero=0.15) for _ in range(count))
    same = rng.random() < 0.5
    k_lens = q_lens if same else tuple(draw_len(rng, 1000, zero=0.15) for _ in range(count))
    forced = config.variant == "varlen_nan"
    pad_q, pad_k = draw_pad(rng, forced), draw_pad(rng, forced)
    views = draw_views(rng, packed_ok=same)
    if views == "packed":  # q, k, v split from one (total, H + 2 Hkv, D) tensor
        pad_k = pad_q
    return replace(
        config,
        q_lens=q_lens,
        k_lens=k_lens,
        pad_q=pad_q,
        pad_k=pad_k,
        nan_padding=forced or rng.random() < 0.3,
        max_seqlen_slack=rng.choice((0,) * 8 + (1, 37)),
        views=views,
    )


def draw_kvcache(rng: random.Random, config: FuzzConfig) -> FuzzConfig:
    variant, heads = config.variant, config.heads
    count, longest = rng.randint(1, 8), 1500
    if variant == "kv_decode_wide":
        # >= 40 sequences x 4+ KV heads: more one-query tiles than the SMs of any Hopper part.
        count, longest, heads = rng.randint(40, 64), 300, rng.choice(((8, 4), (16, 4), (32, 8)))
    elif variant == "kv_packed_decode":
        count = rng.randint(2, 8)
    k_lens = tuple(draw_len(rng, longest, zero=0.1) for _ in range(count))
    packed_q = variant in ("kv_packed", "kv_packed_decode") or (
        variant == "kv_split" and rng.random() < 0.5
    )
    pad_q = 0
    if variant == "kv_packed_decode":  # known bug (a): an empty sequence among one-query ones
        q_lens = tuple(rng.choice((0, 1)) for _ in range(count))
        if 0 not in q_lens:
            q_lens = (0, *q_lens[1:])
        # total_q == batch (padding filling the empty sequences' rows) is what a batched
        # decode looks like from the shapes alone; fewer rows, or more, also occur.
        pad_q = rng.choice((count - sum(q_lens), count - sum(q_lens), 0, 3))
    elif packed_q:
        q_lens = tuple(
            min(draw_len(rng, 256, zero=0.15), n) if rng.random() < 0.9 else draw_len(rng, 64)
            for n in k_lens
        )
        pad_q = draw_pad(rng)
    else:
        single = variant in ("kv_decode", "kv_decode_wide")
        seqlen_q = 1 if single else rng.choice((1, 2, 3, 4, 5, 8, 16, 17, 64, 100))
        q_lens = (seqlen_q,) * count
    if variant == "kv_split":
        num_splits = rng.choice((2, 3, 4, 7, 16, 37))
    elif variant == "kv_decode_wide":
        num_splits = rng.choice((0, 1))
    else:
        num_splits = rng.choice((0, 0, 0, 1, 1, 2, 3, 4, 8))
    paged = config.cache.startswith("paged")
    return replace(
        config,
        heads=heads,
        q_lens=q_lens,
        k_lens=k_lens,
        pad_q=pad_q,
        nan_padding=rng.random() < 0.5,
        max_seqlen_slack=rng.choice((0,) * 8 + (1, 5)) if variant != "kv_packed_decode" else 0,
        capacity_slack=rng.choice((0, 0, 1, 2)) if paged else rng.choice((0, 0, 1, 5, 64)),
        spare_blocks=rng.randint(1, 4) if paged else 0,
        packed_q=packed_q,
        num_splits=num_splits,
        views=draw_views(rng, packed_ok=True),
    )


def fit(config: FuzzConfig) -> FuzzConfig:
    """`config` with lengths halved until the reference's work fits the caps (lengths 0
    and 1 kept)."""
    while max(config.work(), default=0) > MAX_SEQ_WORK or sum(config.work()) > MAX_WORK:
        q_lens = tuple(n if n <= 1 else n // 2 for n in config.q_lens)
        k_lens = tuple(n if n <= 1 else n // 2 for n in config.k_lens)
        config = replace(config, q_lens=q_lens, k_lens=k_lens)
    return config


# ---------------------------------------------------------------------------- from the environment


def env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    return int(text, 0) if text else default


def configs_from_env(axes: Axes) -> tuple[int, list[FuzzConfig]]:
    """(seed, configs) as the environment asks: `SPARSEK_FUZZ_SEED`, `SPARSEK_FUZZ_CONFIGS`,
    and `SPARSEK_FUZZ_ONLY` (indexes to keep)."""
    seed = env_int(SEED_ENV, DEFAULT_SEED)
    configs = generate(seed, env_int(COUNT_ENV, DEFAULT_COUNT), axes)
    only = os.environ.get(ONLY_ENV, "").strip()
    if only:
        keep = {int(i) for i in only.split(",") if i.strip()}
        configs = [c for c in configs if c.index in keep]
    return seed, configs


# ---------------------------------------------------------------------------- the kernel pool


def kernel_pool(arch: str) -> list[KernelConfig]:
    """Every kernel the configs can need: the registry's precompiled set for `arch` (page
    sizes are drawn from it, so no config needs a kernel outside it)."""
    return registry.registered_kernels(arch)


@dataclass(frozen=True)
class PoolReport:
    kernels: int
    jobs: int
    seconds: float
    failures: tuple[str, ...]  # "<kernel name>: <error>"

    def line(self) -> str:
        if not self.jobs:
            return f"kernel pool: not precompiled ({JOBS_ENV}=0): kernels compile at first use"
        failed = f", {len(self.failures)} failed" if self.failures else ""
        return (
            f"kernel pool: {self.kernels} kernels ready in {self.seconds:.0f} s "
            f"({self.jobs} processes{failed})"
        )


def precompile(kernels: Sequence[KernelConfig], jobs: int) -> PoolReport:
    """Compile `kernels` into the disk cache (`SPARSEK_CACHE_DIR`) with `jobs` processes, so
    that each loads in ~60 ms at first use instead of compiling (2-3 s each; the pool has
    ~170). A kernel that fails here is reported and compiles (or fails) again at first use.
    `jobs` 0: nothing is precompiled (a rerun of a few configs compiles only theirs).
    """
    jobs = min(jobs, len(kernels))
    if jobs <= 0:
        return PoolReport(0, 0, 0.0, ())
    start = time.perf_counter()
    failures: list[str] = []
    if jobs == 1:
        for kernel in kernels:
            try:
                cache.compile_into_cache(kernel)
            except Exception as exc:  # reported, not raised: the run goes on
                failures.append(f"{kernel.name}: {type(exc).__name__}: {exc}")
    else:
        # spawn: the workers import the DSL afresh (a fork of a process that has loaded
        # CUDA is unsafe); they inherit the environment, so the same cache directory.
        context = multiprocessing.get_context("spawn")
        try:
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
                futures = {pool.submit(cache.compile_into_cache, k): k for k in kernels}
                for future in concurrent.futures.as_completed(futures):
                    error = future.exception()
                    if error is not None:
                        name = futures[future].name
                        failures.append(f"{name}: {type(error).__name__}: {error}")
        except Exception as exc:  # no pool: every kernel compiles at first use instead
            failures.append(f"the process pool: {type(exc).__name__}: {exc}")
    return PoolReport(len(kernels), jobs, time.perf_counter() - start, tuple(failures))


def default_jobs() -> int:
    """`SPARSEK_FUZZ_JOBS` (0: no precompile), else one process per CPU up to 16."""
    return env_int(JOBS_ENV, min(os.cpu_count() or 1, 16))
