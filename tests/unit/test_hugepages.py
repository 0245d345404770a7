"""Huge pages for torch's large CPU tensors: asked for before torch loads, in the processes flexlab
starts, and never against the user's own choice."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flexlab import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A fresh interpreter: ask, then load torch and fault in a 64 MiB tensor; print the huge pages of its mapping.
PROBE = """
import os, sys
from flexlab import hugepages
asked = hugepages.enable_before_torch()
import torch
t = torch.ones(64 << 20, dtype=torch.uint8)
start, huge = t.data_ptr(), 0
for line in open("/proc/self/smaps"):
    if "-" in line.split()[0] and not line.startswith(("Anon", "Size")):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        here = lo <= start < hi
    elif line.startswith("AnonHugePages") and here:
        huge = int(line.split()[1])
print(asked, os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)
"""


def _probe(env: dict) -> tuple[str, str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    asked, value, huge = out.stdout.split()
    return asked, value, int(huge)


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="the kernel gives no huge pages")
def test_a_process_that_asks_before_torch_gets_huge_pages_and_the_users_choice_wins():
    env = {k: v for k, v in os.environ.items() if k != hugepages.VARIABLE}
    asked, value, huge = _probe(env)
    assert (asked, value) == ("True", "1") and huge >= 32 * 1024, huge  # KiB: most of the 64 MiB
    asked, value, huge = _probe({**env, hugepages.VARIABLE: "0"})
    assert (asked, value, huge) == ("False", "0", 0)


def test_once_torch_is_loaded_nothing_is_asked(monkeypatch):
    monkeypatch.delenv(hugepages.VARIABLE, raising=False)
    assert "torch" in sys.modules and not hugepages.enable_before_torch()
    assert hugepages.VARIABLE not in os.environ


def _report(queue) -> None:
    queue.put(os.environ.get(hugepages.VARIABLE))


def test_children_started_inside_ask_and_the_parent_is_left_as_it_was(monkeypatch):
    monkeypatch.delenv(hugepages.VARIABLE, raising=False)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with hugepages.for_children():
        child = ctx.Process(target=_report, args=(queue,))
        child.start()
    assert hugepages.VARIABLE not in os.environ
    child.join(60)
    assert queue.get(timeout=10) == "1"
    monkeypatch.setenv(hugepages.VARIABLE, "0")
    with hugepages.for_children():
        assert os.environ[hugepages.VARIABLE] == "0"
    assert os.environ[hugepages.VARIABLE] == "0"


def test_the_command_line_asks_before_any_command_loads_torch():
    env = {k: v for k, v in os.environ.items() if k != hugepages.VARIABLE}
    code = (
        "import os, sys; from flexlab.cli import main; main(['presets']); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert re.search(r"^1$", out.stdout, re.M), out.stdout[-500:]
