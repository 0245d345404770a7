"""Pipeline parallelism across processes and machines, on ``torch.distributed``.

A pipeline of N stages (ranks) splits the model's layers into N contiguous runs (see
:mod:`~flexlab.engine.pipeline`); each rank runs the usual block schedule over its own layers,
with its own Policy, tiers and offload directory, and hands hidden states to the next rank and
the head's next tokens back to the first (see :mod:`~flexlab.distributed.channel`). Tokens and
log-probabilities are the one-process engine's, exactly.

    >>> import flexlab, torch
    >>> from flexlab import distributed
    >>> model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    >>> result = distributed.generate(model, [[2, 5, 6], [2, 7]], stages=2, max_new_tokens=4)  # doctest: +SKIP
    >>> result.token_ids == model.generate([[2, 5, 6], [2, 7]], max_new_tokens=4).token_ids  # doctest: +SKIP
    True

From a shell: ``flexlab generate --pipeline 2 ...`` starts the processes itself;
``torchrun --nproc-per-node 2 -m flexlab generate ...`` (with ``--nnodes`` and a rendezvous for
several machines) runs one rank in each process torchrun starts.
"""

from __future__ import annotations

import dataclasses

from flexlab.distributed.launch import run_local
from flexlab.distributed.stage import ModelSource, PipelineJob
from flexlab.engine.pipeline import PipelineError, PipelinePlan, make_plan, split_layers

__all__ = ["PipelineError", "PipelinePlan", "generate", "make_plan", "score", "split_layers", "threads_per_rank"]


def threads_per_rank(cores: int, ranks: int, groups: int) -> int:
    """Torch threads for each of ``ranks`` local processes on ``cores`` threads' worth of CPU:
    the cores shared by the ranks that compute at once, ``min(groups, ranks)`` of them (see
    :func:`~flexlab.engine.schedule.block_schedule`). With one group the ranks take turns, so each
    gets every core: with a core each, two ranks on two cores ran at 0.66x one process, with both
    cores 0.91x (opt-1.3b on disk, ``experiments/pipeline_scaling.py``). With as many groups as
    ranks they work at once, and every rank's threads on every core would oversubscribe them.

        >>> threads_per_rank(8, 2, 1), threads_per_rank(8, 2, 2), threads_per_rank(2, 4, 4)
        (8, 4, 1)
    """
    return max(1, cores // max(1, min(groups, ranks)))


def generate(
    model,
    prompts,
    *,
    stages: int = 2,
    policy=None,
    layers=None,
    groups: int | None = None,
    offload_dir=None,
    threads: int | None = None,
    timeout_s: float = 300.0,
    memory_limit: float | None = None,
    **options,
):
    """Generate as :meth:`flexlab.Engine.generate` does (same keywords in ``options``), on a
    pipeline of ``stages`` local processes; returns one GenerationResult whose timeline has a
    group of lanes per rank.

    ``model``: a :class:`flexlab.Model` (rebuilt in each process from its checkpoint or seed), a
    checkpoint directory or a preset name. ``policy``: one Policy, or one per stage. ``layers``:
    how many layers each stage holds (default: balanced by weight). ``groups``: groups of GPU
    batches that take turns (default: one per stage; see :func:`make_plan`). ``threads``: torch
    threads per process (default: :func:`threads_per_rank` of this process's). ``timeout_s``: the
    longest a stage waits for a neighbour's message.
    ``memory_limit``: bytes of host RAM the processes may use together (default: the cgroup's
    limit, else what is available; ``math.inf``: no check); each is held to a share in
    proportion to its predicted peak, and a plan that does not fit is refused before any rank
    places a weight.
    """
    job = _job(model, stages, policy, layers, groups, offload_dir, threads, timeout_s, "generate", prompts, options)
    return run_local(dataclasses.replace(job, memory_limit=memory_limit))


def score(
    model,
    sequences,
    *,
    stages: int = 2,
    policy=None,
    layers=None,
    groups: int | None = None,
    offload_dir=None,
    threads: int | None = None,
    timeout_s: float = 300.0,
    teacher_forced: bool = False,
    memory_limit: float | None = None,
):
    """:meth:`flexlab.Engine.score` on a pipeline of ``stages`` local processes (keywords as
    :func:`generate`'s)."""
    job = _job(
        model,
        stages,
        policy,
        layers,
        groups,
        offload_dir,
        threads,
        timeout_s,
        "score",
        sequences,
        {"teacher_forced": teacher_forced},
    )
    return run_local(dataclasses.replace(job, memory_limit=memory_limit))


def _job(model, stages, policy, layers, groups, offload_dir, threads, timeout_s, task, inputs, options) -> PipelineJob:
    """The job, with everything checked here, before any process starts."""
    import inspect

    import torch

    from flexlab.engine.engine import Engine
    from flexlab.models.generation import encode_for_scoring, prepare_generation
    from flexlab.models.model import Model

    source = ModelSource.of(model)
    built = model if isinstance(model, Model) else source.load(torch.device("cpu"))  # lazy: reads no weights
    plan = make_plan(built.config, stages, policy, layers, groups)
    if task == "generate":  # Engine.generate's own keywords and defaults: an unknown one is a TypeError
        signature = inspect.signature(Engine.generate)
        unknown = sorted(k for k in options if k not in signature.parameters or k in ("self", "prompts"))
        if unknown:
            raise TypeError(f"generate() got unknown options {unknown}; it takes those of Engine.generate")
        if "progress" in options:  # the ranks run apart: no one process sees every token
            raise TypeError("generate() on a pipeline takes no progress bar; drop progress=")
        call = signature.bind(None, inputs, **options)
        call.apply_defaults()
        keywords = {k: v for k, v in call.arguments.items() if k not in ("self", "prompts", "progress")}
        prepare_generation(inputs, built.tokenizer, built.config, **keywords)
    else:
        encode_for_scoring(inputs, built.tokenizer, built.config)
    where = None if offload_dir is None else str(offload_dir)
    threads = threads or threads_per_rank(torch.get_num_threads(), plan.num_ranks, plan.groups)
    return PipelineJob(source, plan, task, list(inputs), dict(options), where, threads, timeout_s)
