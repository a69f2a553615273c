"""Seeded randomized test of every path sparsek's kernels serve, on the GPU: dense
(`sparsek.attention`, the SDPA drop-in, one-query decode, long causal queries), varlen, and
KV caches (contiguous and paged, batched and packed queries, split-KV or not), over every
dtype, head dim and mask the registry serves on this GPU's architecture: none, causal,
sliding windows, softcap and sinks, alone and together (the SDPA drop-in: none and causal).

Compared against: float64 attention per sequence on the dense per-sequence tensors each
input layout is built from (`tests/attention_oracle.py`; with a window, softcap or sinks,
`tests/fuzz_cases.masked_attention`), with the GPU tests' tolerance rule relative to a
same-dtype peer's own error, per sequence:
    max|out - ref| <= 2 * max|peer - ref| + atol   (atol 1e-3 fp16, 2e-3 bf16)
where the peer is PyTorch SDPA in the inputs' dtype, or, for the masks SDPA lacks, the
reference computed as the kernels round (fast tanh, probabilities and output in the
inputs' dtype). LSE (sinks included): -inf exactly where a row sees no key, elsewhere
atol 2e-3, rtol 1e-3; rows that see no key exactly 0; rows of a packed q past the last
sequence 0 / -inf. Outputs (and the split-KV partials) are poisoned with NaN before each
launch through the launch paths' allocation seam (`sparsek.launch.launcher.empty`; no
entry point takes `out=`), so unwritten elements fail. Fallbacks are disabled
(`SPARSEK_STRICT=1`), so every config runs a kernel.

Configs (`tests/fuzz_configs.py`, inputs and check in `tests/fuzz_cases.py`): a coverage
block of every served mask (no mask and causal included) on every path with every dtype
and head dim and on every variant and cache kind that takes it, then random draws (half
of them, and about four fifths of all configs, with a window, softcap or sinks);
zero-length sequences, NaN in packed rows past cu_seqlens[-1] and in unused cache slots,
odd lengths, Sq != Sk, GQA/MQA, strided, padded and misaligned views, permuted block
tables; windows of 0, 1, a few keys, about a tile and past the sequence, one- and
two-sided, with and without causal; strong to mild softcaps; sinks from negligible to
dominating.
Environment: `SPARSEK_FUZZ_SEED` (default 20261207), `SPARSEK_FUZZ_CONFIGS` (default 600),
`SPARSEK_FUZZ_ONLY=3,17` (run those indexes of that list), `SPARSEK_FUZZ_REPORT=<file>`
(the summary is written there too), `SPARSEK_FUZZ_JOBS` (processes that precompile the
kernel pool first: every kernel the configs can launch on this GPU, so that none compiles
during the run; default one per CPU up to 16; 0 skips it, for a rerun of a few configs).

Every config runs, whatever fails before it; the test prints one summary line (configs
tried and failed per path) and each failure with its full config repr, then fails if any
config failed. A CUDA fault ends the run there (the context is lost): the summary names the
config and counts those not run.

    pytest -m fuzz tests/gpu/test_fuzz_gpu.py
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import pytest
import torch
from fuzz_cases import run_config
from fuzz_configs import (
    COUNT_ENV,
    ONLY_ENV,
    PATHS,
    REPORT_ENV,
    SEED_ENV,
    FuzzConfig,
    configs_from_env,
    default_jobs,
    is_plain,
    kernel_pool,
    precompile,
    registry_axes,
)

from sparsek import registry
from sparsek.launch import launcher

pytestmark = [pytest.mark.gpu, pytest.mark.fuzz]

MASKED = "masked"  # the summary's count of configs with a window, softcap or sinks


def poisoned(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    stride: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """`launcher.empty` with every element NaN (contiguous, like the real one)."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def context_lost(device: torch.device) -> bool:
    """A CUDA error has left the context unusable (every later launch would fail)."""
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).item()
    except RuntimeError:
        return True
    return False


def summarize(
    seed: int,
    configs: list[FuzzConfig],
    tried: collections.Counter[str],
    failures: list[tuple[FuzzConfig, list[str]]],
    lost_at: FuzzConfig | None,
    seconds: float,
    pool_line: str,
) -> str:
    """The summary line, then each failure (config repr and its problems), then how to
    run the failures alone."""
    failed = collections.Counter(config.path for config, _ in failures)
    failed.update(MASKED for config, _ in failures if not is_plain(config.mask))
    per_path = ", ".join(f"{p} {tried[p]} tried / {failed[p]} failed" for p in PATHS)
    masked = f"{tried[MASKED]} tried / {failed[MASKED]} failed"
    head = (
        f"sparsek fuzz: seed={seed} configs={sum(tried[p] for p in PATHS)}/{len(configs)} "
        f"({per_path}; with a window, softcap or sinks {masked}); {len(failures)} failed "
        f"in {seconds:.0f} s; {pool_line}"
    )
    lines = [head]
    if lost_at is not None:
        not_run = len(configs) - sum(tried[p] for p in PATHS)
        lines.append(f"CUDA context lost at config {lost_at.index}: {not_run} configs not run")
    for config, problems in failures:
        lines.append(f"FAIL {config!r}")
        lines.extend(f"    {problem}" for problem in problems)
    if failures:
        only = ",".join(str(config.index) for config, _ in failures)
        count = os.environ.get(COUNT_ENV) or str(len(configs))
        lines.append(
            f"rerun the failures: {SEED_ENV}={seed} {COUNT_ENV}={count} {ONLY_ENV}={only} "
            "pytest -m fuzz tests/gpu/test_fuzz_gpu.py"
        )
    return "\n".join(lines)


def test_fuzz(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    arch = registry.detect_arch(device)
    if arch not in registry.registered_arches():
        pytest.skip(f"no sparsek kernels are registered for {arch}")
    seed, configs = configs_from_env(registry_axes(arch))
    pool = precompile(kernel_pool(arch, configs, device), default_jobs())
    monkeypatch.setenv("SPARSEK_STRICT", "1")
    monkeypatch.setattr(launcher, "empty", poisoned)

    start = time.perf_counter()
    tried: collections.Counter[str] = collections.Counter()
    failures: list[tuple[FuzzConfig, list[str]]] = []
    lost_at = None
    for config in configs:
        tried[config.path] += 1
        tried[MASKED] += not is_plain(config.mask)
        try:
            problems = run_config(config, device)
        except Exception as exc:  # every config runs: record it and go on
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            problems = [f"raised {type(exc).__name__}: {first}"]
            if context_lost(device):
                failures.append((config, problems))
                lost_at = config
                break
        if problems:
            failures.append((config, problems))
    summary = summarize(
        seed, configs, tried, failures, lost_at, time.perf_counter() - start, pool.line()
    )
    with capsys.disabled():
        print("\n" + summary, flush=True)
        for failure in pool.failures:
            print(f"kernel pool: {failure}", flush=True)
    report = os.environ.get(REPORT_ENV)
    if report:
        Path(report).write_text(summary + "\n", encoding="utf-8")
    if failures:
        pytest.fail(summary, pytrace=False)
