"""Seeded random configurations for the GPU fuzz (`tests/gpu/test_fuzz_gpu.py`), drawn over
what the registry serves, and the kernel pool they run on.

A `FuzzConfig` is plain data (no tensors): one call of a public entry point (the path:
"dense" `sparsek.attention` / the SDPA drop-in, "varlen" `sparsek.attention_varlen`,
"kvcache" `sparsek.attention_with_kvcache` over a contiguous or paged cache) with its
dtype, head dim, mask and the mask's call arguments (`causal`, `window_size`, `softcap`,
the sinks' distribution), head counts, per-sequence lengths, memory layout of the inputs
and the path's own knobs. Its repr is complete: `tests/fuzz_cases.run_config(config,
device)` reproduces it, and so does `SPARSEK_FUZZ_ONLY=<index>` with the same seed and
count.

What is drawn from the registry at run time, never listed here: the dtypes
(`registry.DTYPES`), head dims (`registry.registered_head_dims(arch)`), masks (every one of
`registry.SERVED_MASKS`; the SDPA drop-in only those its `is_causal` expresses) and paged
block sizes (those of `registry.PRECOMPILED`). A new head dim or dtype joins the fuzz by
being registered; a served mask that the public API's four mask arguments cannot express
makes `registry_axes` raise until the fuzz learns it.

Masks: each config names the kernels' `MaskSpec` (`mask`, e.g. "window+sinks") and the
arguments of the call that asks for it, drawn to reach the edges (`draw_mask_args`):
windows of 0, 1, a few keys, about a tile (63..257), within or past the sequence, causal
(right folded to 0, sometimes given anyway), left-only, right-only or two-sided; the
causal mask sometimes as `window_size=(-1, 0)` or with a window whose right side causal
folds away; softcaps from strong (1-5) to mild (30-50); sink logits `loc + spread * N(0,
1)` per head, from near zero to large enough to dominate a row's keys.

`generate(seed, count, axes)`: first the coverage block (`coverage_plan`): every served
mask, no mask and causal included, on every path with every (dtype, head dim) pair and on
every variant and cache kind that takes it, shuffled; then random draws, half of them with
a mask beyond causal (79% of the default run's configs have a window, softcap or sinks: ten
of the twelve masks have one); all from one `random.Random(seed)`: the same seed and count
give the same list on every machine. Shapes are small (sequences up to
~1-2k, one long-query shape of ~4k) and the float64 reference's work is capped
(`MAX_SEQ_WORK`, `MAX_WORK`).

The kernel pool (`kernel_pool`) is what the configs launch on the GPU at hand: of each
drawn mask's kernels (`registry.mask_kernels(arch, mask)`), those that the configs' paths,
head dims, dtypes, cache kinds and shapes pick on its SM count (workloads and split
factors as the launch paths choose them), compiled before the first config runs so that
none compiles inside the run (~900 kernels for the default run on a 132-SM H100/H200).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from cutedsl_kernels.config import (
    DENSE,
    PACKED,
    CombineConfig,
    FmhaFwdConfig,
    KernelConfig,
    Layout,
    MaskSpec,
)
from sparsek import cache, registry
from sparsek.launch import dense, launcher
from sparsek.launch.splits import choose_splits
from sparsek.masks import make_mask
from sparsek.tuning import DENSE_WORKLOADS, Workload

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

# Masks. The public API's default window (none), and window sizes around the kernels'
# tiles (64-row query tiles, 128-key tiles, 192-row d64 tiles).
NO_WINDOW = (-1, -1)
TILE_WINDOWS = (63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257)
# How a window is given: causal=True with a left size (right folded to 0), left-only,
# right-only (right >= 1: (-1, 0) is the causal mask) or two-sided; relative weights.
WINDOW_SHAPES = {"causal": 35, "left": 15, "right": 15, "two_sided": 35}
# Random draws after the coverage block: the chance of a mask beyond none/causal.
MASKED_SHARE = 0.5


@dataclass(frozen=True)
class Axes:
    """What the registry serves on one architecture (see `registry_axes`)."""

    arch: str
    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...]
    masks: tuple[str, ...]  # `MaskSpec.name` of each served mask (`registry.SERVED_MASKS`)
    page_sizes: tuple[int, ...]  # paged block sizes with precompiled kernels

    @property
    def caches(self) -> tuple[str, ...]:
        """The cache kinds a kvcache config may draw: contiguous, then paged<size>."""
        return ("contiguous", *(f"paged{p}" for p in self.page_sizes))

    @property
    def plain_masks(self) -> tuple[str, ...]:
        """The served masks without window, softcap or sinks (none, causal)."""
        return tuple(m for m in self.masks if is_plain(m))

    @property
    def feature_masks(self) -> tuple[str, ...]:
        """The served masks with a window, softcap or sinks."""
        return tuple(m for m in self.masks if not is_plain(m))

    def variant_masks(self, variant: str) -> tuple[str, ...]:
        """The masks a variant can ask for: the SDPA drop-in only those of `is_causal`."""
        return self.plain_masks if variant == "dense_sdpa" else self.masks


def spec_of(mask: str) -> MaskSpec:
    """The served `MaskSpec` of a mask name."""
    spec = registry.MASK_BY_NAME.get(mask)
    if spec is None:
        raise ValueError(f"mask={mask} is not served ({sorted(registry.MASK_BY_NAME)})")
    return spec


def is_plain(mask: str) -> bool:
    """No window, softcap or sinks: the mask SDPA has too (none or causal)."""
    spec = spec_of(mask)
    return not (spec.window or spec.softcap or spec.sinks)


MaskArgs = tuple[bool, tuple[int, int], float, tuple[float, float] | None]


def simplest_args(spec: MaskSpec) -> MaskArgs:
    """The simplest (causal, window, softcap, sinks) of a call that asks for `spec` (as
    `FuzzConfig` holds them)."""
    return (
        spec.causal,
        (16, 16) if spec.window else NO_WINDOW,
        10.0 if spec.softcap else 0.0,
        (0.0, 1.0) if spec.sinks else None,
    )


def spec_of_args(causal: bool, window: tuple[int, int], softcap: float, sinks: object) -> MaskSpec:
    """The kernels' `MaskSpec` of a call's mask arguments (as the entry points make it)."""
    return make_mask(causal, window, softcap, sinks is not None).spec


def registry_axes(arch: str) -> Axes:
    """The registry's dtypes, head dims, served masks and precompiled page sizes for `arch`.

    Raises:
        NotImplementedError: a served mask is not one the public API's mask arguments
            (causal, window_size, softcap, sinks) ask for: the fuzz (calls and oracle)
            has to learn it first.
    """
    for mask in (*registry.MASKS, *registry.SERVED_MASKS):
        if mask not in registry.SERVED_MASKS or spec_of_args(*simplest_args(mask)) != mask:
            raise NotImplementedError(
                f"the registry serves mask={mask.name}, which the fuzz cannot express (it "
                "calls the public API with causal, window_size, softcap and sinks): teach "
                "tests/fuzz_configs.py (the draws) and tests/fuzz_cases.py (the call and "
                "the oracle) the new mask"
            )
    page_sizes = {layout.page_size for layout, _ in registry.PRECOMPILED if layout.page_size}
    return Axes(
        arch=arch,
        dtypes=tuple(registry.DTYPES),
        head_dims=tuple(registry.registered_head_dims(arch)),
        masks=tuple(mask.name for mask in registry.SERVED_MASKS),
        page_sizes=tuple(sorted(page_sizes)),
    )


@dataclass(frozen=True)
class FuzzConfig:
    """One fuzz case (see the module docstring); plain data, complete in its repr.

    Sequences: q_lens[b] new queries and k_lens[b] keys (dense: all equal; kvcache: k_lens
    are `cache_seqlens`, the new queries included). Packed layouts have `pad_q` / `pad_k`
    rows past the last sequence (NaN when `nan_padding`, else random); caches have unused
    slots, spare blocks and block-table columns (NaN when `nan_padding`, else large random
    keys that would dominate a row that read them).

    Mask: `mask` names the kernels' `MaskSpec`; `causal`, `window`, `softcap` are the
    call's arguments that ask for it (`is_causal` for the SDPA drop-in), `sinks` the
    (loc, spread) of its sink logits, loc + spread * N(0, 1) per head, drawn from the
    config's generator after q, k and v (None: no sinks). A config whose arguments ask for
    another mask than `mask` is refused (ValueError).
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
    causal: bool = False
    window: tuple[int, int] = NO_WINDOW  # window_size (left, right); -1: unbounded
    softcap: float = 0.0
    sinks: tuple[float, float] | None = None  # (loc, spread) of the sink logits

    def __post_init__(self) -> None:
        asked = spec_of_args(self.causal, self.window, self.softcap, self.sinks)
        if asked != spec_of(self.mask):
            raise ValueError(
                f"config {self.index}: causal={self.causal}, window={self.window}, "
                f"softcap={self.softcap}, sinks={self.sinks} ask for mask={asked.name}, "
                f"not {self.mask}"
            )
        if self.variant == "dense_sdpa" and not is_plain(self.mask):
            raise ValueError(f"config {self.index}: the SDPA drop-in has no mask={self.mask}")

    @property
    def path(self) -> str:
        return VARIANTS[self.variant]

    @property
    def spec(self) -> MaskSpec:
        """The kernels' mask (what the config's kernels are compiled for)."""
        return spec_of(self.mask)

    @property
    def band(self) -> tuple[int, int]:
        """The visible band (left, right) around each query's diagonal key, -1 unbounded:
        the window with causal's right side 0 (both -1: every key)."""
        return self.window[0], 0 if self.causal else self.window[1]

    @property
    def top_left(self) -> bool:
        """The mask is aligned top-left (the SDPA drop-in), not bottom-right."""
        return self.variant == "dense_sdpa"

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

    @property
    def table_width(self) -> int:
        """Paged: block-table columns (the longest sequence's blocks, at least one, and
        `capacity_slack` more)."""
        used = [-(-n // self.page_size) for n in self.k_lens]
        return max(max(used, default=0), 1) + self.capacity_slack

    @property
    def capacity(self) -> int:
        """Key slots per sequence the call's cache offers: a contiguous cache's length (the
        longest sequence, at least one, and `capacity_slack` more); a paged cache's table
        width times its block size; dense: seqlen_k."""
        if self.path == "dense":
            return self.k_lens[0]
        if self.page_size:
            return self.table_width * self.page_size
        return max(max(self.k_lens, default=0), 1) + self.capacity_slack

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
        return tags | self.mask_features()

    def mask_features(self) -> set[str]:
        """Tags of the mask arguments (see `draw_mask_args`)."""
        spec, (left, right) = self.spec, self.window
        tags = set()
        if spec.window:
            if self.causal:
                shape = "causal"
            elif left >= 0:
                shape = "two_sided" if right >= 0 else "left"
            else:
                shape = "right"
            tags.add(f"window:{shape}")
            span = max((*self.q_lens, *self.k_lens), default=0)
            for size in (left,) if self.causal else (left, right):
                if size < 0:
                    continue
                if size in (0, 1):
                    tags.add(f"window:{size}")
                elif size in TILE_WINDOWS:
                    tags.add("window:tile")
                if size >= max(span, 1):
                    tags.add("window:past_seq")
            if self.causal and right >= 0:
                tags.add("window:causal_folds_right")
            reach = self.band[1]  # query i's band ends at key i + sk - sq + reach
            lens = zip(self.q_lens, self.k_lens, strict=True)
            if reach >= 0 and any(sq > sk + reach for sq, sk in lens):
                tags.add("window:rows_without_keys")
        elif spec.causal and not self.causal:
            tags.add("causal_as_window")  # window_size=(-1, 0)
        elif spec.causal and self.window != NO_WINDOW:
            tags.add("causal_folds_right")  # causal=True, window_size=(-1, r)
        if spec.softcap:
            strength = "strong" if self.softcap <= 5 else "medium" if self.softcap <= 20 else "mild"
            tags.add(f"softcap:{strength}")
        if self.sinks is not None:
            loc, spread = self.sinks
            tags.add("sinks:dominant" if loc >= 8 else "sinks:spread" if spread >= 8 else "sinks")
        return tags


# ---------------------------------------------------------------------------- generation


def coverage_plan(axes: Axes) -> list[tuple[str, str, str, int, str]]:
    """(variant, cache kind, dtype, head dim, mask) entries (cache kind "" for the dense and
    varlen variants): each served mask on every path with every (dtype, head dim) pair, and
    on every variant and cache kind of the path that takes it (the SDPA drop-in: no mask
    and causal only); the pairs go round in turn, shifted per mask, so that variants meet
    different pairs under different masks."""
    plan = []
    kinds = [(dtype, head_dim) for dtype in axes.dtypes for head_dim in axes.head_dims]
    for turn, mask in enumerate((*axes.plain_masks, *axes.feature_masks)):
        for path in PATHS:
            slots = [
                (variant, cache_kind)
                for variant, variant_path in VARIANTS.items()
                if variant_path == path and mask in axes.variant_masks(variant)
                for cache_kind in (axes.caches if path == "kvcache" else ("",))
            ]
            for i in range(max(len(slots), len(kinds))):
                dtype, head_dim = kinds[(turn + i) % len(kinds)]
                plan.append((*slots[i % len(slots)], dtype, head_dim, mask))
    return plan


def generate(seed: int, count: int, axes: Axes) -> list[FuzzConfig]:
    """`count` configs (see the module docstring): the coverage block first (shuffled, so a
    shorter run is still a random sample of it), then weighted random variants, a mask
    beyond none/causal with probability `MASKED_SHARE` where the variant has one."""
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
        masks = axes.variant_masks(variant)
        featured = [m for m in masks if not is_plain(m)]
        if featured and rng.random() < MASKED_SHARE:
            mask = rng.choice(featured)
        else:
            mask = rng.choice([m for m in masks if is_plain(m)])
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
    """One config of `variant` with the given identity, random shapes and mask arguments."""
    causal, window, softcap, sinks = simplest_args(spec_of(mask))
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
        causal=causal,
        window=window,
        softcap=softcap,
        sinks=sinks,
    )
    path = VARIANTS[variant]
    if path == "dense":
        config = draw_dense(rng, config)
    elif path == "varlen":
        config = draw_varlen(rng, config)
    else:
        config = draw_kvcache(rng, replace(config, cache=cache_kind))
    return draw_mask_args(rng, fit(config))


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


# ---------------------------------------------------------------------------- mask arguments


def draw_window_size(rng: random.Random, span: int) -> int:
    """One side of a window: 0, 1, a few keys, about a tile, within the sequence (`span`:
    its longest length) or at / past its end."""
    r = rng.random()
    if r < 0.12:
        return 0
    if r < 0.22:
        return 1
    if r < 0.40:
        return rng.randint(2, 16)
    if r < 0.65:
        return rng.choice(TILE_WINDOWS)
    if r < 0.85:
        return rng.randint(2, max(span, 2))
    return span + rng.choice((0, 1, 37, 5000))


def draw_softcap(rng: random.Random) -> float:
    """Strong (scores squeezed into a few units), medium or mild (only outliers capped)."""
    r = rng.random()
    if r < 0.4:
        return rng.choice((1.0, 2.0, 3.5, 5.0))
    if r < 0.6:
        return rng.choice((10.0, 15.0, 20.0))
    return rng.choice((30.0, 40.0, 50.0))


def draw_sinks(rng: random.Random) -> tuple[float, float]:
    """(loc, spread) of the sink logits: about a row's own scores, large enough to
    dominate the row (a row of 1k keys with unit scores has lse ~7.5), spread over both
    (some heads dominated, others not), or negligible."""
    r = rng.random()
    if r < 0.5:
        return rng.choice((-2.0, -0.5, 0.0, 1.0, 3.0)), rng.choice((0.5, 1.0, 2.0))
    if r < 0.75:
        return rng.choice((8.0, 12.0, 20.0)), rng.choice((1.0, 4.0))
    if r < 0.9:
        return 0.0, 8.0
    return -20.0, 1.0


def draw_mask_args(rng: random.Random, config: FuzzConfig) -> FuzzConfig:
    """`config` with the call's mask arguments drawn for its mask (see the module
    docstring); windows relative to its longest sequence."""
    spec = config.spec
    causal, window = spec.causal, NO_WINDOW
    span = max((*config.q_lens, *config.k_lens), default=0)
    if spec.window:
        shape = rng.choices(list(WINDOW_SHAPES), list(WINDOW_SHAPES.values()))[0]
        left, right = draw_window_size(rng, span), draw_window_size(rng, span)
        if shape == "causal":  # right: ignored (causal folds it to 0), mostly left out
            causal, window = True, (left, right if rng.random() < 0.3 else -1)
        elif shape == "left":
            window = (left, -1)
        elif shape == "right":  # right 0 alone would be the causal mask
            window = (-1, max(right, 1))
        else:
            window = (left, right)
    elif spec.causal and not config.top_left:
        r = rng.random()
        if r < 0.1:
            causal, window = False, (-1, 0)  # the causal mask as a window
        elif r < 0.2:
            window = (-1, draw_window_size(rng, span))  # causal folds the right side to 0
    return replace(
        config,
        causal=causal,
        window=window,
        softcap=draw_softcap(rng) if spec.softcap else 0.0,
        sinks=draw_sinks(rng) if spec.sinks else None,
    )


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


Launch = tuple[MaskSpec, Layout, Workload]


def kv_launches(
    arch: str,
    config: FuzzConfig,
    layout: Layout,
    decode: bool,
    num_splits: int,
    device: torch.device | None,
) -> tuple[list[Launch], bool]:
    """The forward kernels a KV-cache request of `config` over `layout` with `num_splits`
    may launch (`sparsek.launch.kvcache`), and whether it may launch the combine, on
    `device` (None: on any GPU): decode (one query per sequence) drops causal, takes the
    `single_query` kernels for a packed q or a window and the two-CTAs-per-SM tiles when
    its unsplit CTAs fill the SMs; otherwise the keys are split as
    `sparsek.launch.splits.choose_splits` says (split kernels leave sinks to the combine)."""
    spec, workload = config.spec, Workload.DEFAULT
    (h, hkv), batch = config.heads, config.batch
    rows, heads = (config.max_seqlen_q if config.packed_q else config.q_lens[0]), h
    if decode:
        spec, workload = replace(spec, causal=False), Workload.DECODE
        layout = replace(layout, single_query=layout.varlen_q or spec.window)
        rows, heads = h // hkv, hkv  # a tile's rows: the query heads of one KV head
    kernel = registry.find(arch, config.head_dim, config.dtype, spec, layout, workload)
    if not isinstance(kernel, FmhaFwdConfig):
        return [], False  # not served (the CPU test of the plans reports it)
    unsplit: Launch = (spec, layout, workload)
    split: Launch = (replace(spec, sinks=False), replace(layout, split_kv=True), workload)
    fills: Launch = (spec, layout, Workload.DECODE_FILLS_GPU)
    if device is None:
        found = [unsplit, split] if num_splits != 1 else [unsplit]
        return found + ([fills] if decode and num_splits <= 1 else []), num_splits != 1
    ctas = -(-rows // kernel.tile_m) * heads * batch
    if decode and num_splits <= 1 and ctas >= launcher.num_sms(device.index):
        return [fills], False
    key_tiles = -(-config.capacity // kernel.tile_n)
    if choose_splits(num_splits, ctas, key_tiles, device) == 1:
        return [unsplit], False
    return [split], True


def launches(
    arch: str, config: FuzzConfig, device: torch.device | None = None
) -> tuple[list[Launch], bool]:
    """(mask, layout, workload) of each forward kernel a call of `config` may launch on
    `device` (None: on any GPU of `arch`), and whether it may launch the combine."""
    spec = config.spec
    if config.path == "varlen":
        return [(spec, PACKED, Workload.DEFAULT)], False
    if config.path == "dense":
        b, sq, h = config.batch, config.q_lens[0], config.heads[0]
        if sq == 1 and (is_plain(config.mask) or not config.top_left):
            # one query per sequence: decode over k and v as a contiguous cache (the dense
            # kernels when no decode kernel serves it)
            found, combine = kv_launches(arch, config, Layout(False, "cache", 0), True, 0, device)
            if found:
                return found, combine
        workloads = DENSE_WORKLOADS
        if device is not None:
            sms = launcher.num_sms(device.index)
            workloads = (dense.dense_workload(b, sq, h, spec.causal, sms),)
        return [(spec, DENSE, workload) for workload in workloads], False
    kv_layout = "paged" if config.page_size else "cache"
    layout = Layout(config.packed_q, kv_layout, config.page_size)
    if config.packed_q:
        total_q = sum(config.q_lens) + config.pad_q
        decode = config.max_seqlen_q == 1 and total_q == config.batch
    else:
        decode = config.q_lens[0] == 1
    return kv_launches(arch, config, layout, decode, config.num_splits, device)


def config_kernels(
    arch: str, config: FuzzConfig, device: torch.device | None = None
) -> set[KernelConfig]:
    """The kernels a call of `config` may launch on `device` (None: on any GPU of `arch`)."""
    found, combine = launches(arch, config, device)
    kernels: set[KernelConfig] = set()
    for mask, layout, workload in found:
        kernel = registry.find(arch, config.head_dim, config.dtype, mask, layout, workload)
        if isinstance(kernel, FmhaFwdConfig):
            kernels.add(kernel)
    if combine:
        kernels.add(CombineConfig(arch, config.head_dim, config.dtype, config.spec.sinks))
    return kernels


def kernel_pool(
    arch: str, configs: Sequence[FuzzConfig], device: torch.device | None = None
) -> list[KernelConfig]:
    """Every kernel the configs can launch on `device` (None: on any GPU of `arch`): of
    each served mask's kernels (`registry.mask_kernels`), those of the configs' paths,
    head dims, dtypes, cache kinds and shapes (`config_kernels`), in the registry's
    order."""
    wanted: dict[str, set[KernelConfig]] = {}
    for config in configs:
        wanted.setdefault(config.mask, set()).update(config_kernels(arch, config, device))
    pool = [
        kernel
        for mask in registry.SERVED_MASKS
        if mask.name in wanted
        for kernel in registry.mask_kernels(arch, mask)
        if kernel in wanted[mask.name]
    ]
    return list(dict.fromkeys(pool))


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
    that each loads in ~60 ms at first use instead of compiling (2-3 s each). A kernel
    that fails here is reported and compiles (or fails) again at first use.
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
