"""The prod image (containers/Dockerfile): built, then `sparsek info`, the CPU demo and the
cache check run inside it.

Compares against what the image promises: sparsek installed with its cache in
/opt/sparsek-cache, a current shared-library entry for every registered sm_90a kernel that
loads without importing the CuTe DSL (`containers/check_cache.py`), no C compiler, and the
CPU demo running from that cache.

Marker `container`. Needs an image builder (docker with a running daemon, podman or buildah)
and skips at collection where there is none, as on a CI machine without one. Where one exists
it builds `sparsek:prod` through `containers/build.sh` (the first build downloads CUDA torch,
~3 GB, and compiles every kernel: ~15 min on 2 cores; later builds reuse the builder's layer
cache and recompile only when the sources changed); `-m "not container"` leaves it out. The
base is `localhost/sparsek-base:noble` when the builder has it (`containers/base-rootfs.sh`),
else the Dockerfile's; pip trusts the host's CA bundle, as the host does.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

CONTAINERS = Path(__file__).resolve().parents[1] / "containers"
LOCAL_BASE = "localhost/sparsek-base:noble"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE = "sparsek:prod"


def _lib(*call: str) -> subprocess.CompletedProcess[str]:
    """Run a function of containers/lib.sh."""
    script = f'. "{CONTAINERS / "lib.sh"}" && "$@"'
    return subprocess.run(
        ["bash", "-c", script, "lib.sh", *call], capture_output=True, text=True, check=False
    )


def _builder() -> str | None:
    found = _lib("sparsek_builder")
    return (found.stdout.strip() or None) if found.returncode == 0 else None


BUILDER = _builder()

pytestmark = [
    pytest.mark.container,
    pytest.mark.slow,
    pytest.mark.skipif(BUILDER is None, reason="no image builder (docker, podman or buildah)"),
]


def _run_in_image(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONTAINERS / "run.sh"), IMAGE, *command],
        capture_output=True,
        text=True,
        check=False,
    )


def _ok(done: subprocess.CompletedProcess[str], what: Sequence[str]) -> str:
    if done.returncode != 0:  # the output's tail, not the whole CompletedProcess
        pytest.fail(f"{' '.join(what)} exited {done.returncode}:\n{_tail(done)}", pytrace=False)
    return done.stdout


def _tail(done: subprocess.CompletedProcess[str]) -> str:
    return f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def prod_image() -> str:
    assert BUILDER is not None
    args = [str(CONTAINERS / "build.sh"), "--tag", IMAGE]
    if _lib("sparsek_has_image", BUILDER, LOCAL_BASE).returncode == 0:
        args += ["--base", LOCAL_BASE]
    if HOST_CA.is_file():
        args += ["--ca-cert", str(HOST_CA)]
    _ok(subprocess.run([*args, "prod"], capture_output=True, text=True, check=False), args)
    return IMAGE


def test_info_runs_and_names_the_image_cache(prod_image: str) -> None:
    out = _ok(_run_in_image("sparsek", "info"), ["sparsek", "info"])
    assert out.startswith("sparsek ")
    assert "/opt/sparsek-cache" in out


def test_cpu_demo_runs(prod_image: str) -> None:
    _ok(_run_in_image("sparsek", "demo"), ["sparsek", "demo"])


def test_every_kernel_loads_from_the_cache_without_the_dsl(prod_image: str) -> None:
    out = _ok(_run_in_image("python", "/opt/sparsek/check_cache.py"), ["check_cache.py"])
    assert "DSL imported: False" in out
    assert "relocatable objects: 0" in out


def test_no_c_compiler_in_prod(prod_image: str) -> None:
    probe = "command -v cc || command -v gcc || echo none"
    out = _ok(_run_in_image("sh", "-c", probe), ["sh", "-c", probe])
    assert out.strip() == "none"
