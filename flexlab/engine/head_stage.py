"""The head stage's compute: a GPU batch's head (:mod:`~flexlab.engine.heads`) asks the projection
onto the vocabulary (:mod:`~flexlab.engine.projection`) for what it needs, onto the matrix as the
stage loaded it, or read from disk a slice at a time on the weight lane while the compute projects
onto the slice before (:func:`~flexlab.engine.table_rows.streamed_slices`). A streamed matrix
answers all of a group's batches in one pass, with the group's last batch."""

from __future__ import annotations

from concurrent.futures import Future

import torch

from flexlab.engine.context import BlockContext
from flexlab.engine.executor import LANES
from flexlab.engine.heads import Head
from flexlab.engine.projection import Ask, Projection
from flexlab.engine.schedule import Step, split_batches
from flexlab.engine.table_rows import streamed_slices


class HeadStage:
    """The head's computes of one block of ``num_batches`` GPU batches."""

    def __init__(self, ctx: BlockContext, head: Head, num_batches: int) -> None:
        self.ctx, self.head = ctx, head
        self.asked: list[tuple[int, Ask, dict]] = []  # batches waiting for their group's last
        self.last_of = {k: group[-1] for group in split_batches(num_batches, ctx.groups) for k in group}

    def compute(self, step: Step, w: dict, h: torch.Tensor) -> dict:
        """Batch ``k``'s head on the last stage's hidden state ``h``: its next tokens (``next``)
        and, in a pipeline, whether every sequence has stopped (``stop``). With a streamed matrix
        the value of a batch before its group's last is filled in with the last one's compute,
        before anything reads it (the next token's embedding; a send, held back till then by the
        schedule's ``defer_head``)."""
        ctx, t, k = self.ctx, step.token, step.batch_index
        out: dict = {}
        self.asked.append((k, self.head.ask(h, t, k), out))
        if step.stage in ctx.weights.streamed and k != self.last_of[k]:
            return out
        before, asked = self.head.finished(), self.asked
        self.asked = []
        for (kk, _, value), answer in zip(asked, self._projection(step, w).answer([a for _, a, _ in asked])):
            value["next"] = self.head.take(answer, t, kk)
            # sent on to the first rank: whether every sequence had stopped when this batch's compute came
            value["stop"] = ctx.peers is not None and (self.head.finished() if kk == k else before)
        return out

    def _projection(self, step: Step, w: dict) -> Projection:
        ctx, f, cfg = self.ctx, self.ctx.family, self.ctx.config
        if step.stage not in ctx.weights.streamed:
            return Projection.whole(lambda x: f.head(w, cfg, x), cfg.vocab_size)
        name, stream = ctx.weights.streamed[step.stage].spec.short, ctx.weights.streams[step.stage]

        def fetch(rows: range, slot: int) -> Future:
            return ctx.executor.ahead(LANES["load_weight"], "read_head", step, lambda: stream.read(rows, slot))

        def wait_for(read: Future) -> torch.Tensor:  # the compute waiting on a slice: an event of its lane
            return read.result() if read.done() else ctx.executor.timed("wait_head", step, read.result)

        slices = streamed_slices(
            lambda part, x: f.head(part, cfg, x), w, name, cfg.vocab_size, stream.slices, fetch, wait_for
        )
        return Projection(slices, cfg.vocab_size)
