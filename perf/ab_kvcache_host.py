"""Same-process A/B of the KV-cache launch layer's host time (GPU): an old module vs today's.

    git show 32e6eb9:sparsek/ops_varlen_cuda.py > /tmp/old_ops_varlen_cuda.py   # on a clone
    python -m perf.ab_kvcache_host /tmp/old_ops_varlen_cuda.py                  # on the GPU

The old module's `attention_with_kvcache` (32e6eb9: registry lookups, Variant dataclasses
and views worked out on every call) against `sparsek.ops_kvcache_cuda`'s (a plan memoized
per request shape), on `perf/latency_probe.py`'s paged decode problem (B1, context 1k,
H32 Hkv8 D128, blocks of 16). Five alternating rounds of 10 bursts x 200 calls each; the
outputs are compared first.
"""

import importlib.util
import sys

import torch

from perf.latency_probe import decode_problem, per_call_us
from sparsek import ops_kvcache_cuda


def main(old_path: str) -> None:
    spec = importlib.util.spec_from_file_location("old_ops_varlen_cuda", old_path)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)

    q, k, v, seqlens, table = decode_problem()
    args = (q, k, v, seqlens, table, None, None, True, q.shape[-1] ** -0.5, 0)
    o_old, _ = old.attention_with_kvcache(*args)
    o_new, _ = ops_kvcache_cuda.attention_with_kvcache(*args)
    torch.cuda.synchronize()
    print("max |old - new| =", (o_old.float() - o_new.float()).abs().max().item())
    rows = {
        "old launch layer": lambda: old.attention_with_kvcache(*args),
        "new (plan) launch layer": lambda: ops_kvcache_cuda.attention_with_kvcache(*args),
    }
    results: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(5):
        for name, (host, _wall) in per_call_us(rows, calls=200, bursts=10).items():
            results[name].append(host)
    for name, values in results.items():
        values.sort()
        rounds = ", ".join(f"{x:.1f}" for x in values)
        print(f"{name:<30} median {values[2]:6.1f} us host  (rounds: {rounds})")


if __name__ == "__main__":
    main(sys.argv[1])
