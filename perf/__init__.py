"""sparsek benchmark suite: `python perf/bench_fmha.py --help` (see perf/README.md)."""
