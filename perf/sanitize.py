"""One small case of every kernel kind sparsek launches, for NVIDIA's compute-sanitizer (GPU).

    python perf/sanitize.py --list                       # the cases (no GPU needed)
    compute-sanitizer --tool memcheck python perf/sanitize.py
    compute-sanitizer --tool racecheck python perf/sanitize.py --case varlen
    compute-sanitizer --tool synccheck python perf/sanitize.py --case split_kv

Each case builds small inputs from a fixed seed, makes one public call (`sparsek.attention`,
`attention_varlen`, `attention_with_kvcache`, the vLLM backend's `store_kv`), synchronizes
(`torch.cuda.synchronize()`, so a fault is reported at its case) and compares the result
with sparsek's float64 reference (`sparsek.reference`, `sparsek.reference_varlen`; the KV
store bit for bit with its torch version `store_kv_reference`). One line per case: name,
what it launches, max |out - ref| against a loose bound (the sanity check of a run under a
sanitizer: `tests/gpu/test_fuzz_gpu.py` holds the kernels to the tight tolerance), OK or
FAIL. Exit status 1 if a case failed or raised, 2 without a GPU.

The dense schedules are forced with `sparsek.tuning.override` (the base row with
`persistent` off or on); the rest follow from the shapes: a one-wave problem, a long causal
problem (persistent CTAs taking tiles from a counter), one query per sequence (decode), a
batch with more decode tiles than SMs (two CTAs per SM), `num_splits` > 1 (split-KV
forward + the combine kernel). See docs/sanitizer.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import sparsek  # noqa: E402
from sparsek import registry, tuning  # noqa: E402
from sparsek.integrations.vllm.kernels import store_kv, store_kv_reference  # noqa: E402
from sparsek.launch import launcher  # noqa: E402
from sparsek.reference import reference_attention  # noqa: E402
from sparsek.reference_varlen import (  # noqa: E402
    reference_attention_kvcache,
    reference_attention_varlen,
)

SEED = 1234
# max |out - ref| allowed: loose (a sanitizer run's sanity check), but far below what an
# unwritten or misplaced row gives (|out| ~ 0.05-1).
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every case gets: the device, arch, dtype and head dim, and a seeded source."""

    device: torch.device
    arch: str
    dtype: torch.dtype
    head_dim: int
    gen: torch.Generator

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(shape, device=self.device, dtype=self.dtype, generator=self.gen)

    def int32(self, values: list[int] | list[list[int]]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)


@dataclasses.dataclass(frozen=True)
class Result:
    error: float  # max |out - ref| (inf with NaN), or 0/1 for a bitwise check
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


def max_error(out: Tensor, ref: Tensor) -> float:
    if out.shape != ref.shape:
        return math.inf
    diff = (out.double() - ref).abs().nan_to_num(nan=math.inf)
    return diff.max().item() if diff.numel() else 0.0


def compared(setup: Setup, out: object, ref: Tensor) -> Result:
    assert isinstance(out, Tensor)
    return Result(max_error(out, ref), TOLERANCE[setup.dtype])


# ---------------------------------------------------------------------------- dense


def dense_call(setup: Setup, b: int, s: int, h: int, hkv: int, causal: bool) -> Result:
    d = setup.head_dim
    q, k, v = setup.randn(b, s, h, d), setup.randn(b, s, hkv, d), setup.randn(b, s, hkv, d)
    out = sparsek.attention(q, k, v, causal=causal)
    torch.cuda.synchronize()
    ref, _ = reference_attention(q, k, v, causal=causal, compute_dtype=torch.float64)
    return compared(setup, out, ref)


def with_base_schedule(setup: Setup, persistent: bool) -> Result:
    """16 heads x 300 queries (5 tiles of 64 rows) x a batch that makes more such tiles
    than SMs, so the DEFAULT workload: the base tuning row, with `persistent` forced."""
    key = (setup.arch, setup.head_dim)
    row = dataclasses.replace(tuning.BASE[key], persistent=persistent, dynamic_schedule=False)
    batch = launcher.num_sms(setup.device.index) // (16 * 5) + 1
    with tuning.override("base", setup.arch, setup.head_dim, row):
        return dense_call(setup, batch, 300, 16, 4, causal=False)


def dense(setup: Setup) -> Result:
    return with_base_schedule(setup, persistent=False)


def dense_persistent(setup: Setup) -> Result:
    return with_base_schedule(setup, persistent=True)


def dense_one_wave(setup: Setup) -> Result:
    return dense_call(setup, 1, 128, 4, 2, causal=True)


def dense_long_causal(setup: Setup) -> Result:
    return dense_call(setup, 1, tuning.LONG_SEQLEN_Q, 4, 2, causal=True)


# ---------------------------------------------------------------------------- varlen


