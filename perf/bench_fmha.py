"""Benchmark sparsek's attention forward beside PyTorch SDPA backends and FlashAttention-4.

    python perf/bench_fmha.py --out perf/results/h100          # full run on a GPU
    python perf/bench_fmha.py --list                           # planned rows, no GPU needed
    python perf/bench_fmha.py --dry-run                        # fake providers on CPU tensors
    python perf/bench_fmha.py --suites varlen,decode --out DIR # packed prefill, paged decode
    python perf/bench_fmha.py --suites xformers --out DIR      # opt-in: xFormers bias rows
    python perf/bench_fmha.py --suites masks --out DIR         # opt-in: window, softcap, sinks

Writes <out>/results.csv (one row per shape x provider x kind, flushed as measured) and
<out>/table.md (also printed). See perf/README.md for what each kind measures.

The decode suite also measures the GPU's device-to-device copy bandwidth once per run (before
its first case) and reports each row's K + V read bandwidth against it (`bw_frac`).

The xformers suite (provider sparsek_xformers) is opt-in and refused together with fa4:
xFormers and FlashAttention-4 cannot be imported in one process.

The masks suite is opt-in: sliding window, softcap and sinks on sparsek beside the same
problem without them, FA4 and FlashAttention-3 (provider fa3, this suite only), each output
checked against sparsek's float64 reference; its table puts each target's ratio beside the
target.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from perf import shapes  # noqa: E402
from perf.shapes import ALL_PROVIDERS, ALL_SUITES, SUITES, Case  # noqa: E402

if TYPE_CHECKING:
    import torch

    from perf.env_info import RunInfo
    from perf.inputs import Inputs
    from perf.providers import Provider
    from perf.reference import CheckResult, Reference
    from perf.report import CsvWriter

DTYPES = tuple(shapes.DTYPE_BYTES)
# Device-to-device copy measured once per run for the decode suite's bw_frac: source and
# destination of 2 GiB each, far past H100's 50 MiB L2 (CPU dry run: 16 MiB).
COPY_BYTES_CUDA = 2 * 1024**3
COPY_BYTES_CPU = 16 * 1024**2
# PyTorch explains a refusal of SDPA on nested (jagged) tensors on this logger, not as a
# warning; its records are appended to the skip reason like SDPA's warnings.
NESTED_SDPA_LOGGER = "torch.nested._internal.sdpa"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="output directory (results.csv, table.md)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument(
        "--providers",
        help=f"comma list of providers (known: {', '.join(ALL_PROVIDERS)}); default: "
        f"{', '.join(shapes.PROVIDERS)}, or {', '.join(shapes.XFORMERS_SUITE_PROVIDERS)} "
        f"when the xformers suite is asked for; {shapes.FA3_PROVIDER} is added with the "
        "masks or head_dims suite (the only suites it plays in)",
    )
    p.add_argument(
        "--suites",
        default=",".join(SUITES),
        help=f"comma list of suites (known: {', '.join(ALL_SUITES)}); default: "
        f"{', '.join(SUITES)} (xformers and masks are opt-in; xformers cannot run with fa4)",
    )
    p.add_argument("--quick", action="store_true", help="a few shapes of every suite")
    p.add_argument("--list", action="store_true", help="print the planned rows and exit")
    p.add_argument("--dry-run", action="store_true", help="fake providers, CPU, tiny shapes")
    p.add_argument("--append", action="store_true", help="append to an existing results.csv")
    p.add_argument("--git-sha", help="record this sha (when running from a copy without .git)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-ms", type=float, default=25.0, help="kernel rows: warm-up time")
    p.add_argument("--rep-ms", type=float, default=100.0, help="kernel rows: timed span")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each case's providers this many times, in rounds with the provider order\n"
        "rotated, and record each one's median (rows move a few %% between contexts)",
    )
    p.add_argument(
        "--l2-flush",
        choices=("read", "write"),
        default="read",
        help="how the L2 is emptied before each timed kernel call (perf.timing.L2_FLUSHES)",
    )
    p.add_argument(
        "--deadline-s",
        type=float,
        default=0.0,
        help="stop measuring after this many seconds (rows left are recorded as not run)",
    )
    args = p.parse_args(argv)
    args.suites = _split(p, args.suites, ALL_SUITES, "suite")
    if args.providers is None:
        args.providers = shapes.default_providers(args.suites)
    else:
        args.providers = _split(p, args.providers, ALL_PROVIDERS, "provider")
    conflict = shapes.conflict(args.suites, args.providers)
    if conflict:
        p.error(conflict)
    if not (args.list or args.dry_run or args.out):
        p.error("--out is required for a measured run (or use --list / --dry-run)")
    return args


def _split(
    parser: argparse.ArgumentParser, text: str, known: tuple[str, ...], what: str
) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown {what}(s) {unknown}; known: {', '.join(known)}")
    return names


def plan(args: argparse.Namespace) -> list[Case]:
    if args.dry_run:
        cases = shapes.dry_run_cases()
    elif args.quick:
        cases = shapes.quick_cases()
    else:
        cases = shapes.full_cases()
    return shapes.select(cases, args.suites)


def print_plan(cases: list[Case], providers: tuple[str, ...], dtype: str) -> None:
    fields = (
        "suite",
        "kind",
        "provider",
        "dtype",
        "B",
        "Sq",
        "Sk",
        "H",
        "Hkv",
        "D",
        "causal",
        "bias",
        "mask",
        "block_size",
        "seqlens",
        "kv_seqlens",
        "kv_padding",
    )
    print("\t".join((*fields, "GFLOP", "KV_MB")))
    count = 0
    for case in cases:
        for provider in shapes.providers_for(case, providers):
            for kind in case.kinds:
                dims = (case.batch, case.seqlen_q, case.seqlen_k, case.num_heads, case.num_kv_heads)
                gflop = f"{shapes.flops(case) / 1e9:.1f}"
                kv_mb = f"{shapes.kv_bytes(case, shapes.DTYPE_BYTES[dtype]) / 1e6:.1f}"
                print(
                    "\t".join(
                        str(x)
                        for x in (
                            case.suite,
                            kind,
                            provider,
                            dtype,
                            *dims,
                            case.dims_text,
                            case.causal,
                            case.bias,
                            case.mask_text,
                            case.block_size or "",
                            _seqlens_text(case),
                            _seqlens_text(case, keys=True),
                            case.kv_padding or "",
                            gflop,
                            kv_mb,
                        )
                    )
                )
                count += 1
    print(f"# {count} rows, {len(cases)} shapes, providers: {', '.join(providers)}")


class Progress:
    """One status line on stderr: redrawn in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, width: int = 24) -> None:
        self.total = max(total, 1)
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = int(time.perf_counter() - self.start)
        self.done += 1
        line = f"[{bar}] {self.done}/{self.total} {elapsed // 60}m{elapsed % 60:02d}s {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(("\n" if self.tty else "") + f"done in {elapsed:.0f} s\n")


