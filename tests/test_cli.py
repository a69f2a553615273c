"""`sparsek` / `python -m sparsek` commands, mostly with the default cache swapped for a
fake-compiler cache (the tests marked `slow` compile a few kernels with the real DSL).

Compared against: the documented command behaviour (`sparsek.cli`, `sparsek.precompile`,
`sparsek.demo`): a summary line (one line per kernel with -v), exit status, filters that
select exactly the kernels of a head dim, dtype or path; one message and no compile where
the cache cannot be written; Ctrl-C ends with one line, status 130 and no unfinished entry;
`--help` and `--version` without torch; `info` and `info --json` agree with the registry
and the cache; the demo compiles only its own kernels and compares with torch's SDPA;
cache listing with sizes, ages and states, pruning stale entries, clearing only what
sparsek wrote.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from fake_toolchain import FakeCompiler

import sparsek
from cutedsl_kernels.config import FP8_DTYPE, SUPPORTED_DTYPES, FmhaFwdConfig
from sparsek import cache, cli, demo, precompile, registry, tuning
from sparsek.cache import KernelCache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCompiler:
    src = tmp_path / "k.py"
    src.write_text("# kernel\n")
    compiler = FakeCompiler(tmp_path / "log", [src])
    monkeypatch.setenv("SPARSEK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_default", KernelCache(None, compiler.toolchain()))
    # The fake compiler lives in this process: `compile` without --jobs compiles here too.
    monkeypatch.setattr(precompile, "default_jobs", lambda: 1)
    return compiler


# Dense kernels, their variable-length variants and the split-KV combine kernels.
NUM_KERNELS = len(registry.registered_kernels("sm_90a"))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m sparsek ARGS` in a fresh process."""
    return run_python("-m", "sparsek", *args, env=env)


