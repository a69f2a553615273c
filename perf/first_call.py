"""First call of sparsek in a fresh process: cold compile, then warm from the disk cache.

The parent (`measure`) makes an empty cache directory and starts two children in turn with
that directory as SPARSEK_CACHE_DIR (and CUTE_DSL_CACHE_DIR, so no DSL-side cache helps):

    child 1: empty cache  -> first sparsek.attention call compiles   -> "cold_first_call"
    child 2: same cache   -> first call loads the kernel from disk   -> "warm_first_call"

Each child times its first call (host wall time, synchronized), a second call, and its
sparsek import, checks the output against the float32 reference, and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from perf.shapes import Case

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class FirstCall:
    kind: str
    ms: float | None
    check: str
    max_err: float | None
    note: str
    error: str


def _case_arg(case: Case) -> str:
    values = (case.batch, case.seqlen_q, case.seqlen_k, case.num_heads, case.num_kv_heads)
    return ",".join(str(x) for x in (*values, case.head_dim, int(case.causal)))


def _count_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def measure(case: Case, dtype: str, *, fake: bool, timeout_s: float) -> list[FirstCall]:
    """Run the cold and the warm child; a failing child yields a FirstCall with `error`."""
    tmp = Path(tempfile.mkdtemp(prefix="sparsek-first-call-"))
    env = dict(os.environ)
    env["SPARSEK_CACHE_DIR"] = str(tmp / "sparsek")
    env["CUTE_DSL_CACHE_DIR"] = str(tmp / "cute")
    env["SPARSEK_STRICT"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", _case_arg(case)]
    cmd += ["--dtype", dtype] + (["--fake"] if fake else [])
    results = []
    try:
        for kind in ("cold_first_call", "warm_first_call"):
            results.append(_run_child(kind, cmd, env, timeout_s, tmp / "sparsek"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _run_child(
    kind: str, cmd: list[str], env: dict[str, str], timeout_s: float, cache: Path
) -> FirstCall:
    def failed(error: str) -> FirstCall:
        return FirstCall(kind, None, "", None, "", error)

    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return failed(f"child process timed out after {timeout_s:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return failed(f"child exited with {proc.returncode}: {tail}")
    data = json.loads(lines[-1])
    note = (
        f"second call {data['second_ms']:.2f} ms; import {data['import_ms']:.0f} ms; "
        f"cache files after: {_count_files(cache)}"
    )
    check = "ok" if data["ok"] else "FAIL"
    return FirstCall(kind, data["first_ms"], check, data["max_err"], note, "")


# ---------------------------------------------------------------------------- child


def _child(case_arg: str, dtype_name: str, fake: bool) -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    start = time.perf_counter()
    import torch

    from perf.reference import check_output, reference_attention

    if fake:
        device = torch.device("cpu")

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> object:
            return reference_attention(q, k, v, causal).to(q.dtype)
    else:
        import sparsek

        device = torch.device("cuda")
        attention = sparsek.attention  # type: ignore[assignment]
    import_ms = (time.perf_counter() - start) * 1e3

    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal = map(int, case_arg.split(","))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    torch.manual_seed(0)
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype, device=device)

    def timed_call() -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = attention(q, k, v, causal=bool(causal))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3, out  # type: ignore[return-value]

    first_ms, out = timed_call()
    second_ms, _ = timed_call()
    result = check_output(out, reference_attention(q, k, v, bool(causal)), dtype)
    record = {
        "first_ms": first_ms,
        "second_ms": second_ms,
        "import_ms": import_ms,
        "ok": result.ok,
        "max_err": result.max_err,
    }
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description="child process of the first-call benchmark")
    parser.add_argument("--case", required=True, help="B,Sq,Sk,H,Hkv,D,causal")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--fake", action="store_true", help="CPU reference instead of sparsek")
    args = parser.parse_args()
    _child(args.case, args.dtype, args.fake)


if __name__ == "__main__":
    main()
