"""Same-process A/B of two versions of sparsek: this checkout against a base commit.

The base commit's packages are imported beside this checkout's under other names
(`sparsek_base`, `cutedsl_kernels_base`, torch op namespace `sparsek_base`), so both
versions' public calls run in one process, on the same inputs, in alternating rounds.
What it times, each through the public API:

- dense grid rows (`sparsek.attention`, bf16, batch x seqlen = 16k, heads x head_dim =
  2048; d64 / d128, causal or not, seqlen 512 .. 16k): device time per call after an L2
  flush (`perf.timing.time_kernel`), as TFLOP/s;
- decode rows (`sparsek.attention_with_kvcache` over a paged cache of 16-token pages, H32
  Hkv8 d128 bf16, batch 1 / 8 / 32 x context 1k / 4k / 16k): CUDA-graph replays after an
  L2 flush, in us;
- varlen rows (`sparsek.attention_varlen`, bf16 d128 H16, 16 packed sequences of 256 ..
  2048 tokens, ~16k in all, with NaN in the unused rows past the last one, causal or not):
  device time per call after an L2 flush, as TFLOP/s;
- eager latency rows (back-to-back `sparsek.attention` calls on small problems, host
  overhead included), in us.

Each row is timed `--rounds` times per version, the order of the two flipped every round;
the table gives each version's median and new / base.

    # on any machine with git: export the base commit under the other names
    python perf/lab/ab_commits.py export ae45210 .scratch/base
    # on the GPU
    python perf/lab/ab_commits.py run --base .scratch/base --out ab.md
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

PACKAGES = ("sparsek", "cutedsl_kernels")
SUFFIX = "_base"


def export(commit: str, dest: Path) -> None:
    """Write `commit`'s packages to `dest` under the renamed package names."""
    blob = subprocess.run(
        ["git", "archive", commit, *PACKAGES], capture_output=True, check=True
    ).stdout
    words = re.compile(r"\b(" + "|".join(PACKAGES) + r")\b")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.endswith(".py"):
                continue
            top, _, rest = member.name.partition("/")
            path = dest / (top + SUFFIX) / rest
            path.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            path.write_text(words.sub(lambda m: m.group(1) + SUFFIX, source.read().decode()))
    (dest / "COMMIT").write_text(commit + "\n")
    print(f"exported {commit} to {dest} as {', '.join(p + SUFFIX for p in PACKAGES)}")


def _versions(base: Path) -> dict[str, Any]:
    sys.path.insert(0, str(base.resolve()))
    return {
        "base": importlib.import_module("sparsek" + SUFFIX),
        "new": importlib.import_module("sparsek"),
    }


@dataclass(frozen=True)
class Row:
    """One timed row: `call(module)` builds the call of one version, `measure` times it."""

    name: str
    unit: str
    call: Callable[[Any], Callable[[], object]]
    measure: Callable[[Callable[[], object]], float]


