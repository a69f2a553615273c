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
query / key token counts (lengths from `seqlens` / `kv_seqlens` listed under the table, and
the local biases' windows from the `mask` column).

The masks suite (`mask` column: "window=(4096, 0)", "softcap=30", "sinks", "" for none) gets
a prefill table (ms per call, TFLOP/s), a decode table (us per call, GB/s of the K + V the
call must read, `kv_bytes`) and a targets table: each masked row's ratio against the same
problem without the mask and against its peers, beside the target it is measured for
(`MASK_TARGETS`).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
    "mask",
    "seqlens",
    "kv_seqlens",
    "block_size",
    "ms",
    "tflops",
    "kv_bytes",
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
    "fa3",
)
SUBJECT = "sparsek"
# sparsek behind another front end: shown in the table, never counted as a peer.
SUBJECT_VARIANTS = frozenset({"sparsek_xformers"})
# Suites with a table of their own (not in the generic throughput table).
VARLEN_SUITE, DECODE_SUITE, XFORMERS_SUITE, MASKS_SUITE = "varlen", "decode", "xformers", "masks"
OWN_TABLE_SUITES = frozenset({VARLEN_SUITE, DECODE_SUITE, XFORMERS_SUITE, MASKS_SUITE})
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
    windows = dict.fromkeys((r["bias"], r["mask"], r["causal"]) for r in selected if r.get("mask"))
    notes += [_window_note(*window) for window in windows]
    return [*lines, "", *notes]


def _window_note(bias: str, mask: str, causal: str) -> str:
    """A local bias's window, as sparsek's window_size and as xFormers' arguments."""
    match = re.fullmatch(r"window=\((-?\d+), (-?\d+)\)", mask)
    if match is None:
        return f"- {bias}: {mask}"
    left, right = int(match[1]), int(match[2])
    xformers = (
        f"window_size={left + 1}"
        if causal == "True"
        else f"window_left={left}, window_right={right}"
    )
    return f"- {bias}: {xformers} (sparsek window_size=({left}, {right}))"


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


# ---------------------------------------------------------------------------- masks suite


@dataclass(frozen=True)
class MaskTarget:
    """One ratio the masks suite reports for a masked row (`feature`: "window", "softcap" or
    "sinks"; `decode`: the paged decode rows, else the dense prefill rows).

    `against` "plain": sparsek with the mask against sparsek on the same problem without
    it, as `masked_over_plain` says (True: masked time / plain time, lower is better; False:
    plain time / masked time, the speed kept, higher is better). Otherwise a peer's name:
    the peer's time / sparsek's time on the masked problem (> 1: sparsek faster). `bound`
    None: no target, shown beside the others."""

    feature: str
    decode: bool
    against: str
    bound: float | None
    masked_over_plain: bool = False

    def describe(self) -> str:
        if self.against != "plain":
            return f"{self.against} time / sparsek time"
        if self.masked_over_plain:
            return f"sparsek time with / without {self.feature}"
        return f"sparsek time without / with {self.feature}"

    def target_text(self) -> str:
        if self.bound is None:
            return "-"
        return f"{'<=' if self.masked_over_plain else '>='} {self.bound:g}"

    def met(self, value: float) -> bool:
        assert self.bound is not None
        return value <= self.bound if self.masked_over_plain else value >= self.bound


MASK_TARGETS: tuple[MaskTarget, ...] = (
    MaskTarget("window", False, "plain", 0.30, masked_over_plain=True),
    MaskTarget("window", False, "fa4", 1.0),
    MaskTarget("window", False, "fa3", None),
    MaskTarget("softcap", False, "plain", 0.95),
    MaskTarget("softcap", False, "fa4", 1.0),
    MaskTarget("softcap", False, "fa3", None),
    MaskTarget("sinks", False, "plain", 0.98),
    MaskTarget("sinks", False, "fa4", None),
    MaskTarget("sinks", False, "fa3", None),
    MaskTarget("window", True, "plain", 6.0),
    MaskTarget("window", True, "fa4", None),
    MaskTarget("window", True, "fa3", None),
)


