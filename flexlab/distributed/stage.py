"""What one pipeline rank runs, and how rank 0 puts the ranks' reports into one result.

Every rank gets the same :class:`PipelineJob` (from the local launcher, or built from the same
command line under ``torchrun``), builds the model itself (weights are read lazily, so a rank
reads only its own layers' tensors), runs an :class:`~flexlab.Engine` over its share with a
:class:`~flexlab.distributed.channel.Channel` to its neighbours, and sends rank 0 a report.

Clocks: every rank starts its run's clock right after a barrier, so the ranks' times share an
origin to within the barrier's exit skew (tens of microseconds between processes of one machine,
about a network round trip between machines); the merged timeline is only as exact as that.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flexlab.distributed.channel import Channel
from flexlab.engine.pipeline import PipelineError, PipelinePlan
from flexlab.models.config import ModelConfig, get_preset
from flexlab.models.generation import GenerationResult
from flexlab.timeline import Timeline


@dataclass(frozen=True)
class ModelSource:
    """How each rank builds the model: a checkpoint directory (or hub id), or a config and a seed
    (random weights), in a dtype, on the device type the user's model is on."""

    path: str | None = None
    config: ModelConfig | None = None
    seed: int = 0
    dtype: str | None = None
    device_type: str = "cpu"

    @classmethod
    def of(cls, model, dtype: torch.dtype | None = None) -> ModelSource:
        """From a :class:`~flexlab.Model`, a checkpoint directory or hub id, or a preset name."""
        from flexlab.models.config import preset_names
        from flexlab.models.loading import CheckpointWeights, RandomWeights
        from flexlab.models.model import Model

        if isinstance(model, Model):
            name = str(model.dtype).removeprefix("torch.")
            if isinstance(model.weights, CheckpointWeights):
                return cls(path=str(model.weights.directory), dtype=name, device_type=model.device.type)
            if isinstance(model.weights, RandomWeights):
                return cls(config=model.config, seed=model.weights.seed, dtype=name, device_type=model.device.type)
            raise TypeError(f"a pipeline cannot rebuild a model whose weights are {type(model.weights).__name__}")
        dtype_name = None if dtype is None else str(dtype).removeprefix("torch.")
        if isinstance(model, str) and model in preset_names() and not Path(model).exists():
            return cls(config=get_preset(model), dtype=dtype_name)
        return cls(path=str(model), dtype=dtype_name)

    def load(self, device: torch.device):
        from flexlab.models.model import Model

        dtype = None if self.dtype is None else getattr(torch, self.dtype)
        if self.path is not None:
            return Model.from_pretrained(self.path, dtype=dtype, device=device)
        assert self.config is not None, "a ModelSource with neither a path nor a config"
        return Model.from_config(self.config, seed=self.seed, dtype=dtype, device=device)


@dataclass(frozen=True)
class PipelineJob:
    """Everything a rank needs: the model, the plan, and what to run (``task`` is ``"generate"``
    with ``options`` as :meth:`Engine.generate`'s keywords, or ``"score"`` with
    ``teacher_forced``)."""

    source: ModelSource
    plan: PipelinePlan
    task: str
    inputs: list
    options: dict = field(default_factory=dict)
    offload_dir: str | None = None
    threads: int | None = None  # torch threads per rank (None: the process's own, e.g. torchrun's OMP_NUM_THREADS)
    timeout_s: float = 300.0  # the longest a rank waits for a neighbour's message
    memory_limit: float | None = None  # bytes each machine's ranks may use together (None: its cgroup's or free)


@dataclass
class RankReport:
    rank: int
    events: list
    peaks: dict[str, int]
    memory: dict[str, dict[str, int]]
    output: Any = None  # the last rank's GenerationResult, or its scores
    samples: list = field(default_factory=list)  # its timeline's memory samples


def rank_device(source: ModelSource) -> torch.device:
    """This process's device: its local GPU when the model is on CUDA, else the CPU."""
    if source.device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise PipelineError(
                f"this process is local rank {local}, but this machine has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        return torch.device("cuda", local)
    return torch.device("cpu")


def run_rank(job: PipelineJob, rank: int, world: int) -> GenerationResult | list | None:
    """Run rank ``rank``'s share of ``job`` (the process group is up); rank 0 returns the result."""
    from flexlab.engine.engine import Engine

    if job.threads:
        torch.set_num_threads(job.threads)
    device = rank_device(job.source)
    model = job.source.load(device)
    wire = device if dist.get_backend() == "nccl" else torch.device("cpu")
    offload = None if job.offload_dir is None else Path(job.offload_dir) / f"rank{rank}"
    policy, layers = job.plan.policies[rank], job.plan.layers[rank]
    peers = Channel(rank, world, wire)
    with Engine(
        model,
        policy,
        offload_dir=offload,
        layers=layers,
        peers=peers,
        groups=job.plan.groups,
        memory_limit=job.memory_limit,
    ) as engine:
        dist.barrier()  # every rank has placed its weights: the clocks start together
        if job.task == "generate":
            out = engine.generate(job.inputs, **job.options)
            report = RankReport(rank, out.timeline.events, engine.tracker.peaks(), out.memory, out, out.timeline.memory)
        else:
            scores = engine.score(job.inputs, **job.options)
            report = RankReport(rank, [], engine.tracker.peaks(), engine.tracker.breakdown(), scores)
    if rank != world - 1:
        report.output = None  # only the last rank's head saw the tokens
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(report, gathered, dst=0)
    return merge(gathered, job.task) if gathered is not None else None


def merge(reports: list[RankReport], task: str) -> GenerationResult | list:
    """One result from every rank's report: the last rank's tokens and times, every rank's
    events (each with its rank) and memory (peaks per rank, and the largest of any rank)."""
    last = reports[-1].output
    if task != "generate":
        return last
    metrics = {k: v for k, v in last.metrics.items() if not k.startswith("peak_bytes_")}
    memory: dict[str, dict[str, int]] = {}
    for r in reports:
        for tier, peak in r.peaks.items():
            metrics[f"peak_bytes_{tier}[rank {r.rank}]"] = float(peak)
            metrics[f"peak_bytes_{tier}"] = max(metrics.get(f"peak_bytes_{tier}", 0.0), float(peak))
        for tier, parts in r.memory.items():
            memory.setdefault(tier, {}).update({f"rank {r.rank} {what}": n for what, n in parts.items()})
    events = [dataclasses.replace(e, rank=r.rank) for r in reports for e in r.events]
    samples = [dataclasses.replace(m, rank=r.rank) for r in reports for m in r.samples]
    return GenerationResult(last.token_ids, last.texts, metrics, Timeline(events, samples), memory)
