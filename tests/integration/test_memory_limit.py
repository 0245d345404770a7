"""The memory a policy is promised is the memory it uses: the engine refuses what would not fit
before it allocates, the search picks only what fits the whole process, and under a real
cgroup limit the searched policy runs to the end where a policy that only counts the engine's
bytes is killed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flexlab
from flexlab.cost import HardwareProfile, get_hardware
from flexlab.devices import resident_bytes
from flexlab.errors import MemoryLimitError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small():
    return flexlab.Model.from_config("opt-125m", seed=0, dtype=torch.float32)


def test_a_policy_over_the_limit_is_refused_before_anything_is_placed(small, tmp_path, monkeypatch):
    leaned: list[bool] = []  # a refusal must not make the process's allocator lean, which is for good
    monkeypatch.setattr("flexlab.engine.memory_guard.lean_allocator", lambda: leaned.append(True) or True)
    limit = resident_bytes() + 100 * 2**20  # 100 MiB more than the process holds: not 500 MB of weights
    with pytest.raises(MemoryLimitError, match=r"GiB over the limit of .*: that peak is placing the weights"):
        flexlab.Engine(small, flexlab.Policy(), offload_dir=tmp_path, memory_limit=limit)
    assert list(tmp_path.iterdir()) == []  # nothing was written
    with pytest.raises(MemoryLimitError, match="below this process's runtime base"):
        flexlab.Engine(small, flexlab.Policy(), memory_limit=0.5 * resident_bytes())
    assert leaned == []


def test_a_run_whose_workspace_breaks_the_limit_is_refused_before_it_starts(small, monkeypatch):
    # The short run is tight enough to make the allocator lean, which is for good: not in the test
    # session's process (it slowed every later test's allocations: a training twice as long).
    monkeypatch.setattr("flexlab.engine.memory_guard.lean_allocator", lambda: False)
    # the weights on disk fit; a 1024-token prefill of 16 sequences does not (attention scores, MLP)
    policy = flexlab.Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=16)
    with flexlab.Engine(small, policy, memory_limit=resident_bytes() + 400 * 2**20) as engine:
        assert engine.generate([[2, 5, 6]], max_new_tokens=2).token_ids  # a short run fits
        with pytest.raises(MemoryLimitError, match="over the limit"):
            engine.generate([[2] + [7] * 1023] * 16, max_new_tokens=2)
        assert engine.generate([[2, 5, 6]], max_new_tokens=2).token_ids  # and the engine still works


def test_profiles_saved_before_the_runtime_base_still_load(tmp_path):
    hw = get_hardware("colab-t4")
    hw.save(tmp_path / "hw.json")
    old = json.loads((tmp_path / "hw.json").read_text())
    del old["runtime_base_bytes"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = HardwareProfile.load(tmp_path / "old.json")
    assert loaded.replace(runtime_base_bytes=hw.runtime_base_bytes) == hw and loaded.runtime_base_bytes > 0


# ---- under a real limit -----------------------------------------------------------------------
def _cgroup(limit: int) -> Path | None:
    """A fresh memory cgroup limited to ``limit`` bytes (the benchmarks' own helper), or None."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from _common import cgroup_for
    finally:
        sys.path.pop(0)
    return cgroup_for(limit)[0]


def _in_cgroup(cgroup: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", sys.executable, "-m", "flexlab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_the_searched_policy_runs_under_a_cgroup_limit_where_counting_only_the_engine_is_killed(tmp_path):
    from flexlab.cost.calibrate import _runtime_base
    from flexlab.models.convert import save_checkpoint

    # opt-125m in float32 is 0.5 GB of weights; the process needs its runtime base besides (0.25-0.3 GiB,
    # depending on the machine), so the limit is set from this machine's base: the weights streamed
    # from disk fit 0.48 GB above it (with the search's 10% headroom), the weights held in memory do not
    base = _runtime_base(torch.device("cpu"), torch.float32)
    limit = int(base + 0.48e9)
    cgroup = _cgroup(limit)
    if cgroup is None:
        pytest.skip("no memory cgroup can be made here (needs root and a cgroup memory controller)")
    try:
        model = tmp_path / "opt-125m"
        save_checkpoint(flexlab.Model.from_config("opt-125m", seed=0), model, dtype=torch.float32, progress=False)
        here = get_hardware("h100").replace(  # this CPU's memory needs; its rates do not matter for what fits
            name="this cpu",
            link_pinned_bw=math.inf,
            link_pageable_bw=math.inf,
            runtime_base_bytes=base,
        )
        here.save(tmp_path / "hw.json")
        shape = ["--prompt-len", "128", "--gen-len", "8"]
        found = _in_cgroup(
            cgroup, "search", "--model", str(model), "--dtype", "float32", "--hardware", str(tmp_path / "hw.json"),
            "--memory-limit-gb", str(limit / 1e9), "--save-policy", str(tmp_path / "p.json"), *shape,
        )  # fmt: skip
        assert found.returncode == 0, found.stdout + found.stderr
        policy = flexlab.Policy.from_dict(json.loads((tmp_path / "p.json").read_text()))
        assert policy.w_disk_percent > 0  # 0.5 GB of weights do not fit 0.48 GB above the runtime
        prompt = " ".join(str(4 + i % 500) for i in range(127))
        run = ["generate", "--model", str(model), "--dtype", "float32", "--max-new-tokens", "8", "--json"]
        prompts = ["--prompt-ids", f"2 {prompt}"] * min(policy.block_size, 16)
        ran = _in_cgroup(cgroup, *run, "--policy", str(tmp_path / "p.json"), *prompts)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert all(len(ids) == 8 for ids in json.loads(ran.stdout)["token_ids"])
        # every weight in memory: 0.5 GB of engine bytes "fit" the limit, the process does not
        resident = [*run, "--percent", "100", "0", "100", "0", "100", "0", *prompts]
        refused = _in_cgroup(cgroup, *resident)
        assert refused.returncode != 0 and "over the limit" in refused.stderr
        killed = _in_cgroup(cgroup, *resident, "--memory-limit-gb", "inf")  # unchecked: the kernel kills it
        assert killed.returncode < 0 or killed.returncode == 137, (killed.returncode, killed.stderr[-500:])
    finally:
        cgroup.rmdir()


LEAN = """
import warnings, flexlab, torch
import flexlab.engine.block as block
trims = []
block.return_freed_memory = lambda: trims.append(1)  # counts the per-token trims of a lean engine
from flexlab.devices import resident_bytes
from flexlab.engine.footprint import footprint
model = flexlab.Model.from_config("opt-125m", seed=0, dtype=torch.float32)
policy = flexlab.Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=16)
fp = footprint(model.config, policy, on_cuda=False, itemsize=4, prompt_len=256, gen_len=2, num_prompts=16,
               runtime_base=resident_bytes(), random_weights=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with flexlab.Engine(model, policy, memory_limit=fp.host - 0.5 * fp.workspace) as engine:
        for _ in range(2):
            engine.generate([[2] + [7] * 255] * 16, max_new_tokens=2)
print(len(trims), sum("memory is tight" in str(w.message) for w in caught))
"""


def test_where_only_the_allocators_slack_breaks_the_limit_the_allocator_is_made_lean_once():
    # in a fresh process: the lean allocator is process-wide, for good
    done = subprocess.run([sys.executable, "-c", LEAN], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    trims, warned = done.stdout.strip().splitlines()[-1].split()
    assert warned == "1"  # it ran, and said so once
    assert trims == "4"  # and handed freed heap memory back after each of its 2 x 2 tokens


PLACE = """
import sys, torch, flexlab
from flexlab.devices import resident_bytes
from flexlab.engine.footprint import footprint
from flexlab.engine.stage_cost import checkpoint_itemsize
from flexlab.models.layers import packs
model = flexlab.Model.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
base = resident_bytes()
policy = flexlab.Policy.from_percent([0, 100, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=1)
with flexlab.Engine(model, policy) as engine:
    held = engine.tracker.peaks()["cpu"]
    peak = resident_bytes(peak=True) - base
predicted = footprint(model.config, policy, on_cuda=False, itemsize=2, prompt_len=8, gen_len=2,
                      checkpoint_itemsize=checkpoint_itemsize(model),
                      packs=packs(model.device, model.dtype)).placing
print(held, peak, predicted)
"""


def test_placing_a_checkpoint_holds_each_weight_once(tmp_path):
    """Weights placed in memory from a safetensors checkpoint are read into tensors of their
    own: placing peaks at the weights held (the largest, the 136M-element token table, is not in
    memory twice, as a file map beside its copy), and the footprint predicts that peak."""
    from flexlab.models.convert import save_checkpoint

    config = flexlab.get_preset("qwen2.5-0.5b").replace(name="qwen-2-layers", num_layers=2)
    save_checkpoint(flexlab.Model.from_config(config, seed=0, dtype=torch.bfloat16), tmp_path, dtype=torch.bfloat16)
    done = subprocess.run([sys.executable, "-c", PLACE, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    held, peak, predicted = (float(x) for x in done.stdout.split()[-3:])
    table = config.vocab_size * config.hidden_size * 2
    assert held > table and peak < held + 0.25 * table  # a map beside the copy would add the table again
    assert abs(predicted - peak) < 0.1 * peak