class Runner:
    """Measures every (case, provider, kind) of the plan and writes one CSV row for each."""

    def __init__(
        self,
        args: argparse.Namespace,
        info: RunInfo,
        providers: dict[str, Provider],
        writer: CsvWriter,
        device: torch.device,
    ) -> None:
        import torch

        self.args = args
        self.info = info
        self.providers = providers
        self.writer = writer
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.unavailable = {name: p.unavailable() for name, p in providers.items()}
        self.broken = ""  # set when a CUDA error leaves the context unusable
        self.deadline = time.perf_counter() + args.deadline_s if args.deadline_s > 0 else None
        # GB/s of a large device-to-device copy (read + write), measured before the first
        # decode case; None until then, 0.0 if it could not be measured.
        self.copy_gbps: float | None = None

    # ------------------------------------------------------------------ rows

    def _row(self, case: Case, provider: str, kind: str, **fields: Any) -> None:
        row = {
            "gpu": self.info.gpu,
            "provider": provider,
            "kind": kind,
            "suite": case.suite,
            "dtype": self.args.dtype,
            "batch": case.batch,
            "seqlen_q": case.seqlen_q,
            "seqlen_k": case.seqlen_k,
            "num_heads": case.num_heads,
            "num_kv_heads": case.num_kv_heads,
            "head_dim": case.dims_text,  # "192/128" where V's differs
            "causal": case.causal,
            "bias": case.bias,
            "mask": case.mask_text,
            "seqlens": _seqlens_text(case),
            "kv_seqlens": _seqlens_text(case, keys=True),
            "block_size": case.block_size or None,
            "note": _case_note(case),
            "git_sha": self.info.git_sha,
            "dsl_version": self.info.dsl_version,
            "torch_version": self.info.torch_version,
            "cuda_version": self.info.cuda_version,
            "command": self.info.command,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"),
            **fields,
        }
        self.writer.write({k: _fmt(v) for k, v in row.items()})

    def _skip(self, case: Case, provider: str, kinds: tuple[str, ...], reason: str) -> None:
        from perf.report import clean_text

        for kind in kinds:
            self._row(case, provider, kind, status="skipped", reason=clean_text(reason))

    def _measured(
        self,
        case: Case,
        provider: str,
        kind: str,
        ms: float,
        check: CheckResult,
        version: str,
        note: str = "",
    ) -> None:
        from perf.report import clean_text

        tflops = shapes.flops(case) / (ms * 1e-3) / 1e12
        if note:
            note = "; ".join(filter(None, (_case_note(case), clean_text(note))))
        self._row(
            case,
            provider,
            kind,
            ms=f"{ms:.6g}",
            tflops=f"{tflops:.4g}",
            check=check.label,
            max_err=f"{check.max_err:.3g}",
            status="ok",
            provider_version=version,
            **self._bandwidth_fields(case, ms),
            **({"note": note} if note else {}),
        )

    def _bandwidth_fields(self, case: Case, ms: float) -> dict[str, str]:
        """Decode rows (decode suite, masks decode): the K + V bytes the call must read (a
        window's pages only), their read bandwidth, and its fraction of the measured copy
        bandwidth."""
        if not case.is_decode:
            return {}
        nbytes = shapes.kv_bytes(case, shapes.DTYPE_BYTES[self.args.dtype])
        gbps = shapes.bandwidth_gbps(nbytes, ms)
        fields = {"kv_bytes": str(nbytes), "gbps": f"{gbps:.4g}"}
        if self.copy_gbps:
            fields |= {
                "bw_frac": f"{gbps / self.copy_gbps:.3g}",
                "copy_gbps": f"{self.copy_gbps:.4g}",
            }
        return fields

    # ------------------------------------------------------------------ loop

    def _not_run_reason(self) -> str:
        if self.broken:
            return f"not run: CUDA context unusable after an earlier error ({self.broken})"
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return f"not run: --deadline-s {self.args.deadline_s:g} reached"
        return ""

    def run(self, cases: list[Case], progress: Progress) -> None:
        for index, case in enumerate(cases):
            names = shapes.providers_for(case, self.args.providers)
            if not names:
                continue
            if case.suite == "first_call":
                progress.step(f"{case.label()} sparsek (fresh processes)")
                self._first_call(case)
                continue
            self._run_case(index, case, names, progress)

    def _run_case(self, index: int, case: Case, names: tuple[str, ...], progress: Progress) -> None:
        import torch

        from perf.inputs import expected, make_inputs

        if case.is_decode and self.copy_gbps is None:
            self._measure_copy_bandwidth()
        inputs: Inputs | None = None
        ref: Reference | None = None
        ready: list[tuple[str, Callable[[], object], CheckResult, str]] = []
        for name in names:
            progress.step(f"{case.label()} {name}")
            reason = self._not_run_reason() or self.unavailable[name] or ""
            if not reason and inputs is None:
                try:
                    # Fresh torch.randn inputs (never zeros), seeded per case.
                    inputs = make_inputs(case, self.dtype, self.device, self.args.seed + index)
                    ref = expected(case, inputs)
                except Exception as exc:
                    reason = f"reference failed: {_describe(exc)}"
                    self._after_error(reason)
            if reason or inputs is None or ref is None:
                self._skip(case, name, case.kinds, reason)
                continue
            prepared = self._prepare(case, self.providers[name], inputs, ref)
            if prepared is not None:
                ready.append((name, *prepared))
        self._time_rounds(case, ready)
        del inputs, ref, ready
        if self.device.type == "cuda" and not self.broken:
            torch.cuda.empty_cache()

    def _measure_copy_bandwidth(self) -> None:
        """Once per run: GB/s (bytes read + written) of a large device-to-device copy."""
        from perf import timing

        nbytes = COPY_BYTES_CUDA if self.device.type == "cuda" else COPY_BYTES_CPU
        try:
            self.copy_gbps = timing.copy_bandwidth_gbps(
                self.device,
                nbytes,
                warmup_ms=self.args.warmup_ms,
                rep_ms=self.args.rep_ms,
                l2_flush=self.args.l2_flush,
            )
        except Exception as exc:
            self.copy_gbps = 0.0
            self._after_error(_describe(exc))
            print(f"copy bandwidth not measured ({_describe(exc)}): no bw_frac", file=sys.stderr)
            return
        size = f"{nbytes / 1024**2:.0f} MiB"
        print(f"copy bandwidth: {self.copy_gbps:.0f} GB/s ({size} copy)", file=sys.stderr)

    def _prepare(
        self, case: Case, provider: Provider, inputs: Inputs, ref: Reference
    ) -> tuple[Callable[[], object], CheckResult, str] | None:
        """The provider's call on these inputs, its output check and version (its first
        call, which also compiles, is checked against `ref`); None (rows skipped) if it
        fails."""
        from perf.providers import measuring, prepare_inputs
        from perf.reference import check

        with measuring(provider):
            caught: list[warnings.WarningMessage] = []
            logged: list[str] = []
            try:
                fn = prepare_inputs(provider, case, inputs)
                # The first call also compiles (sparsek, FA4); its warnings explain refusals
                # (SDPA says why each backend was not used).
                with warnings.catch_warnings(record=True) as caught, _logged(logged):
                    warnings.simplefilter("always")
                    out = fn()
                    self._sync()
                result = check(out, ref, self.dtype)
                del out
                return fn, result, provider.version()
            except Exception as exc:
                hints = "; ".join(dict.fromkeys([*(str(w.message) for w in caught), *logged]))
                reason = _describe(exc) + (f" [warnings: {hints}]" if hints else "")
                self._after_error(reason)
                self._skip(case, provider.name, case.kinds, reason)
                return None

    def _time_rounds(
        self, case: Case, ready: list[tuple[str, Callable[[], object], CheckResult, str]]
    ) -> None:
        """Time every prepared provider and kind `--repeat` times, one round after another
        with the provider order rotated by one each round, and record the medians."""
        from perf.providers import measuring

        times: dict[tuple[str, str], list[float]] = {}
        notes: dict[tuple[str, str], str] = {}
        failed: set[tuple[str, str]] = set()
        for round_index in range(max(self.args.repeat, 1)):
            shift = round_index % max(len(ready), 1)
            for name, fn, _, _ in ready[shift:] + ready[:shift]:
                for kind in case.kinds:
                    if (name, kind) in failed:
                        continue
                    try:
                        with measuring(self.providers[name]):
                            if kind == "kernel" and case.is_decode:
                                ms, note = self._time_replayed(fn)
                            else:
                                ms, note = self._time(kind, fn), ""
                    except Exception as exc:
                        reason = _describe(exc)
                        self._after_error(reason)
                        self._skip(case, name, (kind,), reason)
                        failed.add((name, kind))
                        continue
                    times.setdefault((name, kind), []).append(ms)
                    notes[(name, kind)] = note or notes.get((name, kind), "")
        for name, _, check, version in ready:
            for kind in case.kinds:
                if (name, kind) in times and (name, kind) not in failed:
                    ms = statistics.median(times[(name, kind)])
                    self._measured(case, name, kind, ms, check, version, notes[(name, kind)])

    def _time_replayed(self, fn: Callable[[], object]) -> tuple[float, str]:
        """Decode rows: a call is a few short kernels (split-KV + combine) whose event-timed
        eager launches would count the host's gaps between them, so each call is timed as a
        CUDA-graph replay; a provider that cannot be captured is timed eagerly, with a note."""
        from perf import timing

        try:
            return timing.time_kernel(
                fn,
                self.device,
                warmup_ms=self.args.warmup_ms,
                rep_ms=self.args.rep_ms,
                graph=True,
                l2_flush=self.args.l2_flush,
            ), ""
        except Exception as exc:
            self._after_error(_describe(exc))
            if self.broken:
                raise
            note = f"eager launches (CUDA graph capture failed: {_describe(exc)})"
            return self._time("kernel", fn), note

    def _time(self, kind: str, fn: Callable[[], object]) -> float:
        from perf import timing

        if kind == "kernel":
            return timing.time_kernel(
                fn,
                self.device,
                warmup_ms=self.args.warmup_ms,
                rep_ms=self.args.rep_ms,
                l2_flush=self.args.l2_flush,
            )
        if kind == "eager":
            return timing.time_eager(fn, self.device)
        if kind == "graph":
            return timing.time_graph(fn, self.device)
        raise ValueError(f"unknown measurement kind {kind!r}")

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _after_error(self, reason: str) -> None:
        """After an exception, make sure the CUDA context still works (else stop measuring)."""
        import torch

        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        except Exception as exc:
            self.broken = f"{reason} -> {_describe(exc)}"

    def _first_call(self, case: Case) -> None:
        from perf import first_call

        reason = self._not_run_reason()
        if reason:
            self._skip(case, "sparsek", case.kinds, reason)
            return
        version = "" if self.args.dry_run else _sparsek_version()
        results = first_call.measure(
            case, self.args.dtype, fake=self.args.dry_run, timeout_s=first_call.CHILD_TIMEOUT_S
        )
        for r in results:
            if r.error or r.ms is None:
                self._skip(case, "sparsek", (r.kind,), r.error)
                continue
            self._row(
                case,
                "sparsek",
                r.kind,
                ms=f"{r.ms:.6g}",
                check=r.check,
                max_err=f"{r.max_err:.3g}",
                status="ok",
                note=r.note,
                provider_version=version,
            )


