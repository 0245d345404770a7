"""The code's habits, checked: ruff's lint rules and its formatting, and mypy's types on the whole package
(all configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "flexlab", "tests", "experiments"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "No module named ruff" not in done.stderr, "ruff is missing: pip install -e '.[dev]'"
    assert done.returncode == 0, (
        f"ruff {' '.join(command)} found problems (fix with: ruff {command[0]} ...):\n"
        + (done.stdout + done.stderr)[-3000:]
    )


def test_mypy_finds_no_type_errors():
    """Every module of the package (``[tool.mypy] files``)."""
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert "No module named mypy" not in done.stderr, "mypy is missing: pip install -e '.[dev]'"
    assert done.returncode == 0, "mypy found type errors:\n" + (done.stdout + done.stderr)[-3000:]
