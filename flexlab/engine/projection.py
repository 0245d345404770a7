"""The head's projection onto the vocabulary, a slice of it at a time, answering what each GPU
batch's head asks of it (:mod:`flexlab.engine.heads`): the logits of some hidden states, or the
log-probabilities of target tokens. One pass over the slices answers every question put to it,
so a streamed head's matrix (:func:`~flexlab.engine.table_rows.streamed_slices`) is read once for
all of a block's batches.

    >>> w = torch.randn(10, 4)
    >>> halves = (range(5), range(5, 10))
    >>> sliced = Projection(lambda: ((r, lambda x, r=r: x @ w[r.start : r.stop].T) for r in halves), 10)
    >>> x = torch.randn(3, 4)
    >>> (logits,) = sliced.answer([Logits(x)])
    >>> torch.allclose(logits, x @ w.T)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

LOGIT_BYTES = 64 << 20  # the most float32 logits a slice's log-probabilities are computed from at once
Project = Callable[[torch.Tensor], torch.Tensor]  # hidden states [n, hidden] -> logits [n, vocab]


@dataclass(frozen=True)
class Logits:
    """Ask for the logits of hidden states ``x`` (``[n, hidden]``): answered ``[n, vocab]``."""

    x: torch.Tensor


@dataclass(frozen=True)
class TargetScores:
    """Ask, for each ``xs[i]`` (``[n, hidden]``), for the float32 log-probability of
    ``targets[i]`` (``[n]``) at each position and whether it is the most likely token there:
    answered as a list of ``(log-probabilities, greedy)`` pairs."""

    xs: list[torch.Tensor]
    targets: list[torch.Tensor]


Ask = Logits | TargetScores


class Projection:
    """``slices()`` yields each slice of the vocabulary's token ids and a projection onto them,
    valid until the next slice is asked for (a streamed matrix comes through buffers reused
    slice after slice); each pass over them reads the matrix once."""

    def __init__(self, slices: Callable[[], Iterator[tuple[range, Project]]], vocab_size: int) -> None:
        self.slices, self.vocab_size = slices, vocab_size

    @classmethod
    def whole(cls, project: Project, vocab_size: int) -> Projection:
        """A projection onto the whole vocabulary at once."""
        return cls(lambda: iter([(range(vocab_size), project)]), vocab_size)

    def answer(self, asks: list[Ask]) -> list:
        """Every ask's answer, in one pass over the slices. The logits asks share one projection
        of their rows; a target's log-probabilities are summed across slices from a running
        maximum (as ``log_softmax`` does in one), each slice's logits in chunks of positions
        under ``LOGIT_BYTES``."""
        rows = [a.x for a in asks if isinstance(a, Logits)]
        x = rows[0] if len(rows) == 1 else torch.cat(rows) if rows else None
        runs = {
            i: [_Running(t.shape[0], t.device) for t in a.targets]
            for i, a in enumerate(asks)
            if isinstance(a, TargetScores)
        }
        logits = None
        for ids, project in self.slices():
            if x is not None:
                part = project(x)
                if len(ids) == self.vocab_size:  # the whole vocabulary at once: no copy
                    logits = part
                else:
                    logits = part.new_empty(x.shape[0], self.vocab_size) if logits is None else logits
                    logits[:, ids.start : ids.stop] = part
            step = max(1, LOGIT_BYTES // (4 * len(ids)))
            for i, states in runs.items():
                ask = asks[i]
                assert isinstance(ask, TargetScores)  # (for the type checker: runs holds only these)
                for xs, target, run in zip(ask.xs, ask.targets, states):
                    for p in range(0, xs.shape[0], step):
                        run.add(slice(p, p + step), project(xs[p : p + step]).float(), ids, target[p : p + step])
        out: list = []
        first = 0
        for i, a in enumerate(asks):
            if isinstance(a, Logits):
                assert logits is not None
                out.append(logits if len(rows) == 1 else logits[first : first + a.x.shape[0]])
                first += a.x.shape[0]
            else:
                out.append([run.result(target) for run, target in zip(runs[i], a.targets)])
        return out


class _Running:
    """Per position: the largest logit so far and its id (the first, as ``argmax`` picks), the
    sum of ``exp(logit - largest)``, and the target's logit once its slice came."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.top = torch.full((n,), -torch.inf, device=device)
        self.total = torch.zeros(n, device=device)
        self.target = torch.zeros(n, device=device)
        self.best = torch.zeros(n, dtype=torch.long, device=device)

    def add(self, at: slice, logits: torch.Tensor, ids: range, target: torch.Tensor) -> None:
        top, best = logits.max(dim=-1)
        new_top = torch.maximum(self.top[at], top)
        rescale = torch.exp(self.top[at] - new_top)  # 0 for the first slice: exp(-inf)
        self.total[at] = self.total[at] * rescale + torch.exp(logits - new_top[:, None]).sum(-1)
        self.best[at] = torch.where(top > self.top[at], best + ids.start, self.best[at])
        self.top[at] = new_top
        mine = (target >= ids.start) & (target < ids.stop)
        picked = logits.gather(-1, (target - ids.start).clamp(0, len(ids) - 1)[:, None]).squeeze(-1)
        self.target[at] = torch.where(mine, picked, self.target[at])

    def result(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets' log-probabilities, and whether each is the most likely token."""
        return self.target - self.top - self.total.log(), self.best == target
