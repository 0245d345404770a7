"""Pipelines of 2 and 3 local processes (gloo, float32, CPU) equal one process and transformers:
greedy and sampled tokens, early stops, scores, uneven splits and batches, disk in some stages.
Each run starts fresh interpreters (a few seconds), so each test checks several things at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import flexlab
from flexlab import Policy, distributed
from flexlab.distributed import PipelineError
from flexlab.distributed.stage import ModelSource
from flexlab.models.config import get_preset
from tests.conftest import hf_opt
from tests.integration.test_exactness import hf_greedy
from tests.integration.test_llama import hf_model

PROMPTS = [[2, 5, 6, 7], [2, 7], [2, 30, 31, 32, 33, 9], [2, 11, 12], [2, 40]]  # two blocks of 2x2
NEW = 6


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    hf = hf_opt(get_preset("opt-tiny").replace(num_layers=4), seed=3)
    d = tmp_path_factory.mktemp("opt-tiny-4l")
    hf.save_pretrained(d)
    return hf, d


def one_process(model, policy, prompts=PROMPTS, **kw):
    with flexlab.Engine(model, policy) as engine:
        return engine.generate(prompts, **kw)


def test_two_stages_equal_one_process_and_transformers(tiny_hf, tiny_dir, tmp_path):
    model = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2)
    result = distributed.generate(model, PROMPTS, stages=2, policy=policy, max_new_tokens=NEW, offload_dir=tmp_path)
    assert (
        result.token_ids == hf_greedy(tiny_hf, PROMPTS, NEW) == one_process(model, policy, max_new_tokens=NEW).token_ids
    )
    # one timeline: a group of lanes per rank, hidden states sent one way and tokens the other
    tl = result.timeline
    assert tl.ranks == [0, 1] and {"rank 0 send", "rank 1 recv", "rank 1 send", "rank 0 recv"} <= set(tl.lanes)
    first = {}  # the first block's first sends: its batch 0's prefill
    for e in tl.events:
        if e.kind == "send" and e.token == 0 and e.batch == 0:
            first.setdefault(e.rank, e.bytes)
    assert first[0] == 2 * 6 * model.config.hidden_size * 4  # hidden states [2, width 6, hidden], float32
    assert first[1] == 2 * 8  # the two next tokens, int64
    assert result.metrics["peak_bytes_gpu[rank 0]"] > 0 and result.metrics["peak_bytes_gpu[rank 1]"] > 0
    for rank in (0, 1):  # each rank's memory over time, its peak the one it reported
        held = [m.bytes for m in tl.memory if m.rank == rank and m.tier == "gpu"]
        assert max(held) == result.metrics[f"peak_bytes_gpu[rank {rank}]"]
    assert list(tmp_path.iterdir()) == []  # every rank's offload directory is gone


def test_three_stages_uneven_split_disk_in_one_stage_and_scores(four_layers, tmp_path):
    hf, directory = four_layers
    model = flexlab.Model.from_pretrained(directory, dtype=torch.float32)
    shape = dict(gpu_batch_size=2, num_gpu_batches=2)
    policies = [
        Policy(**shape),
        Policy.from_percent([0, 0, 0, 0, 100, 0], **shape),  # weights and cache on disk
        Policy.from_percent([0, 0, 0, 100, 0, 100], **shape),  # weights on disk: the head streams its matrix
    ]
    # one group of both batches: the last rank's streamed head answers them together, its sends held till then
    kw = dict(stages=3, policy=policies, layers=[1, 2, 1], groups=1, offload_dir=tmp_path)
    result = distributed.generate(model, PROMPTS, max_new_tokens=NEW, **kw)
    assert result.token_ids == hf_greedy(hf, PROMPTS, NEW)
    assert result.metrics["peak_bytes_disk[rank 1]"] > 0 and result.metrics["peak_bytes_disk[rank 0]"] == 0
    assert {e.rank for e in result.timeline.events if e.kind == "read_head"} == {2}
    scores = distributed.score(model, PROMPTS, **kw)
    with torch.no_grad():
        for seq, got in zip(PROMPTS, scores):
            logprobs = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), dim=-1)
            want = logprobs[:-1].gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert list(tmp_path.iterdir()) == []


def test_sampling_and_early_stops_behave_as_in_one_process(tiny_dir):
    """A shared seed draws the same tokens; when every sequence of a block meets a stop token
    before max_new_tokens, every rank stops (the stop goes round the ring) and the next block runs."""
    model = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2)
    sampled = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, seed=7)
    assert (
        distributed.generate(model, PROMPTS, policy=policy, **sampled).token_ids
        == one_process(model, policy, **sampled).token_ids
    )
    free = one_process(model, policy, max_new_tokens=12, stop_token_ids=None).token_ids
    stops = sorted({seq[1] for seq in free[:4]})  # each of the first block's sequences stops by its 2nd token
    early = dict(max_new_tokens=12, stop_token_ids=stops)
    want = one_process(model, policy, **early).token_ids
    assert max(map(len, want[:4])) <= 2 < 12
    result = distributed.generate(model, PROMPTS, policy=policy, **early)
    assert result.token_ids == want
    first_block = [e.token for e in result.timeline.events if e.kind == "compute" and e.rank == 0]
    assert max(first_block) < 12  # no rank ran on to max_new_tokens


def test_llama_gqa_two_stages_equal_transformers(tmp_path):
    hf = hf_model("llama", dict(num_key_value_heads=2))
    hf.save_pretrained(tmp_path / "llama")
    model = flexlab.Model.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    prompts = [[1, 17, 40, 99, 5], [1, 7], [1, 250, 31]]
    policy = Policy.from_percent([50, 50, 50, 50, 100, 0], gpu_batch_size=2, num_gpu_batches=2)
    result = distributed.generate(model, prompts, stages=2, policy=policy, groups=1, max_new_tokens=NEW)
    assert result.token_ids == hf_greedy(hf, prompts, NEW)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(stages=0), "1 or more stages"),
        (dict(stages=3), "3 stages for 2 layers"),
        (dict(stages=2, layers=[2, 1]), "add up to 3"),
        (dict(stages=2, layers=[2, 0]), "1 or more layers"),
        (dict(stages=2, policy=[Policy()]), "one per stage"),
        (dict(stages=2, policy=[Policy(gpu_batch_size=2), Policy(gpu_batch_size=4)]), "same GPU batches"),
        (dict(stages=2, max_new_tokens=0), "max_new_tokens"),
        (dict(stages=2, beams=4), "unknown options"),
        (dict(stages=2, groups=3, policy=Policy(num_gpu_batches=2)), "groups must be from 1 to num_gpu_batches"),
    ],
)
def test_bad_input_is_refused_before_any_process_starts(tiny_dir, kw, message):
    model = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32)
    with pytest.raises((PipelineError, TypeError, ValueError), match=message):
        distributed.generate(model, PROMPTS, **kw)
    assert multiprocessing.active_children() == []


def test_a_killed_stage_ends_the_pipeline_with_its_rank_and_no_files(tmp_path):
    """Rank 1 is killed (as by the OOM killer) once it has written offload files: the run ends
    within seconds with an error naming it, and nothing is left in the offload directory."""
    stop = threading.Event()

    def kill_rank_1():
        while not stop.wait(0.02):
            mine = [p for p in multiprocessing.active_children() if p.name == "flexlab-stage-1"]
            if mine and any(f.is_file() for f in tmp_path.glob("*/rank1/*/*/*")):  # its packed weights
                os.kill(mine[0].pid, signal.SIGKILL)
                return

    model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    killer = threading.Thread(target=kill_rank_1)
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(PipelineError, match=r"stage 1 failed: the process died \(exit code -9\)"):
            policy = Policy.from_percent([0, 0, 0, 0, 100, 0], gpu_batch_size=4, num_gpu_batches=4)  # files
            distributed.generate(model, [[2, 5]] * 64, policy=policy, max_new_tokens=250, offload_dir=tmp_path)
    finally:
        stop.set()
        killer.join()
    assert time.monotonic() - start < 40
    assert list(tmp_path.iterdir()) == [] and multiprocessing.active_children() == []


def test_a_stage_that_raises_reports_its_own_error(tiny_dir, tmp_path):
    copy = shutil.copytree(tiny_dir, tmp_path / "checkpoint")
    model = flexlab.Model.from_pretrained(copy, dtype=torch.float32)
    (copy / "model.safetensors").write_bytes(b"\0" * 16)  # the ranks open it after this
    with pytest.raises(PipelineError, match=r"stage \d failed: CheckpointError"):
        distributed.generate(model, PROMPTS, max_new_tokens=2, offload_dir=tmp_path / "offload")
    assert list((tmp_path / "offload").iterdir()) == []


class FailingSource(ModelSource):
    """The model, except that on rank 1 the MLP fails at its third call: an error in the middle
    of a run, while the other rank waits on it."""

    def load(self, device):
        import dataclasses

        import torch.distributed as dist

        model = super().load(device)
        if dist.get_rank() == 1:
            calls = iter(range(1000))
            mlp = model.family.mlp

            def failing(*args):
                if next(calls) == 2:
                    raise RuntimeError("injected fault in rank 1's MLP")
                return mlp(*args)

            model.family = dataclasses.replace(model.family, mlp=failing)
        return model


class FailingSend(ModelSource):
    """The model, except that rank 0's hand-offs to rank 1 fail from the sixth on: sends that raise
    on its lane (as a broken connection does), while rank 1 waits for what it would carry."""

    def load(self, device):
        import torch.distributed as dist

        from flexlab.distributed.channel import Channel

        if dist.get_rank() == 0:
            calls = iter(range(1000))
            send = Channel.send

            def failing(channel, x):
                if next(calls) >= 5:  # broken for good, as a lost connection is
                    raise ConnectionError("injected fault in rank 0's send")
                return send(channel, x)

            Channel.send = failing  # this rank's process only
        return super().load(device)


def test_a_send_that_fails_ends_every_stage_with_its_error(tiny_dir, tmp_path):
    from flexlab.distributed.launch import run_local
    from flexlab.distributed.stage import PipelineJob
    from flexlab.engine.pipeline import make_plan

    model = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32)
    source = FailingSend(path=str(tiny_dir), dtype="float32")
    plan = make_plan(model.config, 2, Policy(gpu_batch_size=2, num_gpu_batches=2))
    job = PipelineJob(source, plan, "generate", PROMPTS, {"max_new_tokens": 20}, str(tmp_path), timeout_s=60)
    start = time.monotonic()
    with pytest.raises(PipelineError, match="stage 0 failed: ConnectionError: injected fault in rank 0's send"):
        run_local(job)
    assert time.monotonic() - start < 30  # not the 60 s timeout
    assert list(tmp_path.iterdir()) == [] and multiprocessing.active_children() == []


def test_a_stage_failing_mid_run_ends_every_stage_with_its_error(tiny_dir, tmp_path):
    from flexlab.distributed.launch import run_local
    from flexlab.distributed.stage import PipelineJob
    from flexlab.engine.pipeline import make_plan

    model = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32)
    source = FailingSource(path=str(tiny_dir), dtype="float32")
    plan = make_plan(model.config, 2, Policy.from_percent([0, 0, 0, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2))
    job = PipelineJob(source, plan, "generate", PROMPTS, {"max_new_tokens": 20}, str(tmp_path), timeout_s=60)
    start = time.monotonic()
    with pytest.raises(PipelineError, match="stage 1 failed: RuntimeError: injected fault in rank 1's MLP"):
        run_local(job)
    assert time.monotonic() - start < 30  # not the 60 s timeout: the neighbours heard at once
    assert list(tmp_path.iterdir()) == [] and multiprocessing.active_children() == []


@pytest.mark.parametrize("launcher", ["--pipeline", "torchrun"])
def test_the_command_line_runs_a_pipeline_and_prints_json(launcher):
    import json

    args = ["generate", "--preset", "opt-tiny", "--dtype", "float32", "--prompt-ids", "2 5 6", "--prompt-ids", "2 7"]
    args += ["--max-new-tokens", "3", "--json"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "flexlab", *args]
    else:
        cmd = [sys.executable, "-m", "flexlab", *args, "--pipeline", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 speaks for the pipeline
    printed = json.loads(lines[0])
    model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    assert printed["token_ids"] == model.generate([[2, 5, 6], [2, 7]], max_new_tokens=3).token_ids
    assert "rank 1: layers 1-1" in printed["policy"]


def test_torchrun_on_two_nodes_runs_one_pipeline():
    """Several machines, as torchrun joins them: two launchers (``--nnodes 2``, node ranks 0 and
    1, one process each, a static rendezvous on this machine's loopback) make one pipeline; each
    process is local rank 0 of its node. Rank 0 prints the result, the other node prints nothing."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["generate", "--preset", "opt-tiny", "--dtype", "float32", "--prompt-ids", "2 5 6", "--prompt-ids", "2 7"]
    args += ["--max-new-tokens", "3", "--json"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    nodes = [
        subprocess.Popen(
            [*launch, "--node-rank", str(node), "-m", "flexlab", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outs = [n.communicate(timeout=120) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    printed = [[line for line in out.splitlines() if line.startswith("{")] for out, _ in outs]
    assert len(printed[0]) == 1 and printed[1] == []
    model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    assert json.loads(printed[0][0])["token_ids"] == model.generate([[2, 5, 6], [2, 7]], max_new_tokens=3).token_ids


def test_the_search_plans_a_pipeline_that_generate_runs(tmp_path):
    """``search --pipeline 2 --save-policy`` writes one policy per stage; ``generate --plan`` runs
    exactly that plan and gives the reference tokens."""
    plan_file = tmp_path / "plan.json"
    shape = ["--preset", "opt-tiny", "--prompt-len", "8", "--gen-len", "4"]
    out = subprocess.run(
        [sys.executable, "-m", "flexlab", "search", *shape, "--pipeline", "2", "--save-policy", str(plan_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"on 2 x colab-t4 .*: [\d.e+]+ tok/s predicted, [\d.]+x one colab-t4", out.stdout)
    assert "stage 0: layers 0-0" in out.stdout and "stage 1: layers 1-1" in out.stdout
    plan = distributed.PipelinePlan.from_dict(flexlab.get_preset("opt-tiny"), json.loads(plan_file.read_text()))
    assert plan.num_ranks == 2
    args = ["generate", "--preset", "opt-tiny", "--dtype", "float32", "--prompt-ids", "2 5 6", "--max-new-tokens", "3"]
    out = subprocess.run(
        [sys.executable, "-m", "flexlab", *args, "--plan", str(plan_file), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    assert printed["token_ids"] == model.generate([[2, 5, 6]], max_new_tokens=3).token_ids
    assert printed["policy"] == plan.describe()


def test_a_plan_for_another_model_is_refused_before_any_work(tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"layers": [1, 5], "groups": 1, "policies": [{}, {}]}))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexlab",
            "generate",
            "--preset",
            "opt-tiny",
            "--prompt-ids",
            "2",
            "--plan",
            str(plan_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "add up to 6, but the model has 2" in out.stderr, out.stderr


def test_stages_on_one_machine_share_its_memory_limit(tiny_dir, tmp_path):
    """Each rank alone would take the whole limit as its own; together they are held to it: a
    limit below the ranks' predicted peaks together is refused before any weight is placed, and
    one above them runs."""
    model = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32)
    kw = dict(stages=2, max_new_tokens=3, offload_dir=tmp_path)
    with pytest.raises(PipelineError, match=r"shares this machine's 0\.28 GiB with rank\(s\) [01]; together") as e:
        distributed.generate(model, PROMPTS, memory_limit=0.3e9, **kw)  # one rank's runtime base is ~0.23 GB
    together = float(re.search(r"together they need ([\d.]+) GiB", str(e.value)).group(1)) * 2**30
    assert together > 0.3e9
    assert list(tmp_path.iterdir()) == []
    result = distributed.generate(model, PROMPTS, memory_limit=1.15 * together, **kw)
    assert result.token_ids == one_process(model, Policy(), max_new_tokens=3).token_ids
