"""Which layers each pipeline rank holds, and what it runs them under: pure data, checked up front.

A pipeline of N ranks splits the model's layers into N contiguous runs; rank 0 also embeds, the
last rank also holds the head. Without a split given, the layers are balanced by the weights each
rank reads per token (a decode step's time on a rank is its weight reads or its matmuls, both in
proportion to those bytes), the embedding's and the head's included::

    >>> from flexlab.models.config import get_preset
    >>> [len(r) for r in split_layers(get_preset("opt-1.3b"), 4)]  # the token table weighs two layers
    [5, 7, 7, 5]
"""

from __future__ import annotations

from dataclasses import dataclass

from flexlab.engine.policy import Policy
from flexlab.errors import FlexlabError
from flexlab.models.config import ModelConfig
from flexlab.models.family import part_weights
from flexlab.models.registry import get_family


class PipelineError(FlexlabError):
    """A pipeline that cannot be built, or a rank of one that failed."""


@dataclass(frozen=True)
class PipelinePlan:
    """Per rank: its layers and its Policy; and into how many groups of GPU batches, taking
    turns, every rank splits a block (see :func:`~flexlab.engine.schedule.block_schedule`)."""

    layers: tuple[range, ...]
    policies: tuple[Policy, ...]
    groups: int = 1

    @property
    def num_ranks(self) -> int:
        return len(self.layers)

    def describe(self) -> str:
        ranks = " | ".join(
            f"rank {r}: layers {rs.start}-{rs.stop - 1} {p.describe()}"
            for r, (rs, p) in enumerate(zip(self.layers, self.policies))
        )
        return f"{ranks} | {self.groups} group(s) of batches"

    def to_dict(self) -> dict:
        """JSON-ready: layers per rank, groups, and each rank's policy (``flexlab generate --plan``)."""
        return dict(
            layers=[len(r) for r in self.layers], groups=self.groups, policies=[p.to_dict() for p in self.policies]
        )

    @classmethod
    def from_dict(cls, config: ModelConfig, d: dict) -> PipelinePlan:
        """The plan ``to_dict`` wrote, checked against ``config`` as :func:`make_plan` checks it."""
        try:
            policies = [Policy.from_dict(p) for p in d["policies"]]
            return make_plan(config, len(policies), policies, d["layers"], d["groups"])
        except (KeyError, TypeError) as e:
            raise PipelineError(f"not a pipeline plan (layers, groups, policies): {e!r}") from None


def make_plan(
    config: ModelConfig,
    num_ranks: int,
    policy: Policy | list[Policy] | tuple[Policy, ...] | None = None,
    layers: list[int] | tuple[int, ...] | None = None,
    groups: int | None = None,
) -> PipelinePlan:
    """The plan for ``num_ranks`` ranks; ``policy`` is one for all or one per rank, ``layers`` the
    number of layers of each rank (default: balanced), ``groups`` the groups of GPU batches
    (default: one per rank, so that every rank has one to work on, at most one per batch; 1
    loads each rank's weights once per token, but the ranks then mostly take turns). Raises
    PipelineError on bad input."""
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise PipelineError(f"a pipeline needs 1 or more stages, got {num_ranks!r}")
    if num_ranks > config.num_layers:
        raise PipelineError(
            f"{num_ranks} stages for {config.num_layers} layers: each stage needs a layer; use at most "
            f"{config.num_layers} stages"
        )
    policies = list(policy) if isinstance(policy, (list, tuple)) else [policy or Policy()] * num_ranks
    if len(policies) != num_ranks or not all(isinstance(p, Policy) for p in policies):
        raise PipelineError(f"give one Policy, or one per stage ({num_ranks}); got {policy!r}")
    if layers is None:
        ranges = split_layers(config, num_ranks)
    else:
        counts = list(layers)
        if len(counts) != num_ranks or any(not isinstance(n, int) or n < 1 for n in counts):
            raise PipelineError(f"layers must give each of the {num_ranks} stages 1 or more layers, got {counts}")
        if sum(counts) != config.num_layers:
            raise PipelineError(f"layers {counts} add up to {sum(counts)}, but the model has {config.num_layers}")
        ranges = _ranges(counts)
    batch_shapes = {(p.gpu_batch_size, p.num_gpu_batches) for p in policies}
    if len(batch_shapes) > 1:
        raise PipelineError(
            "every stage runs the same GPU batches (they are the pipeline's micro-batches): give the "
            f"policies one gpu_batch_size and num_gpu_batches, not {sorted(batch_shapes)}"
        )
    batches = policies[0].num_gpu_batches
    if groups is None:
        groups = min(num_ranks, batches)
    if not isinstance(groups, int) or isinstance(groups, bool) or not 1 <= groups <= batches:
        raise PipelineError(
            f"groups must be from 1 to num_gpu_batches ({batches}), got {groups!r}; raise num_gpu_batches "
            "to give each group its own batches"
        )
    return PipelinePlan(tuple(ranges), tuple(policies), groups)


def split_layers(config: ModelConfig, num_ranks: int) -> list[range]:
    """Contiguous runs of layers whose weights (with the embedding on the first, the head on the
    last) are as even as they can be: the largest rank's share is the smallest possible."""
    embed, per_layer, head = _weight_parts(config)
    n = config.num_layers

    def fill(limit: float) -> list[int] | None:
        """Each rank filled with layers up to ``limit`` in turn (which leaves the least to the last
        rank); the counts, or None if N ranks cannot hold the model within it."""
        counts, left = [], n
        for r in range(num_ranks):
            load, take = embed if r == 0 else 0, 0
            while take < left - (num_ranks - r - 1) and load + per_layer <= limit:
                take, load = take + 1, load + per_layer
            if take == 0 or (r == num_ranks - 1 and (take < left or load + head > limit)):
                return None
            counts.append(take)
            left -= take
        return counts

    # the largest share is some run of layers' weights: try them from the smallest up
    candidates = sorted(
        {embed * (a == 0) + head * (b == n) + per_layer * (b - a) for a in range(n) for b in range(a + 1, n + 1)}
    )
    for limit in candidates:
        counts = fill(limit)
        if counts is not None:
            return _ranges(counts)
    raise AssertionError("one layer per rank always fits the largest candidate")


def _weight_parts(config: ModelConfig) -> tuple[int, int, int]:
    """Elements of the weights the embedding, one layer, and the head read (a tied table in both)."""
    specs = get_family(config.family).weight_specs(config)
    per_layer = sum(s.numel for s in specs if s.layer == 0)
    return (
        sum(s.numel for s in part_weights(specs, "embed")),
        per_layer,
        sum(s.numel for s in part_weights(specs, "head")),
    )


def _shares(config: ModelConfig, counts: list[int]) -> list[int]:
    """Each rank's weight elements, for ``counts`` layers per rank."""
    embed, per_layer, head = _weight_parts(config)
    return [embed * (r == 0) + head * (r == len(counts) - 1) + per_layer * c for r, c in enumerate(counts)]


def _ranges(counts: list[int]) -> list[range]:
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out