def varlen(setup: Setup) -> Result:
    """Packed sequences with an empty one, 3 rows past cu_seqlens[-1] (written 0 / -inf)."""
    lens, h, hkv, d = [0, 1, 77, 300, 5], 8, 2, setup.head_dim
    total = sum(lens) + 3
    q, k, v = setup.randn(total, h, d), setup.randn(total, hkv, d), setup.randn(total, hkv, d)
    cu = setup.int32([0, *itertools.accumulate(lens)])
    out = sparsek.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    torch.cuda.synchronize()
    ref, _ = reference_attention_varlen(
        q, k, v, cu, cu, max(lens), max(lens), causal=True, compute_dtype=torch.float64
    )
    return compared(setup, out, ref)


# ---------------------------------------------------------------------------- KV caches


@dataclasses.dataclass(frozen=True)
class Cache:
    k: Tensor
    v: Tensor
    seqlens: Tensor
    table: Tensor | None


def make_cache(setup: Setup, lens: list[int], hkv: int, page: int) -> Cache:
    """Contiguous (page 0: (B, max(lens) + 16, Hkv, D)) or paged (page rows a block, the
    blocks of all sequences at shuffled ids, one spare block), random everywhere."""
    d = setup.head_dim
    if not page:
        capacity = max(lens) + 16
        k, v = setup.randn(len(lens), capacity, hkv, d), setup.randn(len(lens), capacity, hkv, d)
        return Cache(k, v, setup.int32(lens), None)
    used = [-(-n // page) for n in lens]
    blocks = sum(used) + 1
    ids = list(range(blocks))
    random.Random(SEED).shuffle(ids)
    width = max(used)
    rows, start = [], 0
    for n in used:
        rows.append(ids[start : start + n] + [ids[-1]] * (width - n))
        start += n
    k, v = setup.randn(blocks, page, hkv, d), setup.randn(blocks, page, hkv, d)
    return Cache(k, v, setup.int32(lens), setup.int32(rows))


def kvcache_call(
    setup: Setup,
    page: int,
    q_lens: list[int] | None,
    num_splits: int,
    cache_lens: list[int] | None = None,
    heads: tuple[int, int] = (8, 2),
    total_q: int | None = None,
) -> Result:
    """attention_with_kvcache: packed q (`q_lens`, causal chunked prefill; `total_q`
    rows, those past the sequences' owned by none) or, with `q_lens` None, one query per
    sequence as a 4-D q (decode)."""
    lens = cache_lens or [5, 300, 0, 1000, 129]
    (h, hkv), d = heads, setup.head_dim
    cache = make_cache(setup, lens, hkv, page)
    args = (cache.k, cache.v, cache.seqlens, cache.table)
    if q_lens is None:
        q = setup.randn(len(lens), 1, h, d)
        out = sparsek.attention_with_kvcache(q, *args, num_splits=num_splits)
        torch.cuda.synchronize()
        ref, _ = reference_attention_kvcache(q, *args, compute_dtype=torch.float64)
        return compared(setup, out, ref)
    cu, top = setup.int32([0, *itertools.accumulate(q_lens)]), max(q_lens)
    q = setup.randn(total_q or sum(q_lens), h, d)
    out = sparsek.attention_with_kvcache(
        q, *args, cu_seqlens_q=cu, max_seqlen_q=top, num_splits=num_splits
    )
    torch.cuda.synchronize()
    ref, _ = reference_attention_kvcache(
        q, *args, cu_seqlens_q=cu, max_seqlen_q=top, compute_dtype=torch.float64
    )
    return compared(setup, out, ref)


PREFILL_Q_LENS = [5, 20, 0, 64, 1]


def kvcache(setup: Setup) -> Result:
    return kvcache_call(setup, 0, PREFILL_Q_LENS, num_splits=1)


def kvcache_decode(setup: Setup) -> Result:
    return kvcache_call(setup, 0, None, num_splits=1)


def paged(setup: Setup) -> Result:
    return kvcache_call(setup, paged_block(setup), PREFILL_Q_LENS, num_splits=1)


def paged_decode(setup: Setup) -> Result:
    return kvcache_call(setup, paged_block(setup), None, num_splits=1)


def paged_decode_packed(setup: Setup) -> Result:
    """Packed decode (single-query kernels): one token per sequence or none, the tokens
    past cu_seqlens_q[-1] owned by no sequence (0 / -inf), split in 2."""
    q_lens = [1, 0, 1, 1, 0]
    return kvcache_call(setup, paged_block(setup), q_lens, num_splits=2, total_q=len(q_lens))


def split_kv(setup: Setup) -> Result:
    return kvcache_call(setup, paged_block(setup), None, num_splits=4)


def split_kv_prefill(setup: Setup) -> Result:
    return kvcache_call(setup, 0, PREFILL_Q_LENS, num_splits=3)


def decode_fills_gpu(setup: Setup) -> Result:
    """One query per sequence, 48 sequences x 4 KV heads: more decode tiles than SMs, so
    the two-CTAs-per-SM decode kernel (never split)."""
    lens = [(37 * i) % 300 for i in range(48)]
    return kvcache_call(setup, paged_block(setup), None, 0, cache_lens=lens, heads=(16, 4))


def paged_block(setup: Setup) -> int:
    """The smallest paged block size with precompiled kernels (vLLM's default, 16, today)."""
    return min(layout.page_size for layout, _ in registry.PRECOMPILED if layout.page_size)


def kv_store(setup: Setup) -> Result:
    """The paged KV-cache update (vLLM's reshape_and_cache): 40 tokens at shuffled slots,
    3 of them padding (-1), 2 rows past the slot mapping; compared bit for bit with the
    torch version. The error is the number of mismatched elements."""
    block, blocks, hkv, d = paged_block(setup), 12, 4, setup.head_dim
    k_cache, v_cache = setup.randn(blocks, block, hkv, d), setup.randn(blocks, block, hkv, d)
    slots = list(range(blocks * block))
    random.Random(SEED).shuffle(slots)
    mapping = [*slots[:37], -1, -1, -1]
    slot_mapping = torch.tensor(mapping, dtype=torch.int64, device=setup.device)
    key, value = setup.randn(len(mapping) + 2, hkv, d), setup.randn(len(mapping) + 2, hkv, d)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_reference(key, value, want_k, want_v, slot_mapping)
    store_kv(key, value, k_cache, v_cache, slot_mapping)
    torch.cuda.synchronize()
    mismatched = (k_cache != want_k).sum() + (v_cache != want_v).sum()
    return Result(float(mismatched.item()), 0.0)


# ---------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    launches: str
    run: Callable[[Setup], Result]


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("dense", "dense forward, non-persistent (base row forced)", dense),
        Case("dense_persistent", "dense forward, persistent static schedule", dense_persistent),
        Case("dense_one_wave", "dense forward, one-wave 64-row tiles, causal", dense_one_wave),
        Case(
            "dense_long_causal",
            "dense forward, persistent, tiles from a counter (LONG_Q)",
            dense_long_causal,
        ),
        Case("varlen", "packed varlen forward (persistent, dynamic)", varlen),
        Case("kvcache", "contiguous KV cache, packed q, unsplit", kvcache),
        Case("kvcache_decode", "contiguous KV cache, decode, unsplit", kvcache_decode),
        Case("paged", "paged KV cache, packed q, unsplit", paged),
        Case("paged_decode", "paged KV cache, decode, unsplit", paged_decode),
        Case(
            "paged_decode_packed",
            "paged KV cache, packed decode with empty sequences, 2 splits + combine",
            paged_decode_packed,
        ),
        Case("split_kv", "paged decode, 4 splits + combine", split_kv),
        Case(
            "split_kv_prefill", "contiguous cache, packed q, 3 splits + combine", split_kv_prefill
        ),
        Case("decode_fills_gpu", "paged decode, two CTAs per SM", decode_fills_gpu),
        Case("kv_store", "paged KV-cache update (vLLM store_kv)", kv_store),
    )
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run one small case of every sparsek kernel kind (for compute-sanitizer)."
    )
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument(
        "--case",
        action="append",
        choices=sorted(CASES),
        metavar="NAME",
        help="run this case (repeatable; default: all). --list names them",
    )
    parser.add_argument(
        "--dtype",
        choices=registry.DTYPES,
        default=None,
        help="element type (default: bfloat16 where registered)",
    )
    parser.add_argument(
        "--head-dim", type=int, default=None, help="a registered head dim (default: the largest)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for case in CASES.values():
            print(f"{case.name:<18} {case.launches}")
        return 0
    if not torch.cuda.is_available():
        print("perf/sanitize.py needs a CUDA GPU (--list works without one)", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    arch = registry.detect_arch(device)
    dims = registry.registered_head_dims(arch) if arch else []
    dtype_name = args.dtype or ("bfloat16" if "bfloat16" in registry.DTYPES else registry.DTYPES[0])
    head_dim = args.head_dim or (dims[-1] if dims else 0)
    if arch is None or head_dim not in dims or dtype_name not in registry.DTYPES:
        print(
            f"no kernels for arch={arch}, head_dim={head_dim}, dtype={dtype_name} "
            f"(registered head dims: {dims}, dtypes: {list(registry.DTYPES)})",
            file=sys.stderr,
        )
        return 2
    dtype = getattr(torch, dtype_name)
    names = args.case or list(CASES)
    gpu = torch.cuda.get_device_name(device)
    print(f"{len(names)} cases on {gpu}, {arch} d{head_dim} {dtype_name}")
    failed = 0
    for name in names:
        case = CASES[name]
        setup = Setup(device, arch, dtype, head_dim, torch.Generator(device).manual_seed(SEED))
        try:
            result = case.run(setup)
            verdict = "OK" if result.ok else "FAIL"
            line = f"max|out-ref| {result.error:.2e} (bound {result.bound:.0e})  {verdict}"
        except Exception as exc:  # report the case, go on with the next
            result, line = Result(math.inf, 0.0), f"ERROR {type(exc).__name__}: {exc}"
        failed += not result.ok
        print(f"{name:<18} {case.launches:<60} {line}", flush=True)
    print(f"{len(names) - failed} of {len(names)} cases OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
