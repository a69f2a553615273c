"""Plot TFLOP/s vs sequence length from a results CSV (runs on any machine with matplotlib).

    python perf/plot.py perf/results/h100/results.csv perf/results/h100/tflops.png
    python perf/plot.py part1.csv part2.csv out.png      # several CSVs are concatenated

One panel per (head_dim, causal) of the main grid (kind "kernel", suite "grid"), one line per
provider. Points whose output check failed are drawn as red crosses; skipped rows are absent.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from perf.report import PROVIDER_ORDER, Row, read_csv  # noqa: E402


def _grid_rows(rows: list[Row], dtype: str) -> list[Row]:
    return [
        r
        for r in rows
        if r["kind"] == "kernel"
        and r["suite"] == "grid"
        and r["status"] == "ok"
        and r["dtype"] == dtype
        and r["tflops"]
    ]


def plot(rows: list[Row], out: Path, dtype: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = dtype or next((r["dtype"] for r in rows if r["kind"] == "kernel"), "bf16")
    selected = _grid_rows(rows, dtype)
    if not selected:
        raise SystemExit(f"no measured grid rows with dtype {dtype} in the CSV")
    head_dims = sorted({int(r["head_dim"]) for r in selected})
    causal_flags = sorted({r["causal"] == "True" for r in selected})
    present = {r["provider"] for r in selected}
    providers = [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))

    # One row of panels per head_dim, one column per causal flag.
    fig, axes = plt.subplots(
        len(head_dims),
        len(causal_flags),
        figsize=(5.2 * len(causal_flags), 3.6 * len(head_dims)),
        sharey=True,
        squeeze=False,
    )
    panels = [
        (d, c, axes[i][j]) for i, d in enumerate(head_dims) for j, c in enumerate(causal_flags)
    ]
    for head_dim, causal, ax in panels:
        series: dict[str, list[tuple[int, float, bool]]] = defaultdict(list)
        for r in selected:
            if int(r["head_dim"]) == head_dim and (r["causal"] == "True") == causal:
                point = (int(r["seqlen_q"]), float(r["tflops"]), r["check"] == "FAIL")
                series[r["provider"]].append(point)
        for provider in providers:
            points = sorted(series.get(provider, []))
            if not points:
                continue
            xs, ys, _ = zip(*points, strict=True)
            width = 2.2 if provider == "sparsek" else 1.2
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=width, label=provider)
            bad = [(x, y) for x, y, f in points if f]
            if bad:
                ax.scatter(*zip(*bad, strict=True), marker="x", color="red", s=40, zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for pts in series.values() for x, _, _ in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(_seqlen_label))
        ax.set_title(f"d{head_dim} {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("sequence length (batch x seqlen = 16k)")
        ax.grid(True, alpha=0.3)
    for row in axes:
        row[0].set_ylabel("TFLOP/s")
    axes[0][-1].legend(fontsize=8)
    first = selected[0]
    fig.suptitle(
        f"{first['gpu']} | {dtype} | sparsek {first['git_sha'][:12]} | "
        f"torch {first['torch_version']}  (red x: output check FAIL)",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def _seqlen_label(value: float, _pos: int) -> str:
    return f"{int(value) // 1024}k" if value >= 1024 else str(int(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TFLOP/s vs seqlen plot from results.csv")
    parser.add_argument("paths", type=Path, nargs="+", metavar="CSV... PNG")
    parser.add_argument("--dtype", help="dtype to plot (default: the first in the CSV)")
    args = parser.parse_args(argv)
    if len(args.paths) < 2:
        parser.error("give at least one results.csv and the output .png")
    *csvs, png = args.paths
    plot([row for path in csvs for row in read_csv(path)], png, args.dtype)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