def _is_decode(row: Row) -> bool:
    return bool(row.get("block_size")) and row.get("seqlen_q") == "1"


def _features(row: Row) -> tuple[str, ...]:
    """The mask's features from the `mask` column ("window=(4096, 0) softcap=30" ->
    ("window", "softcap")); () for none."""
    text = row.get("mask", "").replace(", ", ",")
    return tuple(part.split("=")[0] for part in text.split())


def _problem(row: Row) -> tuple[str, ...]:
    """A masks row's problem without its mask: rows with equal problems are compared."""
    dims = ("dtype", "batch", "seqlen_q", "seqlen_k", "num_heads", "num_kv_heads", "head_dim")
    return (*(row[c] for c in dims), row["causal"], row.get("block_size", ""))


def _problem_text(row: Row) -> str:
    heads = f"H{row['num_heads']}"
    if row["num_kv_heads"] != row["num_heads"]:
        heads += f"/Hkv{row['num_kv_heads']}"
    if _is_decode(row):
        size = f"ctx{row['seqlen_k']}"
        mask = f"page{row['block_size']}"
    else:
        size = f"S{row['seqlen_q']}"
        if row["seqlen_q"] != row["seqlen_k"]:
            size = f"Sq{row['seqlen_q']}/Sk{row['seqlen_k']}"
        mask = "causal" if row["causal"] == "True" else "non-causal"
    return f"B{row['batch']} {size} {heads} d{row['head_dim']} {mask}"


def _time_cell(row: Row | None, decode: bool) -> str:
    """Prefill: ms (TFLOP/s); decode: us (GB/s of the K + V the call must read)."""
    if row is None or not _measured(row):
        return _cell(row, "ms")
    ms = float(row["ms"])
    rate = row.get("gbps" if decode else "tflops", "")
    text = _number(ms * 1e3) if decode else f"{ms:.3g}"
    if rate:
        value = float(rate)
        text += f" ({value:.0f})" if value >= 100 else f" ({_number(value)})"
    return text if row.get("check") != "FAIL" else f"{text} FAIL"


def _masks_lines(rows: Sequence[Row]) -> list[str]:
    selected = [r for r in rows if r["suite"] == MASKS_SUITE and r["kind"] == "kernel"]
    if not selected:
        return []
    prefill = [r for r in selected if not _is_decode(r)]
    decode = [r for r in selected if _is_decode(r)]
    lines = [
        "Times per call after an L2 flush. Prefill cells: ms (TFLOP/s; a window counts the "
        "pairs of its band). Decode cells: us (GB/s of the K + V the call must read: a "
        "window's pages only), each call a CUDA-graph replay. Every output is checked "
        "against sparsek's float64 reference (`FAIL` marks a failed check).",
        "",
    ]
    if prefill:

        def prefill_key(r: Row) -> tuple[str, ...]:
            dims = (r["batch"], r["seqlen_q"], r["seqlen_k"], r["num_heads"], r["num_kv_heads"])
            return (r["dtype"], *dims, r["head_dim"], r["causal"], r["mask"] or "none")

        header = ["dtype", "B", "Sq", "Sk", "H", "Hkv", "D", "causal", "mask"]
        lines += _provider_table(prefill, header, prefill_key, lambda r: _time_cell(r, False))
        lines.append("")
    if decode:
        # The bytes to read, written on measured rows only: one value per (problem, mask).
        kv_bytes = {(_problem(r), r["mask"]): r["kv_bytes"] for r in decode if r.get("kv_bytes")}

        def decode_key(r: Row) -> tuple[str, ...]:
            dims = (r["batch"], r["seqlen_k"], r["num_heads"], r["num_kv_heads"], r["head_dim"])
            nbytes = kv_bytes.get((_problem(r), r["mask"]), "")
            kv_mb = _number(int(nbytes) / 1e6) if nbytes else ""
            return (r["dtype"], *dims, r["block_size"], r["mask"] or "none", kv_mb)

        header = ["dtype", "B", "context", "H", "Hkv", "D", "block", "mask", "K+V MB read"]
        lines += _provider_table(decode, header, decode_key, lambda r: _time_cell(r, True))
        lines.append("")
    notes = dict.fromkeys(r["note"] for r in selected if r.get("note"))
    lines += [f"- {text}" for text in notes] + ([""] if notes else [])
    return [*lines, *_mask_target_lines(selected)]