def _fmt(value: object) -> str:
    return str(value) if value is not None else ""


def _seqlens_text(case: Case, keys: bool = False) -> str:
    """varlen, block-diagonal biases: the packed sequences' lengths joined by "+" (their sum
    is the token count); with `keys`, the padded / paged keys' kv_seqlens ("" elsewhere)."""
    return "+".join(str(n) for n in (case.kv_seqlens if keys else case.seqlens))


def _case_note(case: Case) -> str:
    """xformers suite, padded / paged keys: the cache the keys are read from; masks suite:
    the inputs' q scale and the rows the float64 reference checks."""
    if case.suite == shapes.MASKS_SUITE:
        blocks = shapes.masks_check_rows(case)
        rows = ", ".join(f"{a}-{b - 1}" for a, b in blocks) if blocks else "all"
        return f"q x{shapes.MASKS_Q_SCALE:g}; checked rows: {rows} (float64 reference)"
    if case.keys == "padded":
        return f"keys: padded cache, {case.batch} x {case.kv_padding} slots"
    if case.keys == "paged":
        pages = case.batch * case.kv_padding // case.block_size
        return (
            f"keys: paged cache, {pages} pages of {case.block_size} in random order, "
            f"{case.kv_padding // case.block_size} per sequence"
        )
    return ""


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@contextlib.contextmanager
def _logged(sink: list[str]) -> Iterator[None]:
    """Collect the warnings PyTorch logs about nested-tensor SDPA backend choices."""
    logger = logging.getLogger(NESTED_SDPA_LOGGER)
    handler = _ListHandler(sink)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _sparsek_version() -> str:
    try:
        import sparsek

        return str(sparsek.__version__)
    except Exception:
        return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = plan(args)
    if args.list:
        print_plan(cases, args.providers, args.dtype)
        return 0

    import torch

    from perf import env_info, providers, report

    if args.dry_run:
        device = torch.device("cpu")
        registry = providers.fake_providers()
        out_dir = args.out or Path(tempfile.gettempdir()) / "sparsek-perf-dry-run"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --list or --dry-run on this machine", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        registry = providers.real_providers()
        out_dir = args.out
    chosen = {name: registry[name] for name in args.providers}
    info = env_info.collect(dry_run=args.dry_run, sha_override=args.git_sha)
    csv_path = out_dir / "results.csv"
    writer = report.CsvWriter(csv_path, append=args.append)
    total = sum(len(shapes.providers_for(c, args.providers)) for c in cases)
    progress = Progress(total)
    print(
        f"{info.gpu} | {args.dtype} | {total} (shape, provider) pairs -> {csv_path}",
        file=sys.stderr,
    )
    try:
        Runner(args, info, chosen, writer, device).run(cases, progress)
    finally:
        writer.close()
        progress.finish()
    table = report.markdown(report.read_csv(csv_path))
    (out_dir / "table.md").write_text(table)
    print(table)
    print(f"wrote {csv_path} and {out_dir / 'table.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
