"""Packaging: the metadata a package index shows, the wheel's contents, the integrations'
import guards.

Compared against: PEP 621/639 (an SPDX `license` string and a license file, no license
classifier), the issue's rules for dependencies (no exact runtime pin, nothing installed
only to silence a warning), one version source (`sparsek.__version__`), and a wheel built
from a copy of the files a checkout ships (every source file of both packages, `py.typed`,
the console script and vLLM's plugin entry point; no tests, no benchmarks).
"""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

import sparsek

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads TOML itself")

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sparsek", "cutedsl_kernels")


def pyproject() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data


def extra_pin(extra: str) -> str:
    (spec,) = pyproject()["project"]["optional-dependencies"][extra]
    return str(spec)


def test_one_version_source() -> None:
    project = pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = pyproject()["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "sparsek.__version__"}
    init = (REPO / "sparsek" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', init, re.M) == [sparsek.__version__]


def test_license_and_index_page_metadata() -> None:
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0"  # the SPDX form; a table is deprecated
    assert (REPO / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    classifiers = project["classifiers"]
    assert not [c for c in classifiers if c.startswith("License ::")]  # PEP 639
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert any(c.startswith("Environment :: GPU :: NVIDIA CUDA") for c in classifiers)
    minimum = project["requires-python"].removeprefix(">=")
    assert f"Programming Language :: Python :: {minimum}" in classifiers
    assert project["readme"] == "README.md" and project["urls"]
    assert project["scripts"] == {"sparsek": "sparsek.cli:main"}
    plugins = project["entry-points"]["vllm.general_plugins"]
    assert plugins == {"sparsek": "sparsek.integrations.vllm.plugin:register"}
    assert (REPO / "sparsek" / "py.typed").exists()


def test_runtime_dependencies_have_no_exact_pin_and_no_passenger() -> None:
    dependencies = pyproject()["project"]["dependencies"]
    names = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in dependencies]
    assert not [d for d in dependencies if "==" in d]
    # numpy only silenced a torch warning; torch-c-dlpack-ext back-ports to torch <= 2.9
    # what torch >= 2.10 has.
    assert "numpy" not in names and "torch-c-dlpack-ext" not in names
    assert {"nvidia-cutlass-dsl", "torch", "apache-tvm-ffi", "platformdirs", "tqdm"} <= set(names)


def test_integrations_import_or_say_how_to_install() -> None:
    """Without xFormers and vLLM: the modules that need neither import; the two that need
    one fail with an ImportError naming the release the extra pins."""
    code = (
        "import importlib, sys\n"
        "sys.modules['xformers'] = None; sys.modules['vllm'] = None\n"
        "for name in ('sparsek.integrations', 'sparsek.integrations.vllm',\n"
        "             'sparsek.integrations.vllm.plugin', 'sparsek.integrations.vllm.kernels'):\n"
        "    importlib.import_module(name)\n"
        "for name in ('sparsek.integrations.xformers', 'sparsek.integrations.vllm.backend'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    xformers, vllm = result.stdout.strip().splitlines()
    assert f"pip install {extra_pin('xformers')}" in xformers and ".[xformers]" in xformers
    assert f"pip install {extra_pin('vllm')}" in vllm and ".[vllm]" in vllm


@pytest.mark.slow
def test_wheel_contents_and_metadata(tmp_path: Path) -> None:
    """A wheel built (no network, no build isolation) from the files a checkout ships."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build PEP 639 metadata")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    result = subprocess.run(
        [*build, "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("sparsek-*.whl")
    assert wheel.name == f"sparsek-{sparsek.__version__}-py3-none-any.whl"

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"sparsek-{sparsek.__version__}.dist-info"
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    shipped = {
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert shipped <= names and "sparsek/py.typed" in names
    assert f"{info}/licenses/LICENSE" in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "perf", "containers", "docs")]

    assert metadata["Name"] == "sparsek" and metadata["Version"] == sparsek.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().startswith("# sparsek")
    requires = metadata.get_all("Requires-Dist")
    assert not [r for r in requires if "numpy" in r or "dlpack" in r]
    assert set(metadata.get_all("Provides-Extra")) == {"cu13", "test", "docs", "xformers", "vllm"}
    assert metadata.get_all("Project-URL")
    assert "sparsek = sparsek.cli:main" in entry_points
    assert "sparsek = sparsek.integrations.vllm.plugin:register" in entry_points
