"""The split-KV factor of decode: how many CTAs share one query tile's keys.

A decode step has one query tile per (sequence, KV head): a small batch leaves most SMs
idle while each CTA walks its whole cache. Splitting the keys across `splits` CTAs fills
the GPU; a combine kernel then merges their partial outputs. The factor follows from the
CTA count and the cache's capacity, never from device values.
"""

from __future__ import annotations

import math

import torch

from sparsek.launch import launcher

# Splits never exceed this (the partial buffers grow with it; past ~2x the SM count
# there is nothing left to fill).
MAX_SPLITS = 128
# choose_splits takes the fewest splits within this fraction of the best wave efficiency.
WAVE_EFFICIENCY = 0.95
# ... and does not split caches of at most this many key tiles once the CTAs fill a
# quarter of the SMs: there the partial outputs and the combine cost more than the
# shorter key walk saves (H200, B8 x 8 KV heads = 64 CTAs, 1k context: 2 splits 22.4 us,
# none 19.5; at 4k, 8 tiles per split are even, at 16k 2 splits are 15% faster;
# perf/results/h200/decode_splits_*.md).
SHORT_CACHE_KEY_TILES = 8


def choose_splits(requested: int, ctas: int, key_tiles: int, device: torch.device) -> int:
    """Split-KV factor: `requested` if > 0 (capped by the key tiles), else automatic.

    Automatic: no split once the CTAs nearly fill the SMs (>= 80%), nor for a short
    cache (`SHORT_CACHE_KEY_TILES`) once they fill a quarter; otherwise the fewest splits
    whose wave efficiency (CTAs / (waves x SMs), the last wave counted whole) is within
    `WAVE_EFFICIENCY` of the best reachable one, never more than there are key tiles of
    the cache's capacity. (A CTA of these kernels fills an SM: 3 splits of 64 CTAs on
    132 SMs run as two waves, the second 45% full; the two-CTAs-per-SM decode tiles are
    never split.)
    """
    limit = max(1, min(key_tiles, MAX_SPLITS))
    if requested > 0:
        return min(requested, limit)
    sms = launcher.num_sms(device.index)
    if ctas * 5 >= sms * 4 or (ctas * 4 >= sms and key_tiles <= SHORT_CACHE_KEY_TILES):
        return 1
    efficiency = [ctas * s / (sms * math.ceil(ctas * s / sms)) for s in range(1, limit + 1)]
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, 1) if e >= WAVE_EFFICIENCY * best)
