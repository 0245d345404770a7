"""Launching local stages: a pipeline on CUDA is refused before any process starts where the machine
lacks a GPU per stage; each local stage gets the CPU threads its share of the turns warrants."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from flexlab import distributed
from flexlab.distributed import PipelineError, make_plan
from flexlab.distributed.launch import run_local
from flexlab.distributed.stage import ModelSource, PipelineJob, rank_device
from flexlab.engine.policy import Policy
from flexlab.models.config import get_preset


def test_local_stages_on_cuda_need_a_gpu_each(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    source = ModelSource(config=get_preset("opt-tiny"), dtype="float32", device_type="cuda")
    job = PipelineJob(source, make_plan(source.config, 2), "generate", [[2, 5]], {}, str(tmp_path))
    with pytest.raises(PipelineError, match="2 stages on CUDA needs a GPU per stage, and this machine has 1"):
        run_local(job)
    assert list(tmp_path.iterdir()) == [] and multiprocessing.active_children() == []


def test_a_torchrun_process_beyond_the_machines_gpus_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(PipelineError, match="local rank 2, but this machine has 2 GPU"):
        rank_device(ModelSource(config=get_preset("opt-tiny"), device_type="cuda"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(ModelSource(config=get_preset("opt-tiny"), device_type="cuda")) == torch.device("cuda", 1)


@pytest.mark.parametrize("groups, expected", [(1, 8), (2, 4), (None, 4)])
def test_local_stages_share_the_cores_of_the_ranks_at_work(monkeypatch, groups, expected):
    """Ranks taking turns (one group) each get every core; two groups keep two ranks at work at
    once, so each gets half (the default is a group per stage); a given count is kept."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    policy = Policy(gpu_batch_size=1, num_gpu_batches=2)

    def job(threads=None):
        return distributed._job("opt-tiny", 2, policy, None, groups, None, threads, 300.0, "generate", [[2, 5]] * 2, {})

    assert job().plan.groups == (groups or 2) and job().threads == expected
    assert job(threads=3).threads == 3
