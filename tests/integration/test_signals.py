"""Killed processes leave nothing behind: SIGTERM/SIGHUP clean up like Ctrl-C, and what a SIGKILL
left is swept by the next Engine or conversion. Each test runs flexlab in a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import flexlab
from flexlab.files import OWNER_FILE, is_stale, owned_dir, remove

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# The child slows one step down and says when it is inside it, so the signal lands mid-work.
CHILD = r"""
import sys, time, torch, flexlab
from flexlab.engine.block import BlockRun
from flexlab.engine.store import WeightStore
import safetensors.torch

def slowed(owner, name, mark):
    original = getattr(owner, name)
    def slow(*args, **kwargs):
        print(mark, flush=True)
        time.sleep(0.3)
        return original(*args, **kwargs)
    setattr(owner, name, slow)

where, how, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
if where == "compute":
    slowed(BlockRun, "compute", "INSIDE")
elif where == "placing":
    slowed(WeightStore, "_stored", "INSIDE")
elif where == "convert":
    slowed(safetensors.torch, "save_file", "INSIDE")
if how == "cli":
    from flexlab.cli import main
    sys.exit(main(rest))
model = flexlab.Model.from_config("opt-tiny", dtype=torch.float32)
policy = flexlab.Policy.from_percent([0, 0, 0, 0, 0, 0], gpu_batch_size=2)
engine = flexlab.Engine(model, policy, offload_dir=rest[0])   # never closed: the process is killed
engine.generate([[2, 5, 6]] * 4, max_new_tokens=40)
"""


def run_until_inside(where: str, how: str, *args: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, where, how, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # the default action for each signal, as a terminal's process has: a suite run under nohup
        # would hand its SIGHUP-ignoring disposition down, and the child would outlive its SIGHUP
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)],
    )
    for line in child.stdout:
        if line.strip() == "INSIDE":
            return child
    child.wait()
    pytest.fail(f"the child ended before the step it was to be killed in: {child.stderr.read()}")


def generate_argv(offload: Path) -> list[str]:
    return [
        "generate",
        "--preset",
        "opt-tiny",
        "--dtype",
        "float32",
        "--prompt-ids",
        "2 5 6",
        "--prompt-ids",
        "2 7",
        "--percent",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
        "--max-new-tokens",
        "40",
        "--offload-dir",
        str(offload),
    ]


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("where", ["compute", "placing"])
def test_cli_cleans_up_on_a_signal(tmp_path, sig, where):
    child = run_until_inside(where, "cli", *generate_argv(tmp_path))
    assert files_under(tmp_path)  # the engine's directory exists while it runs
    child.send_signal(sig)
    assert child.wait(timeout=60) == 128 + sig
    err = child.stderr.read()
    assert f"stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_library_process_killed_by_a_signal_leaves_no_files(tmp_path, sig):
    """No handler of the program's own: flexlab removes its directories, then the signal kills
    the process as it would have."""
    child = run_until_inside("compute", "library", str(tmp_path))
    child.send_signal(sig)
    assert child.wait(timeout=60) == -sig
    assert files_under(tmp_path) == []


def test_convert_killed_leaves_no_partial_directory(tmp_path):
    target = tmp_path / "out" / "ckpt"
    child = run_until_inside("convert", "cli", "convert", "opt-tiny", str(target), "--random")
    assert [p.name for p in target.parent.iterdir()][0].startswith(".ckpt.")  # writing into a hidden sibling
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 128 + signal.SIGTERM
    assert files_under(tmp_path / "out") == []


def test_what_a_sigkill_left_is_swept_by_the_next_engine(tmp_path):
    child = run_until_inside("compute", "library", str(tmp_path))
    child.kill()
    child.wait(timeout=60)
    (left,) = tmp_path.iterdir()  # nothing could run: the directory is still there
    assert is_stale(left)
    mine = owned_dir(tmp_path, "flexlab-")  # a live owner's directory must be kept
    other = tmp_path / "flexlab-unmarked"  # and one without a mark is not ours to judge
    other.mkdir()
    model = flexlab.Model.from_config("opt-tiny")
    with flexlab.Engine(model, flexlab.Policy.from_percent([0, 0, 0, 0, 0, 0]), offload_dir=tmp_path) as engine:
        assert not left.exists() and mine.exists() and other.exists()
        assert (engine.offload_dir / OWNER_FILE).exists()
    remove(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flexlab-unmarked"]


def test_a_reused_pid_is_not_the_owner(tmp_path):
    import json

    d = owned_dir(tmp_path, "flexlab-")
    mark = json.loads((d / OWNER_FILE).read_text())
    assert not is_stale(d)
    if mark["start"] is None:
        pytest.skip("no /proc: process start times unknown")
    mark["start"] = str(int(mark["start"]) + 1)  # this PID, but a process that started at another time
    (d / OWNER_FILE).write_text(json.dumps(mark))
    assert is_stale(d)
    remove(d)


def test_a_killed_conversion_is_swept_by_the_next_one(tmp_path):
    target = tmp_path / "ckpt"
    child = run_until_inside("convert", "cli", "convert", "opt-tiny", str(target), "--random")
    child.kill()
    child.wait(timeout=60)
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".ckpt.")
    from flexlab.cli import main

    assert main(["convert", "opt-tiny", str(target), "--random"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert OWNER_FILE not in os.listdir(target)
