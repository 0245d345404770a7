"""The zig-zag block schedule as a pure generator of typed steps.

For each token, for each stage (embed, attention/MLP of every layer, head), for each GPU batch:
compute — so one load of a stage's weights serves the whole block. With prefetch distance 1
(``overlap=True``) the next stage's weights are requested when the current stage starts, and
so load while *all* of its batches compute; the next batch's cache and activations are
requested before the current batch computes; stores follow each compute and run behind it.
Distance 0 (``overlap=False``) requests each load only when it is needed. Cache loads may be
requested further ahead (``cache_ahead`` batches): an MLP stage reads no cache, so with the
cache on disk the disk would idle through it while the next attention stage's batches wait.

Nothing here touches a tensor, so the schedule can be printed, tested and plotted::

    >>> from flexlab.engine.schedule import block_schedule, make_stages
    >>> for s in block_schedule(2, make_stages(1, sep_layer=False), 1, prefetch=1, act_moves=False):
    ...     print(s)  # doctest: +ELLIPSIS
    load_weight t=0 stage=0
    load_weight t=0 stage=1
    compute t=0 stage=0 batch=0
    ...
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from flexlab.models.family import Part

StepKind = Literal["load_weight", "load_cache", "load_act", "recv", "compute", "store_cache", "store_act", "send"]
Key = tuple  # (kind, token, stage, batch); batch is None for weights
LOAD_KINDS: tuple[StepKind, ...] = ("load_cache", "recv", "load_act")  # a unit's loads beyond its weights


@dataclass(frozen=True)
class Stage:
    """One scheduling unit: the parts of the model it computes, and the layer they belong to."""

    index: int
    parts: tuple[Part, ...]  # ("embed",), ("attention",), ("mlp",), ("attention", "mlp"), ("head",)
    layer: int | None

    @property
    def has_cache(self) -> bool:
        return "attention" in self.parts

    @property
    def layer_index(self) -> int:
        """The layer of a stage inside the layers (not the embedding's or the head's)."""
        assert self.layer is not None, f"stage {self.index} is outside the layers"
        return self.layer

    @property
    def name(self) -> str:
        label = "+".join(self.parts)
        return label if self.layer is None else f"{label}.{self.layer}"


def make_stages(num_layers: int, sep_layer: bool) -> list[Stage]:
    """embed, then attention and MLP of each layer (one stage or two), then head."""
    parts: list[tuple[Part, ...]] = [("embed",), *([("attention",), ("mlp",)] if sep_layer else [("attention", "mlp")])]
    stages = [Stage(0, ("embed",), None)]
    for layer in range(num_layers):
        for p in parts[1:]:
            stages.append(Stage(len(stages), p, layer))
    stages.append(Stage(len(stages), ("head",), None))
    return stages


def share_of(stages: list[Stage], layers: range, num_layers: int) -> list[Stage]:
    """A pipeline rank's stages: those of ``layers``, with the embedding if they start at layer
    0 and the head if they end at the last (indices stay the whole model's)."""
    if not (0 <= layers.start < layers.stop <= num_layers and layers.step == 1):
        raise ValueError(f"layers {layers} is not a non-empty run of the model's {num_layers} layers")

    def mine(s: Stage) -> bool:
        if s.layer is not None:
            return s.layer in layers
        return layers.start == 0 if "embed" in s.parts else layers.stop == num_layers  # embed, or head

    return [s for s in stages if mine(s)]


@functools.lru_cache(maxsize=64)
def stages_of(num_layers: int, sep_layer: bool, layers: range | None = None) -> tuple[Stage, ...]:
    """:func:`make_stages`, or a pipeline rank's :func:`share_of` them with ``layers``; memoised
    (the stages are immutable), as the cost model asks for them at each of a search's predictions."""
    stages = make_stages(num_layers, sep_layer)
    return tuple(stages if layers is None else share_of(stages, layers, num_layers))


@dataclass(frozen=True)
class Step:
    """One thing to do. ``deps`` must finish first; ``releases`` may be freed after a compute."""

    kind: StepKind
    token: int
    stage: int
    batch: int | None = None
    deps: tuple[Key, ...] = field(default=(), compare=False)
    releases: tuple[Key, ...] = field(default=(), compare=False)

    @property
    def key(self) -> Key:
        return (self.kind, self.token, self.stage, self.batch)

    @property
    def batch_index(self) -> int:
        """The batch of a step that has one (every kind but the weights')."""
        assert self.batch is not None, f"{self} has no batch"
        return self.batch

    def __str__(self) -> str:
        batch = "" if self.batch is None else f" batch={self.batch}"
        return f"{self.kind} t={self.token} stage={self.stage}{batch}"


def block_schedule(
    num_tokens: int,
    stages: list[Stage],
    num_batches: int,
    *,
    prefetch: int,
    act_moves: bool,
    cache_ahead: int | None = None,
    peers: bool = False,
    groups: int = 1,
    defer_head: bool = False,
) -> Iterator[Step]:
    """Every step of one block, in issue order.

    ``num_tokens`` counts the prefill as token 0. ``act_moves`` says whether hidden states
    are stored and loaded between stages (activations off the gpu tier) or stay in memory.
    ``cache_ahead`` (default ``prefetch``): how many units (stage and batch) ahead of the
    computing one a cache load is requested; each one requested holds its buffers till computed.

    ``stages`` may be a contiguous run of the model's (one pipeline rank's share, global
    indices). With ``peers`` the ranks form a ring: the first stage's input comes by a ``recv``
    step (the previous rank's hidden state; for the embedding after the prefill, the head's next
    tokens from the last rank) and the last stage's output leaves by a ``send`` step (the
    hidden state, or the head's next tokens for every token but the last).

    ``groups`` > 1 splits the block's batches into that many groups of consecutive batches that
    take turns: token t of group 0 runs every stage, then token t of group 1, and so on; each
    group loads a stage's weights again (its weight steps' ``batch`` is the group). In a
    pipeline that is what keeps every rank busy: while rank 1 computes group 0, rank 0 computes
    group 1, and group 0's next tokens are back before rank 0 needs them.

    ``defer_head``: the head's computes of a group are answered by its last batch's (a streamed
    head's one pass over its matrix), so their sends wait till that one is computed.
    """
    cache_ahead = prefetch if cache_ahead is None else cache_ahead
    first, last = stages[0].index, stages[-1].index
    by_index = {s.index: s for s in stages}
    members = split_batches(num_batches, groups)
    # (token, stage, group): one load of a stage's weights, and the batches it serves
    stage_steps = [(t, s.index, g) for t in range(num_tokens) for g in range(len(members)) for s in stages]
    units = [(t, j, k) for t, j, g in stage_steps for k in members[g]]
    unit_stage = [n for n, (_, _, g) in enumerate(stage_steps) for _ in members[g]]
    weight_batch = (lambda g: None) if len(members) == 1 else (lambda g: g)
    issued: set[Key] = set()

    def emit(step: Step) -> Step:
        issued.add(step.key)
        return step

    def reads(kind: StepKind, t: int, j: int) -> bool:
        """Whether the units of token ``t`` and stage ``j`` read a load of ``kind``, beyond their
        stage's weights."""
        if kind == "load_cache":
            return by_index[j].has_cache and t > 0  # the prefill has no cache to read
        if kind == "recv":
            return peers and j == first and (j > 0 or t > 0)  # the prefill's embedding reads the prompt
        return act_moves and j > first  # load_act; the embedding reads token ids, not activations

    def load(kind: StepKind, t: int, j: int, k: int) -> Step | None:
        if not reads(kind, t, j):
            return None
        if kind == "load_cache":  # the previous token's rows
            return Step(kind, t, j, k, deps=(("store_cache", t - 1, j, k),))
        if kind == "load_act":  # the previous stage's hidden state
            return Step(kind, t, j, k, deps=(("store_act", t, j - 1, k),))
        return Step(kind, t, j, k)

    # The loads are issued in unit order, one cursor per kind: the next unit whose load of that kind
    # is still to come, up to its look-ahead. A load whose data is not yet stored (the next stage's
    # input, with one batch) is not prefetched: it and the units after it (whose data are stored
    # later still) wait, and it is issued at the latest when its own unit comes up.
    offered: tuple[tuple[StepKind, bool], ...] = (("load_cache", True), ("load_act", act_moves), ("recv", peers))
    kinds = [kind for kind, used in offered if used]
    ahead_of = {kind: cache_ahead if kind == "load_cache" else prefetch for kind in kinds}
    cursor = dict.fromkeys(kinds, 0)
    next_weight = 0
    held: list[Step] = []  # the head's sends, held back with ``defer_head``
    for n, (t, j, k) in enumerate(units):
        stage_index = unit_stage[n]
        g = stage_steps[stage_index][2]
        while next_weight < min(stage_index + 1 + prefetch, len(stage_steps)):
            tt, jj, gg = stage_steps[next_weight]
            next_weight += 1
            yield emit(Step("load_weight", tt, jj, weight_batch(gg)))
        for kind, ahead in ahead_of.items():
            m = cursor[kind]
            while m < min(n + 1 + ahead, len(units)):
                step = load(kind, *units[m])
                if step is not None:
                    if not all(d in issued for d in step.deps):
                        break
                    yield emit(step)
                m += 1
            cursor[kind] = m

        needs = [("load_weight", t, j, weight_batch(g))]
        needs += [(kind, t, j, k) for kind in LOAD_KINDS if reads(kind, t, j)]
        if not act_moves and j > first:
            needs.append(("compute", t, j - 1, k))  # the hidden state handed over in memory
        if j == 0 and t > 0 and not peers:
            needs.append(("compute", t - 1, last, k))  # the head's next tokens: this embedding's input
        releases = [key for key in needs if key[0] != "load_weight"]
        if k == members[g][-1]:
            releases.append(("load_weight", t, j, weight_batch(g)))  # the group is done with this stage's weights
        # A compute's value (hidden state, new cache rows) is freed by the last step that reads
        # it: the next stage's compute, or the store or send of the activation; the head's (the
        # next tokens) by the next token's embedding or their send, or by itself after the last token.
        me = ("compute", t, j, k)
        final_head = "head" in by_index[j].parts and t == num_tokens - 1
        if final_head:
            releases.append(me)
        yield emit(Step("compute", t, j, k, deps=tuple(needs), releases=tuple(releases)))

        if by_index[j].has_cache:
            yield emit(Step("store_cache", t, j, k, deps=(me,)))
        if peers and j == last and not final_head:
            held.append(Step("send", t, j, k, deps=(me,), releases=(me,)))
            if not defer_head or k == members[g][-1]:
                yield from map(emit, held)
                held.clear()
        elif act_moves and j < last:
            yield emit(Step("store_act", t, j, k, deps=(me,), releases=(me,)))


def split_batches(num_batches: int, groups: int) -> list[range]:
    """``num_batches`` batches in ``groups`` runs of consecutive ones, as even as they can be
    (never more groups than batches)::

        >>> split_batches(5, 2)
        [range(0, 3), range(3, 5)]
    """
    groups = max(1, min(groups, num_batches))
    bounds = [-(-i * num_batches // groups) for i in range(groups + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]
