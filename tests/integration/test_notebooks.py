"""Every notebook runs top to bottom in smoke mode (FLEXLAB_SMOKE=1), stored without outputs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_six_notebooks_stored_without_outputs():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_on_colab_the_setup_installs_flexlab_once_without_touching_colabs_jupyter(path, monkeypatch):
    """The set-up cell's install lines, run as on Colab: one pip install of plain flexlab (no
    [notebook] extra, which would replace Colab's ipykernel and widgets) from the visible
    FLEXLAB_SOURCE, and none once flexlab is importable (a second run of the runtime)."""
    import importlib.util
    import sys
    import types

    source = "".join(nbformat.read(path, as_version=4).cells[1].source)
    install = source[: source.index("%matplotlib")]  # the cell's plain-Python head
    calls = []
    shell = types.SimpleNamespace(run_line_magic=lambda magic, line: calls.append((magic, line)))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setenv("FLEXLAB_SOURCE", "git+https://example.org/my-fork.git")
    real = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: real(name) if installed else None)
        exec(install, {"get_ipython": lambda: shell})
    assert calls == [("pip", 'install -q "flexlab @ git+https://example.org/my-fork.git"')]


COLAB_PINS = Path(__file__).resolve().parents[1] / "data" / "colab_gpu_pins.txt"
# A network failure, not an answer: the test is skipped (as the ipywidgets 7 test is without an index).
NO_INDEX = ("Failed to establish a new connection", "Temporary failure in name resolution", "Network is unreachable")


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _pins() -> tuple[dict[str, str], set[str]]:
    """Colab's pinned versions by normalized name, and the kernel stack's names."""
    out: dict[str, str] = {}
    kernel: set[str] = set()
    section = ""
    for line in COLAB_PINS.read_text().splitlines():
        if line.startswith("# --"):
            section = line
        elif line and not line.startswith("#"):
            name, version = line.split("==")
            key = _normalized(name)
            out[key] = version
            if "kernel stack" in section:
                kernel.add(key)
    return out, kernel


def _wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's own requirements (its METADATA's Requires-Dist), without those of extras."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        (meta,) = (n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [
        line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]


def test_the_colab_install_resolves_against_colabs_pins_without_touching_its_kernel(tmp_path):
    """What the set-up cell installs on Colab (plain flexlab, built here as a wheel) resolves for
    Colab's Python 3.12 with every version Colab has pinned (tests/data/colab_gpu_pins.txt as
    pip constraints), installs none of Colab's kernel stack, and pulls in nothing the pins file
    does not cover (so a new dependency must be checked against Colab's list and added).

    Colab's torch is installed already (its CUDA 12.8 build, from PyTorch's index) and meets
    flexlab's loose ``torch`` requirement, so pip leaves it and its dependencies alone: the test
    checks that requirement against Colab's version and resolves the others (PyPI's torch of the
    same version is a CUDA 13 build, whose dependencies are not Colab's)."""
    import json
    import subprocess
    import sys

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[2]
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("flexlab-*.whl")
    pins, kernel = _pins()
    requirements = [Requirement(r) for r in _wheel_requirements(wheel)]
    (torch_req,) = [r for r in requirements if r.name == "torch"]
    assert torch_req.specifier.contains(pins["torch"] + "+cu128"), f"{torch_req} would replace Colab's torch"
    target = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:"]
    for platform in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        target += ["--platform", platform]
    report = tmp_path / "report.json"
    rest = [str(r) for r in requirements if r.name != "torch"]
    got = subprocess.run(
        [*pip, "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *target]
        + ["-c", str(COLAB_PINS), *rest],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if got.returncode != 0 and any(s in got.stderr for s in NO_INDEX):
        pytest.skip(f"no package index answered: {got.stderr.strip()[-300:]}")
    assert got.returncode == 0, got.stderr[-3000:]
    resolved = {
        _normalized(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert not kernel & set(resolved), f"the install would replace Colab's {sorted(kernel & set(resolved))}"
    unpinned = sorted(set(resolved) - set(pins))
    assert not unpinned, f"not in {COLAB_PINS.name}: {unpinned} (add Colab's versions from its pip-freeze list)"
    assert {n: v for n, v in resolved.items() if pins[n] != v} == {}  # the constraints held
    assert {"transformers", "pandas", "matplotlib", "scipy"} <= set(resolved)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXLAB_SMOKE", "1")
    book = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        book, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}, env=dict(os.environ)
    ).execute()
    assert time.perf_counter() - start < 240
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(
        o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
        for c in book.cells
        if c.cell_type == "code"
        for o in c.outputs
    ), "no figure was shown"