def _rows(device: Any) -> list[Row]:
    import torch

    from perf.timing import time_eager, time_kernel

    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen)

    def dense_call(mod: Any, qkv: tuple[torch.Tensor, ...], causal: bool) -> Callable[[], object]:
        return lambda: mod.attention(*qkv, causal=causal)

    def tflops(fn: Callable[[], object], gflop: float) -> float:
        return gflop / time_kernel(fn, device)  # GFLOP per ms = TFLOP/s

    def decode_call(mod: Any, args: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        return lambda: mod.attention_with_kvcache(*args)

    def varlen_call(mod: Any, args: tuple[Any, ...], causal: bool) -> Callable[[], object]:
        q, k, v, cu_q, cu_k, max_len = args
        return lambda: mod.attention_varlen(q, k, v, cu_q, cu_k, max_len, max_len, causal=causal)

    def graph_us(fn: Callable[[], object]) -> float:
        return time_kernel(fn, device, graph=True) * 1e3

    def eager_us(fn: Callable[[], object]) -> float:
        return time_eager(fn, device) * 1e3

    rows = []
    for head_dim in (64, 128):
        for causal in (False, True):
            for seqlen in (512, 2048, 8192, 16384):
                batch, heads = 16384 // seqlen, 2048 // head_dim
                qkv = tuple(rand(batch, seqlen, heads, head_dim) for _ in range(3))
                pairs = seqlen * (seqlen + 1) / 2 if causal else seqlen * seqlen
                gflop = 4 * batch * heads * head_dim * pairs / 1e9
                rows.append(Row(
                    f"dense d{head_dim} S{seqlen}{' causal' if causal else ''}", "TFLOP/s",
                    functools.partial(dense_call, qkv=qkv, causal=causal),
                    functools.partial(tflops, gflop=gflop),
                ))  # fmt: skip
    page = 16
    for batch in (1, 8, 32):
        for context in (1024, 4096, 16384):
            pages = batch * context // page
            table = torch.randperm(pages, device=device, generator=gen).to(torch.int32)
            args = (
                rand(batch, 1, 32, 128),  # q: H32 over 8 KV heads
                rand(pages, page, 8, 128),
                rand(pages, page, 8, 128),
                torch.full((batch,), context, dtype=torch.int32, device=device),
                table.view(batch, -1),
            )
            rows.append(Row(
                f"decode B{batch} ctx{context}", "us",
                functools.partial(decode_call, args=args), graph_us,
            ))  # fmt: skip
    lengths = torch.randint(256, 2049, (16,), generator=torch.Generator().manual_seed(0))
    cu = torch.zeros(17, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    total = int(cu[-1])
    packed = []
    for _ in range(3):  # 64 unused rows past the last sequence hold NaN, as serving pads
        x = rand(total + 64, 16, 128)
        x[total:] = float("nan")
        packed.append(x)
    cu_dev = cu.to(device)
    for causal in (False, True):
        pairs = sum(n * (n + 1) / 2 if causal else n * n for n in lengths.tolist())
        rows.append(Row(
            f"varlen d128 16 seqs{' causal' if causal else ''}", "TFLOP/s",
            functools.partial(varlen_call, args=(*packed, cu_dev, cu_dev, int(lengths.max())),
                              causal=causal),
            functools.partial(tflops, gflop=4 * 16 * 128 * pairs / 1e9),
        ))  # fmt: skip
    for batch, seqlen, heads, head_dim in ((1, 128, 8, 64), (1, 512, 16, 128)):
        qkv = tuple(rand(batch, seqlen, heads, head_dim) for _ in range(3))
        rows.append(Row(
            f"eager B{batch} H{heads} S{seqlen} d{head_dim}", "us",
            functools.partial(dense_call, qkv=qkv, causal=False), eager_us,
        ))  # fmt: skip
    return rows


def run(base: Path, out: Path | None, rounds: int, only: str | None = None) -> None:
    """Time every row (or those whose name matches `only`, a regular expression) for both
    versions, `rounds` times in alternating order."""
    import torch

    versions = _versions(base)
    device = torch.device("cuda")
    rows = [r for r in _rows(device) if only is None or re.search(only, r.name)]
    for row in rows:  # compile or load every kernel first
        for mod in versions.values():
            row.call(mod)()
    torch.cuda.synchronize()
    times: dict[str, dict[str, list[float]]] = {r.name: {"base": [], "new": []} for r in rows}
    commit = (base / "COMMIT").read_text().strip()
    for r in range(rounds):
        order = ("base", "new") if r % 2 == 0 else ("new", "base")
        for row in rows:
            for version in order:
                times[row.name][version].append(row.measure(row.call(versions[version])))
        # The table so far after each round: a run cut short still leaves one.
        lines = [
            f"A/B: this checkout (new) against {commit} (base), {torch.cuda.get_device_name()}, "
            f"{r + 1} of {rounds} rounds in alternating order; medians.",
            "",
            "| row | unit | base | new | new / base |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            old, new = (statistics.median(times[row.name][v]) for v in ("base", "new"))
            lines.append(f"| {row.name} | {row.unit} | {old:.2f} | {new:.2f} | {new / old:.3f} |")
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        if out is not None:
            out.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_export = sub.add_parser("export", help="export a commit's packages renamed")
    p_export.add_argument("commit")
    p_export.add_argument("dest", type=Path)
    p_run = sub.add_parser("run", help="time both versions (needs a GPU)")
    p_run.add_argument("--base", type=Path, required=True)
    p_run.add_argument("--out", type=Path)
    p_run.add_argument("--rounds", type=int, default=3)
    p_run.add_argument("--only", help="time only the rows whose name matches this regex")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.commit, args.dest)
    else:
        run(args.base, args.out, args.rounds, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
