"""Every notebook runs top to bottom in smoke mode (FLEXLAB_SMOKE=1), stored without outputs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_five_notebooks_stored_without_outputs():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
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