def _mask_target_lines(rows: Sequence[Row]) -> list[str]:
    """Each masked row's ratios (MASK_TARGETS) beside their targets."""
    problems: dict[tuple[str, ...], dict[tuple[str, ...], dict[str, Row]]] = {}
    for r in rows:
        problems.setdefault(_problem(r), {}).setdefault(_features(r), {})[r["provider"]] = r
    present = {r["provider"] for r in rows}
    lines = [
        "### Targets",
        "",
        "| mask | problem | ratio | measured | target | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for by_mask in problems.values():
        plain = by_mask.get((), {})
        for features, masked in by_mask.items():
            if len(features) != 1:
                continue
            any_row = next(iter(masked.values()))
            decode = _is_decode(any_row)
            mask, problem = any_row["mask"], _problem_text(any_row)
            for target in MASK_TARGETS:
                if target.feature != features[0] or target.decode != decode:
                    continue
                if target.against != "plain" and target.against not in present:
                    continue
                cells = _target_cells(target, masked, plain)
                lines.append(f"| {mask} | {problem} | {target.describe()} | {cells} |")
            if "window" in features:
                cells = _bytes_cells(masked, plain) if decode else _pairs_cells(masked, plain)
                lines.append(f"| {mask} | {problem} | {cells} |")
    return lines if len(lines) > 4 else []


def _target_cells(target: MaskTarget, masked: dict[str, Row], plain: dict[str, Row]) -> str:
    """The "measured | target | verdict" cells of one target."""
    if target.against == "plain":
        first, second = (masked, plain) if target.masked_over_plain else (plain, masked)
        numerator, denominator = first.get(SUBJECT), second.get(SUBJECT)
    else:
        numerator, denominator = masked.get(target.against), masked.get(SUBJECT)
    if not (_measured(numerator) and _measured(denominator)):
        return f"skip | {target.target_text()} | not measured"
    assert numerator is not None and denominator is not None
    value = float(numerator["ms"]) / float(denominator["ms"])
    verdict = "-" if target.bound is None else ("met" if target.met(value) else "missed")
    failed = [r["provider"] for r in (numerator, denominator) if r.get("check") != "ok"]
    if failed:
        verdict += f" ({', '.join(dict.fromkeys(failed))} check FAIL)"
    return f"{value:.2f} | {target.target_text()} | {verdict}"


def _work(rows: dict[str, Row]) -> float | None:
    """FLOPs of a problem, up to a constant: TFLOP/s x ms of any measured row."""
    row = next((r for r in rows.values() if _measured(r) and r.get("tflops")), None)
    return float(row["tflops"]) * float(row["ms"]) if row else None


def _pairs_cells(masked: dict[str, Row], plain: dict[str, Row]) -> str:
    """The "ratio | measured | target | verdict" cells of the (query, key) pairs a dense
    window leaves visible against the same problem without it."""
    ratio = "visible pairs with / without window (the time ratio at equal TFLOP/s)"
    with_window, without = _work(masked), _work(plain)
    if not (with_window and without):
        return f"{ratio} | | - | -"
    return f"{ratio} | {with_window / without:.2f} | - | -"


def _bytes_cells(masked: dict[str, Row], plain: dict[str, Row]) -> str:
    """The "ratio | measured | target | verdict" cells of the K + V bytes a windowed
    decode must read against the same decode without the window."""
    ratio = "K + V bytes to read without / with window (the speed-up at equal bandwidth)"
    with_window = next((r["kv_bytes"] for r in masked.values() if r.get("kv_bytes")), "")
    without = next((r["kv_bytes"] for r in plain.values() if r.get("kv_bytes")), "")
    if not (with_window and without):
        return f"{ratio} | | - | -"
    return f"{ratio} | {int(without) / int(with_window):.2f} | - | -"


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
        (
            "## Masks (masks suite): window, softcap and sinks against the same problem "
            "without them and against peers",
            _masks_lines(rows),
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
