"""Results: the long-format CSV (one row per shape x provider x kind) and the markdown table.

    python perf/report.py results.csv [more.csv ...] [--md table.md]   # rebuild the table

The table has one row per shape and one column per provider: TFLOP/s for kernel rows,
microseconds for latency rows, milliseconds for first-call rows. "sparsek/best" is the best
peer's time over sparsek's time (> 1: sparsek is faster), over peers whose check passed
(sparsek_xformers is sparsek itself behind xFormers' dispatch, so it is never a peer).

The varlen, decode and xformers suites get tables of their own: varlen one row per (heads,
causal) with the packed token count (lengths listed under the table; `seqlens` column of the
CSV); decode one row per (batch, context, block size) with K + V read bandwidth in GB/s and,
in parentheses, its fraction of the copy bandwidth measured in the same run (`gbps`,
`bw_frac`, `copy_gbps` columns, blank on other suites' rows); xformers one row per (bias,
shape), the bias type from the `bias` column (empty elsewhere), where the keys are, and the
query / key token counts (lengths from `seqlens` / `kv_seqlens` listed under the table).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

COLUMNS: tuple[str, ...] = (
    "gpu",
    "provider",
    "kind",
    "suite",
    "dtype",
    "batch",
    "seqlen_q",
    "seqlen_k",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "causal",
    "bias",
    "seqlens",
    "kv_seqlens",
    "block_size",
    "ms",
    "tflops",
    "gbps",
    "bw_frac",
    "copy_gbps",
    "check",
    "max_err",
    "status",
    "reason",
    "note",
    "provider_version",
    "git_sha",
    "dsl_version",
    "torch_version",
    "cuda_version",
    "timestamp",
    "command",
)
SHAPE_COLUMNS = ("batch", "seqlen_q", "seqlen_k", "num_heads", "num_kv_heads", "head_dim", "causal")
PROVIDER_ORDER = (
    "sparsek",
    "sparsek_xformers",
    "sdpa_flash",
    "sdpa_cudnn",
    "sdpa_efficient",
    "fa4",
)
SUBJECT = "sparsek"
# sparsek behind another front end: shown in the table, never counted as a peer.
SUBJECT_VARIANTS = frozenset({"sparsek_xformers"})
# Suites with a table of their own (not in the generic throughput table).
VARLEN_SUITE, DECODE_SUITE, XFORMERS_SUITE = "varlen", "decode", "xformers"
OWN_TABLE_SUITES = frozenset({VARLEN_SUITE, DECODE_SUITE, XFORMERS_SUITE})
MAX_REASON_CHARS = 300

Row = dict[str, str]


def clean_text(text: str) -> str:
    """One line, bounded length: reasons end up in CSV cells and table footnotes."""
    flat = " | ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return flat if len(flat) <= MAX_REASON_CHARS else flat[: MAX_REASON_CHARS - 3] + "..."


class CsvWriter:
    """Writes rows as they are measured (flushed), so a run cut short keeps what it measured."""

    def __init__(self, path: Path, *, append: bool = False) -> None:
        exists = append and path.is_file() and path.stat().st_size > 0
        if exists:
            _upgrade_header(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a" if exists else "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="raise")
        if not exists:
            self._writer.writeheader()

    def write(self, row: Row) -> None:
        self._writer.writerow({c: row.get(c, "") for c in COLUMNS})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _upgrade_header(path: Path) -> None:
    """Rewrite a CSV written before a column was added (e.g. `bias`) with today's columns.

    Appending rows of today's columns under an older header would shift every cell after the
    new column; old rows get "" for the new columns instead. Unknown columns are refused.
    """
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        if header == COLUMNS:
            return
        unknown = [c for c in header if c not in COLUMNS]
        if unknown:
            raise ValueError(f"{path}: cannot append, unknown column(s) {unknown}")
        rows = list(reader)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: r.get(c) or "" for c in COLUMNS} for r in rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[Row]:
    """Rows of a results CSV; columns added since it was written read as ""."""
    with path.open(newline="") as f:
        return [
            {c: "" for c in COLUMNS} | {k: v or "" for k, v in r.items()} for r in csv.DictReader(f)
        ]


# ---------------------------------------------------------------------------- markdown


def _providers(rows: Iterable[Row]) -> list[str]:
    present = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def _measured(row: Row | None) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("ms", "") != ""


def _cell(row: Row | None, unit: str) -> str:
    if row is None:
        return ""
    if not _measured(row):
        return "skip"
    ms = float(row["ms"])
    value = {"tflops": float(row["tflops"] or 0.0), "us": ms * 1e3, "ms": ms}[unit]
    text = _number(value)
    return text if row.get("check") != "FAIL" else f"{text} FAIL"


def _number(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _ratio(by_provider: dict[str, Row]) -> tuple[str, str]:
    """(sparsek/best, best peer) from times; '' when either side is missing."""
    subject = by_provider.get(SUBJECT)
    peers = [
        r
        for p, r in by_provider.items()
        if p != SUBJECT and p not in SUBJECT_VARIANTS and _measured(r) and r.get("check") == "ok"
    ]
    if not _measured(subject) or not peers:
        return "", ""
    assert subject is not None
    best = min(peers, key=lambda r: float(r["ms"]))
    ratio = f"{float(best['ms']) / float(subject['ms']):.2f}"
    if subject.get("check") != "ok":
        ratio += " (sparsek FAIL)"
    return ratio, best["provider"]


def _shape_cells(row: Row, with_bias: bool) -> list[str]:
    cells = [row["suite"], row["dtype"]] + [row[c] for c in SHAPE_COLUMNS]
    return [*cells, row.get("bias", "")] if with_bias else cells


def _table(rows: Sequence[Row], kinds: tuple[str, ...], unit: str, ratio: bool) -> list[str]:
    selected = [r for r in rows if r["kind"] in kinds and r["suite"] not in OWN_TABLE_SUITES]
    if not selected:
        return []
    providers = _providers(selected)
    # Rows of one shape differing only in the xFormers bias type are separate table rows.
    with_bias = any(r.get("bias") for r in selected)
    groups: dict[tuple[str, ...], dict[str, Row]] = {}
    for r in selected:
        key = (r["kind"], *_shape_cells(r, with_bias))
        groups.setdefault(key, {})[r["provider"]] = r
    header = ["kind", "suite", "dtype", "B", "Sq", "Sk", "H", "Hkv", "D", "causal"]
    header += [*(["bias"] if with_bias else []), *providers]
    if ratio:
        header += ["sparsek/best", "best peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, by_provider in groups.items():
        cells = list(key) + [_cell(by_provider.get(p), unit) for p in providers]
        if ratio:
            cells += list(_ratio(by_provider))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _provider_table(
    selected: Sequence[Row],
    key_header: list[str],
    key_of: Callable[[Row], tuple[str, ...]],
    cell_of: Callable[[Row | None], str],
    extra_header: list[str] | None = None,
    extra_of: Callable[[dict[str, Row]], list[str]] | None = None,
) -> list[str]:
    """One line per distinct key, one column per provider, then sparsek/best and best peer."""
    providers = _providers(selected)
    groups: dict[tuple[str, ...], dict[str, Row]] = {}
    for r in selected:
        groups.setdefault(key_of(r), {})[r["provider"]] = r
    header = [*key_header, *providers, *(extra_header or []), "sparsek/best", "best peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, by_provider in groups.items():
        cells = [*key, *(cell_of(by_provider.get(p)) for p in providers)]
        cells += extra_of(by_provider) if extra_of else []
        lines.append("| " + " | ".join([*cells, *_ratio(by_provider)]) + " |")
    return lines


def _lengths(row: Row) -> list[int]:
    return [int(n) for n in row.get("seqlens", "").split("+") if n]


def _varlen_lines(rows: Sequence[Row]) -> list[str]:
    selected = [r for r in rows if r["suite"] == VARLEN_SUITE and r["kind"] == "kernel"]
    if not selected:
        return []

    def key_of(r: Row) -> tuple[str, ...]:
        shape = (r["batch"], str(sum(_lengths(r))), r["seqlen_q"], r["num_heads"])
        return (r["dtype"], *shape, r["num_kv_heads"], r["head_dim"], r["causal"])

    header = ["dtype", "seqs", "tokens", "max len", "H", "Hkv", "D", "causal"]
    lines = _provider_table(selected, header, key_of, lambda r: _cell(r, "tflops"))
    lengths = dict.fromkeys(r["seqlens"] for r in selected if r["seqlens"])
    notes = [f"- sequence lengths: {', '.join(text.split('+'))}" for text in lengths]
    return [*lines, "", *notes] if notes else lines


def _keys(row: Row) -> str:
    """Where an xformers row's keys are, from its bias type: dense (BMHK like the queries),
    packed (block-diagonal), a padded cache, or a paged one (with its page size)."""
    bias = row.get("bias", "")
    if bias.startswith("Paged"):
        return f"paged {row.get('block_size', '')}".strip()
    if "PaddedKeys" in bias:
        return "padded"
    return "packed" if bias.startswith("BlockDiagonal") else "dense"


def _xformers_lines(rows: Sequence[Row]) -> list[str]:
    selected = [r for r in rows if r["suite"] == XFORMERS_SUITE and r["kind"] == "kernel"]
    if not selected:
        return []

    def key_of(r: Row) -> tuple[str, ...]:
        batch, seqlen_q, seqlen_k = (int(r[c] or 0) for c in ("batch", "seqlen_q", "seqlen_k"))
        q_tokens = sum(_lengths(r)) if r["seqlens"] else batch * seqlen_q
        k_lengths = [int(n) for n in r.get("kv_seqlens", "").split("+") if n] or _lengths(r)
        k_tokens = sum(k_lengths) if k_lengths else batch * seqlen_k
        shape = (r["batch"], r["seqlen_q"], r["seqlen_k"], str(q_tokens), str(k_tokens))
        heads = (r["num_heads"], r["num_kv_heads"], r["head_dim"], r["causal"])
        return (r["dtype"], r["bias"], _keys(r), *shape, *heads)

    header = ["dtype", "bias", "keys", "B", "Sq", "Sk", "q tok", "k tok", "H", "Hkv", "D"]
    lines = _provider_table(selected, [*header, "causal"], key_of, lambda r: _cell(r, "tflops"))
    notes = [
        "- B = sequences (blocks) for the block-diagonal biases (batch 1 for xFormers); Sq, Sk "
        "their longest query / key lengths; q tok, k tok the tokens attended over."
    ]
    seqlens = dict.fromkeys(r["seqlens"] for r in selected if r["seqlens"])
    notes += [f"- sequence lengths: {', '.join(text.split('+'))}" for text in seqlens]
    kv_seqlens = dict.fromkeys(r["kv_seqlens"] for r in selected if r.get("kv_seqlens"))
    notes += [f"- kv_seqlens (padded / paged keys): {', '.join(t.split('+'))}" for t in kv_seqlens]
    caches = dict.fromkeys(r["note"] for r in selected if r.get("note"))
    notes += [f"- {text}" for text in caches]
    return [*lines, "", *notes]


def _bandwidth_cell(row: Row | None) -> str:
    """GB/s of K + V read, with the fraction of the copy bandwidth in parentheses."""
    if row is None or not _measured(row) or not row.get("gbps"):
        return _cell(row, "us")
    gbps = float(row["gbps"])
    text = f"{gbps:.0f}" if gbps >= 100 else _number(gbps)
    if row.get("bw_frac"):
        text += f" ({float(row['bw_frac']):.2f})"
    return text if row.get("check") != "FAIL" else f"{text} FAIL"


def _subject_us(by_provider: dict[str, Row]) -> list[str]:
    subject = by_provider.get(SUBJECT)
    return [_number(float(subject["ms"]) * 1e3) if _measured(subject) and subject else ""]


def _decode_lines(rows: Sequence[Row]) -> list[str]:
    selected = [r for r in rows if r["suite"] == DECODE_SUITE and r["kind"] == "kernel"]
    if not selected:
        return []

    def key_of(r: Row) -> tuple[str, ...]:
        shape = (r["batch"], r["seqlen_k"], r["num_heads"], r["num_kv_heads"], r["head_dim"])
        return (r["dtype"], *shape, r["block_size"])

    copies = [float(c) for c in dict.fromkeys(r["copy_gbps"] for r in selected) if c]
    copy_text = ", ".join(f"{c:.0f}" for c in copies) or "not measured"
    intro = [
        f"Copy bandwidth (device-to-device, read + write): {copy_text} GB/s. Cells: GB/s of "
        "K + V read (bw_frac). SDPA rows read a dense copy of the cache. Each call is timed "
        "as a CUDA-graph replay after an L2 flush (no host gaps between its kernels).",
        *_eager_notes(selected),
        "",
    ]
    header = ["dtype", "B", "context", "H", "Hkv", "D", "block"]
    lines = _provider_table(selected, header, key_of, _bandwidth_cell, ["sparsek us"], _subject_us)
    return [*intro, *lines]


def _eager_notes(rows: Sequence[Row]) -> list[str]:
    """Decode rows timed with eager launches because their provider could not be captured."""
    eager = (r for r in rows if "eager" in r.get("note", ""))
    notes = dict.fromkeys(f"{r['provider']}: {r['note']}" for r in eager)
    return [f"- {note}" for note in notes]


def _skip_notes(rows: Sequence[Row]) -> list[str]:
    counts = Counter((r["provider"], r["reason"]) for r in rows if r.get("status") != "ok")
    return [f"- {p} ({n} rows): {reason}" for (p, reason), n in sorted(counts.items())]


def _first_call_lines(rows: Sequence[Row]) -> list[str]:
    selected = [r for r in rows if r["kind"] in ("cold_first_call", "warm_first_call")]
    if not selected:
        return []
    lines = [
        "| kind | dtype | B | Sq | Sk | H | D | causal | ms | check | note |",
        "|" + "---|" * 11,
    ]
    for r in selected:
        ms = f"{float(r['ms']):.1f}" if _measured(r) else "skip"
        shape = [r["dtype"], r["batch"], r["seqlen_q"], r["seqlen_k"], r["num_heads"]]
        cells = [r["kind"], *shape, r["head_dim"], r["causal"], ms, r["check"], r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _distinct(rows: Sequence[Row], column: str) -> str:
    return ", ".join(dict.fromkeys(r[column] for r in rows))


def markdown(rows: Sequence[Row]) -> str:
    """The whole report: header naming GPU / versions / command, then one table per kind."""
    if not rows:
        return "(no rows)\n"
    head = [
        "# sparsek FMHA forward benchmark",
        "",
        f"- GPU: {_distinct(rows, 'gpu')}",
        f"- git sha: {_distinct(rows, 'git_sha')}; DSL {_distinct(rows, 'dsl_version')}; "
        f"torch {_distinct(rows, 'torch_version')} (CUDA {_distinct(rows, 'cuda_version')})",
        "- command: " + "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows)),
        "- cells: TFLOP/s (kernel), us per call (eager, graph), ms (first call), GB/s of K + V "
        "read (decode); `FAIL` = output check failed; sparsek/best = best peer time / sparsek "
        "time (> 1: sparsek faster)",
        "",
    ]
    sections = [
        (
            "## Throughput: kernel time, cold L2 (TFLOP/s)",
            _table(rows, ("kernel",), "tflops", True),
        ),
        (
            "## Latency: wall time per call, back-to-back (us)",
            _table(rows, ("eager", "graph"), "us", True),
        ),
        ("## Varlen prefill: kernel time, cold L2 (TFLOP/s)", _varlen_lines(rows)),
        (
            "## xFormers bias types (xformers suite): kernel time, cold L2 (TFLOP/s)",
            _xformers_lines(rows),
        ),
        (
            "## Decode, paged KV cache: kernel time, cold L2 (GB/s of K + V read, bw_frac)",
            _decode_lines(rows),
        ),
        ("## First call of a fresh process (ms)", _first_call_lines(rows)),
        ("## Skipped", _skip_notes(rows)),
    ]
    body: list[str] = []
    for title, lines in sections:
        if lines:
            body += [title, "", *lines, ""]
    return "\n".join(head + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="markdown table from results CSV(s)")
    parser.add_argument("csv", type=Path, nargs="+", help="results.csv files (concatenated)")
    parser.add_argument("--md", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    text = markdown([row for path in args.csv for row in read_csv(path)])
    if args.md:
        args.md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