def run_python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python ARGS` in a fresh process (the code of `-c` dedented), output captured."""
    if args[0] == "-c":
        args = ("-c", textwrap.dedent(args[1]), *args[2:])
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


# ------------------------------------------------------------------------------- start-up


def test_help_and_version_do_not_import_torch() -> None:
    """`--help` took 5-11 s on a CPU machine: it imported torch and torch._dynamo."""
    result = run_python(
        "-c",
        """
        import sys
        from sparsek import cli
        for argv in (["--help"], ["--version"], ["compile", "--help"]):
            try:
                cli.main(argv)
            except SystemExit:
                pass
        heavy = [m for m in ("torch", "cutlass", "tvm_ffi") if m in sys.modules]
        assert not heavy, heavy
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: sparsek" in result.stdout and "--jobs N" in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sparsek {sparsek.__version__}"


def test_no_command_prints_help() -> None:
    result = run_cli()
    assert result.returncode == 2 and "usage: sparsek" in result.stdout


def test_parser_choices_match_the_library() -> None:
    assert (*SUPPORTED_DTYPES, FP8_DTYPE) == cli.DTYPES
    assert tuple(precompile.PATHS) == cli.PATHS
    assert tuple(registry.MASK_BY_NAME) == cli.MASK_NAMES
    assert cli.MAX_DEFAULT_JOBS == precompile.MAX_DEFAULT_JOBS


def test_compile_jobs_default_to_one_per_cpu_up_to_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --jobs (or with 0) `compile` runs `precompile.default_jobs()` processes:
    one per CPU this process may use, at most MAX_DEFAULT_JOBS; --jobs N runs N."""
    asked: list[int] = []

    def record(arch, configs, *, jobs, verbose):
        asked.append(jobs)
        return 0

    monkeypatch.setattr(precompile, "precompile", record)
    for argv in ([], ["--jobs", "0"], ["-j", "3"]):
        assert cli.main(["compile", "--arch", "sm_90a", "--head-dim", "64", *argv]) == 0
    assert asked == [precompile.default_jobs(), precompile.default_jobs(), 3]
    for cpus, jobs in ((1, 1), (2, 2), (16, 16), (128, precompile.MAX_DEFAULT_JOBS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert precompile.default_jobs() == jobs


def test_import_is_lazy_and_binds_each_entry_point_once() -> None:
    result = run_python(
        "-c",
        """
        import sys
        import sparsek
        assert "torch" not in sys.modules and "sparsek.api" not in sys.modules
        from sparsek import attention_varlen  # imports sparsek.api_varlen (and torch)
        import torch
        assert hasattr(torch.ops.sparsek, "attention_varlen")  # registered by the first use
        attention = sparsek.attention
        assert vars(sparsek)["attention"] is attention  # bound
        assert "__getattr__" not in vars(sparsek)  # gone: lookups are specialized again
        assert set(sparsek.__all__) <= set(dir(sparsek))
        try:
            sparsek.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("no AttributeError")
        """,
    )
    assert result.returncode == 0, result.stderr


def test_first_use_inside_torch_compile() -> None:
    """A fresh process whose first touch of `sparsek.attention` is inside a compiled
    function (fullgraph): the lazy import must not break the trace."""
    result = run_python(
        "-c",
        """
        import torch
        import sparsek
        def f(q, k, v):
            return sparsek.attention(q, k, v, causal=True)
        q = torch.randn(1, 16, 2, 64)
        out = torch.compile(f, fullgraph=True, backend="eager")(q, q, q)
        assert torch.allclose(out, sparsek.attention(q, q, q, causal=True))
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]


# -------------------------------------------------------------------------------- compile


def test_compile_then_info_then_clear(fake_cache: FakeCompiler, capsys) -> None:
    n = NUM_KERNELS
    assert n > 8
    assert cli.main(["compile", "--arch", "sm_90a"]) == 0
    out = capsys.readouterr().out
    assert f"compiling {n} kernels for sm_90a" in out
    assert f"{n}/{n} kernels ready in " in out and f"({n} compiled)" in out
    assert len(out.splitlines()) == 2  # a summary, not a line per kernel
    assert cli.main(["compile", "--arch", "sm_90a", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.count(" disk\n") == n and f"({n} already cached)" in out
    assert fake_cache.count() == n

    assert cli.main(["info"]) == 0
    info = capsys.readouterr().out
    assert "support matrix" in info and f"({n} entries, " in info and f"{n} current)" in info
    assert "window+softcap+sinks" in info and "sparsek compile --mask M" in info
    assert f"sm_90a: {n} of {n} kernels compiled" in info
    assert "toolchain (part of every kernel's cache key): dsl=" in info

    assert cli.main(["cache", "clear"]) == 0
    assert f"removed {n} entries" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "check"),
    [
        (["--head-dim", "64"], lambda c: c.head_dim == 64),
        (["--dtype", "bfloat16"], lambda c: precompile.kernel_dtype(c) == "bfloat16"),
        (["--path", "dense"], lambda c: isinstance(c, FmhaFwdConfig) and c.kv_layout == "dense"),
        (
            ["--head-dim", "128", "--dtype", "float16", "--path", "varlen", "paged"],
            lambda c: (
                c.head_dim == 128
                and precompile.kernel_dtype(c) == "float16"
                and set(precompile.kernel_paths(c)) & {"varlen", "paged"}
            ),
        ),
    ],
)
def test_compile_filters_select_exactly_their_kernels(
    fake_cache: FakeCompiler, argv: list[str], check, capsys
) -> None:
    expected = [c for c in registry.registered_kernels("sm_90a") if check(c)]
    assert 0 < len(expected) < NUM_KERNELS
    assert cli.main(["compile", "--arch", "sm_90a", *argv]) == 0
    assert f"{len(expected)}/{len(expected)} kernels ready" in capsys.readouterr().out
    compiled = [line.split()[1] for line in fake_cache.log.read_text().splitlines()]
    assert compiled == [c.name for c in expected]


def test_compile_mask_selects_the_kernels_of_that_mask(fake_cache: FakeCompiler, capsys) -> None:
    """`--mask window+sinks --head-dim 64 --dtype float16 --path paged`: the paged kernels
    that mask launches (`registry.mask_kernels`), none of the registered ones."""
    window_sinks = registry.MASK_BY_NAME["window+sinks"]
    expected = [
        c
        for c in registry.mask_kernels("sm_90a", window_sinks)
        if c.head_dim == 64 and precompile.kernel_dtype(c) == "float16"
        and "paged" in precompile.kernel_paths(c)
    ]  # fmt: skip
    argv = ["--mask", "window+sinks", "--head-dim", "64", "--dtype", "float16", "--path", "paged"]
    assert cli.main(["compile", "--arch", "sm_90a", *argv]) == 0
    assert f"{len(expected)}/{len(expected)} kernels ready" in capsys.readouterr().out
    compiled = [line.split()[1] for line in fake_cache.log.read_text().splitlines()]
    assert compiled == [c.name for c in expected] and expected
    assert not set(compiled) & {c.name for c in registry.registered_kernels("sm_90a")}
    forward = [c for c in expected if isinstance(c, FmhaFwdConfig)]
    assert all(c.mask.window for c in forward)  # decode drops causal, never the window
    assert {c.mask.sinks for c in forward} == {True, False}  # split kernels leave sinks out
    assert any(c.single_query and not c.varlen_q for c in forward)  # windowed batched decode


def test_compile_rejects_an_unknown_mask(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["compile", "--mask", "banded"])
    assert "invalid choice: 'banded'" in capsys.readouterr().err


def test_kernel_paths_cover_every_kernel_and_the_helpers_of_cache_paths() -> None:
    kernels = registry.registered_kernels("sm_90a")
    paths = {c.name: precompile.kernel_paths(c) for c in kernels}
    assert all(p and set(p) <= set(precompile.PATHS) for p in paths.values())
    combine = [c for c in kernels if c.name.startswith("fmha_combine")]
    store = [c for c in kernels if c.name.startswith("kv_store")]
    assert combine and all(paths[c.name] == ("kvcache", "paged") for c in combine)
    assert store and all(paths[c.name] == ("paged",) for c in store)


def test_compile_filter_without_a_match(fake_cache: FakeCompiler, capsys) -> None:
    assert cli.main(["compile", "--arch", "sm_90a", "--head-dim", "80"]) == 1
    registered = "registered head dims: 32, 64, 96, 128, 192, 256"
    assert f"no kernel of sm_90a matches the filters ({registered})" in (capsys.readouterr().out)
    assert fake_cache.count() == 0


def test_compile_failure_exits_nonzero(tmp_path: Path, monkeypatch, capsys) -> None:
    failing = FakeCompiler(tmp_path / "log", [Path(__file__)], fail=True)
    monkeypatch.setattr(cache, "_default", KernelCache(tmp_path / "c", failing.toolchain()))
    argv = ["compile", "--arch", "sm_90a", "--head-dim", "64", "--jobs", "1"]  # fake: in process
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    n = len(precompile.select_kernels("sm_90a", head_dims=[64]))
    assert out.count("FAILED (ValueError: cannot compile") == n
    assert f"0/{n} kernels ready" in out and f"({n} failed)" in out


def test_compile_unknown_arch(capsys) -> None:
    assert cli.main(["compile", "--arch", "sm_80"]) == 1
    assert "no kernels registered for sm_80 (registered: sm_90a)" in capsys.readouterr().out


def test_compile_into_an_unwritable_cache_stops_at_once_with_one_message(
    fake_cache: FakeCompiler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The reported bug: 168 identical lines, and each kernel compiled in memory for
    nothing (the cache falls back to that; filling the cache is what `compile` is for)."""
    real_open, real_mkdir = os.open, os.mkdir
    root = tmp_path / "cache"

    def refused(path: object) -> bool:
        return Path(str(path)).is_relative_to(root)

    def mkdir(path: object, *args: object, **kwargs: object) -> None:
        if refused(path):  # simulated: tests may run as root, where chmod stops nothing
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

    def open_(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    assert cli.main(["compile", "--arch", "sm_90a"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1  # "compiling N kernels ..."
    assert captured.err.count("\n") == 1
    assert f"error: the kernel cache {root} cannot be written" in captured.err
    assert "Read-only file system" in captured.err and "SPARSEK_CACHE_DIR" in captured.err
    assert fake_cache.count() == 0


def test_ctrl_c_during_compile_finishes_that_kernel_and_stops(
    fake_cache: FakeCompiler, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """The reported bug: a 60-line traceback. A real SIGINT, in the middle of the third
    compile: that kernel finishes, no other starts, one line says so."""
    compiles = fake_cache.compile

    def interrupted_third(config: FmhaFwdConfig) -> object:
        if fake_cache.count() == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return compiles(config)

    monkeypatch.setattr(fake_cache, "compile", interrupted_third)
    monkeypatch.setattr(cache, "_default", KernelCache(None, fake_cache.toolchain()))
    # Python's own handler, or SIG_IGN where the shell started the tests in the background
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["compile", "--arch", "sm_90a"]) == precompile.INTERRUPTED
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "Ctrl-C: finishing the kernels being compiled, starting no other "
        "(Ctrl-C again to stop at once)",
        f"interrupted: 3/{NUM_KERNELS} kernels ready after 0 s; "
        "run the same command again to compile the rest",
    ]
    assert [e.state for e in cache.list_entries()] == ["current"] * 3
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    """Ctrl-C twice: the process ends at once (status 130), the kernel in flight is left
    unfinished (the next build of it removes what it left)."""
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO / "tests")!r})
from pathlib import Path
from fake_toolchain import FakeCompiler
from sparsek import cache, cli
from sparsek.cache import KernelCache

compiler = FakeCompiler(Path({str(tmp_path / "log")!r}), [Path({str(tmp_path / "k.py")!r})])
compiles = compiler.compile

def slow_second(config):
    if compiler.count() == 1:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    return compiles(config)

compiler.compile = slow_second
cache._default = KernelCache(None, compiler.toolchain())
sys.exit(cli.main(["compile", "--arch", "sm_90a", "--jobs", "1"]))
"""
    (tmp_path / "k.py").write_text("# kernel\n")
    start = time.monotonic()
    result = run_python("-c", script, env={"SPARSEK_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == precompile.INTERRUPTED and time.monotonic() - start < 25
    lines = [line for line in result.stderr.splitlines() if line]
    assert lines[0].startswith("Ctrl-C: finishing") and len(lines) == 2
    assert lines[1].startswith("interrupted again: stopping now"), result.stderr


@pytest.mark.slow
def test_jobs_compile_in_processes_and_ctrl_c_stops_them(tmp_path: Path) -> None:
    """The real DSL in 2 spawned processes: every selected kernel lands in the cache; then
    SIGINT to the process group (what a terminal's Ctrl-C does) in the middle of a second
    run ends it with two lines of output; the kernels in flight finish, none is left
    unfinished."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    env = {"SPARSEK_CACHE_DIR": str(tmp_path / "cache")}
    select = ["--head-dim", "64", "--dtype", "float16", "--path", "dense"]
    result = run_cli("compile", "--arch", "sm_90a", "--jobs", "2", *select, env=env)
    n = len(
        precompile.select_kernels("sm_90a", head_dims=[64], dtypes=["float16"], paths=["dense"])
    )
    assert result.returncode == 0, result.stderr
    assert f"into {tmp_path / 'cache'} in 2 processes" in result.stdout
    assert f"{n}/{n} kernels ready" in result.stdout
    assert len(list((tmp_path / "cache").rglob("manifest.json"))) == n

    command = ["compile", "--arch", "sm_90a", "-j", "2", "--path", "kvcache"]
    for ready in (1, 2):  # right after a kernel finished (the worker is between two kernels)
        process = subprocess.Popen(
            [sys.executable, "-m", "sparsek", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
            start_new_session=True,  # a process group of its own, as a terminal's job
        )
        before = len(list((tmp_path / "cache").rglob("manifest.json")))
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "cache").rglob("manifest.json"))) < before + ready:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == precompile.INTERRUPTED, err
        lines = err.strip().splitlines()
        assert len(lines) == 2 and lines[1].startswith("interrupted: "), err
        entries = KernelCache(tmp_path / "cache").list_entries()
        assert all(e.state == "current" for e in entries)


# ----------------------------------------------------------------------------------- info


def test_info_json_matches_the_registry_and_the_cache(fake_cache: FakeCompiler, capsys) -> None:
    configs = precompile.select_kernels("sm_90a", head_dims=[128], dtypes=["bfloat16"])
    for config in configs:
        cache.compile_into_cache(config)
    assert cli.main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sparsek"] == sparsek.__version__ and report["torch"] == torch.__version__
    rows = report["support"]
    dims = registry.registered_head_dims("sm_90a")
    fp8_dims = tuning.fp8_head_dims("sm_90a")
    assert {(r["arch"], r["head_dim"], r["dtype"]) for r in rows} == {
        ("sm_90a", d, t) for d in dims for t in SUPPORTED_DTYPES
    } | {("sm_90a", d, FP8_DTYPE) for d in fp8_dims}
    assert sum(r["kernels"] for r in rows) == NUM_KERNELS
    for row in rows:
        assert set(row["paths"]) == set(precompile.PATHS)
        # FP8: prefill kernels (dense, packed) and FP8-cache kernels (decode, and packed
        # queries of any length), each with both masks
        for masks in row["paths"].values():
            assert masks == ["full", "causal"]
    assert report["served_masks"] == [m.name for m in registry.SERVED_MASKS]
    summary = report["cache"]
    assert summary["entries"] == len(configs) and summary["states"] == {"current": len(configs)}
    assert summary["compiled"] == {"sm_90a": {"current": len(configs), "registered": NUM_KERNELS}}
    assert summary["bytes"] == sum(e.disk_bytes for e in cache.list_entries())


def test_info_prints_a_matrix_and_a_summary_not_the_entries(
    fake_cache: FakeCompiler, capsys
) -> None:
    for config in registry.registered_kernels("sm_90a")[:5]:
        cache.compile_into_cache(config)
    assert cli.main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.split()[:3] == ["arch", "head_dim", "dtype"])
    assert header.split()[3:] == [*precompile.PATHS, "kernels"]
    matrix = [line.split() for line in lines if line.startswith("  sm_90a ")]
    rows_16bit = [row for row in matrix if row[2] != FP8_DTYPE]
    assert len(rows_16bit) == 14 and all(row[3:5] == ["full,", "causal"] for row in rows_16bit)
    dims = ("32", "64", "96", "128", "192", "192/128", "256")
    assert [row[1] for row in rows_16bit] == [d for d in dims for _ in ("float16", "bfloat16")]
    fp8_rows = [row for row in matrix if row[2] == FP8_DTYPE]
    assert [row[1] for row in fp8_rows] == [str(d) for d in tuning.fp8_head_dims("sm_90a")]
    fp8_cells = ["full,", "causal"] * 4
    assert all(row[3:11] == fp8_cells for row in fp8_rows)
    assert not any("fmha_fwd" in line for line in lines)
    assert "  sm_90a: 5 of " in "\n".join(lines)


def test_module_entry_point_runs() -> None:
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert f"sparsek {sparsek.__version__}" in result.stdout


# ----------------------------------------------------------------------- demo, validate


def test_cpu_demo_compiles_only_its_kernels_and_compares_with_torch_sdpa(
    fake_cache: FakeCompiler, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sdpa_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        sdpa_calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    kernels = demo.demo_kernels()
    assert 0 < fake_cache.count() == len(kernels) <= len(demo.CPU_SHAPES)
    assert {(c.head_dim, c.mask.causal) for c in kernels} == {
        (s.head_dim, s.causal) for s in demo.CPU_SHAPES
    }
    assert f"{len(kernels)}/{len(kernels)} kernels ready" in out
    assert "correctness: OK" in out
    # torch's SDPA ran for every shape, on (batch, heads, seqlen, head_dim) tensors.
    seen = {tuple(shape) for shape in sdpa_calls}
    for s in demo.CPU_SHAPES:
        assert (s.batch, s.heads, s.seqlen_q, s.head_dim) in seen


def test_validate_passes_on_cpu_and_fails_on_a_wrong_answer(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "correctness: OK" in out and " ms " not in out
    assert out.count(" ok\n") == len(demo.CPU_SHAPES)

    attention = sparsek.attention
    monkeypatch.setattr(sparsek, "attention", lambda *a, **k: attention(*a, **k) * 1.01)
    assert cli.main(["validate"]) == 1
    assert "correctness: FAILED" in capsys.readouterr().out


def test_causal_sq_ne_sk_runs_bottom_right_in_both_columns() -> None:
    case = demo.make_case(demo.Shape(1, 33, 70, 2, 1, 64, True), "cpu", torch.float32)
    assert case.ok and case.err_sdpa < 1e-5


# ---------------------------------------------------------------------------------- cache


def test_cache_list_then_prune_stale(
    fake_cache: FakeCompiler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    configs = registry.registered_kernels("sm_90a")[:3]
    for config in configs:
        cache.compile_into_cache(config)
    # A new kernel source: the three entries are now stale; one is compiled anew.
    fake_cache.sources[0].write_text("# kernel v2\n")
    monkeypatch.setattr(cache, "_default", KernelCache(None, fake_cache.toolchain()))
    cache.compile_into_cache(configs[0])

    assert cli.main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "(4 entries, " in out and "1 current, 3 stale)" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["sm_90a"] * 4
    assert sorted(row[-2] for row in rows) == ["current", "stale", "stale", "stale"]
    assert all(row[2] == "KiB" or row[2] == "B" for row in rows)  # size, then age ("0 s")

    assert cli.main(["cache", "prune"]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    assert [e.state for e in cache.list_entries()] == ["current"]
    assert cli.main(["cache", "prune", "--all"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert cache.list_entries() == []


def test_cache_clear_in_a_shared_folder_keeps_other_files(
    fake_cache: FakeCompiler, tmp_path: Path, capsys
) -> None:
    """The reported bug: `$SPARSEK_CACHE_DIR` at a shared folder, `cache clear` deleted
    another project's folder."""
    other = tmp_path / "cache" / "other-project" / "results"
    other.mkdir(parents=True)
    (other / "table.csv").write_text("a,b\n")
    cache.compile_into_cache(registry.registered_kernels("sm_90a")[0])
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert (other / "table.csv").read_text() == "a,b\n"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["other-project"]


def test_cache_prune_on_a_read_only_cache_says_so(
    fake_cache: FakeCompiler, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    cache.compile_into_cache(registry.registered_kernels("sm_90a")[0])
    real_open = os.open

    def read_only(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):  # simulated: tests may run as root
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", read_only)
        assert cli.main(["cache", "prune", "--all"]) == 1
    assert "cannot remove entries from" in capsys.readouterr().out
    assert len(cache.list_entries()) == 1
