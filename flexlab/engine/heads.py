"""What the model's head does at the end of each token, one class per kind of run.

A head takes the last stage's hidden state of one GPU batch, asks the projection onto the
vocabulary for what it needs of it (:mod:`flexlab.engine.projection`: the last position's logits,
or the log-probabilities of targets), and from the answer returns the token ids the next token's
embedding reads (the schedule carries them from the head's compute to that embedding):

* :class:`GenerateHead` samples them, and collects the new tokens and the stop rules' verdict;
* :class:`ScoreHead` runs the prefill only and keeps each sequence's log-probabilities;
* :class:`TeacherHead` feeds each sequence its own next token, one at a time through decode (so a
  compressed cache is written and read back), and keeps the same log-probabilities.

Each also says what the prefill reads (``prefill_ids``), how many tokens the block runs, and
whether anything will read the KV cache it writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from flexlab.engine.projection import Ask, Logits, TargetScores


class Head:
    """A block's ``ids`` split into GPU batches of ``gpu_batch_size`` (the last may be short)."""

    keeps_cache = True  # False: nothing reads this run's KV cache, so it is not stored
    prefill_done: float | None = None  # when the first token's new ids reached the host

    def __init__(self, ids: list[list[int]], gpu_batch_size: int, num_tokens: int) -> None:
        self.ids, self.num_tokens = ids, num_tokens
        starts = range(0, len(ids), gpu_batch_size)
        self.batch_rows = [list(range(i, min(i + gpu_batch_size, len(ids)))) for i in starts]

    def prefill_ids(self) -> list[list[list[int]]]:
        """Per GPU batch, the token ids the prefill embeds."""
        return [[self.ids[r] for r in rows] for rows in self.batch_rows]

    def finished(self) -> bool:
        """Whether the run may stop before ``num_tokens`` (every sequence has stopped)."""
        return False

    def ask(self, h: torch.Tensor, t: int, k: int) -> Ask:
        """What batch ``k`` needs of the projection onto the vocabulary, from the last stage's
        hidden state ``h`` (``[b, s, hidden]``)."""
        return Logits(h[:, -1])

    def take(self, answer, t: int, k: int) -> torch.Tensor | None:
        """The :class:`~flexlab.engine.projection.Projection`'s ``answer`` to :meth:`ask`: batch
        ``k``'s next token ids (the next embedding's input), or None after the last token.
        Called for the batches in order."""
        raise NotImplementedError


class GenerateHead(Head):
    """Samples each sequence's next token; new tokens go into ``generated`` (the caller's
    per-prompt lists, this block's prompts from ``offset``), checked by ``stop``; ``on_token``
    is called once per token of the block, with the sequences still running (a progress bar)."""

    def __init__(
        self,
        ids,
        gpu_batch_size: int,
        max_new_tokens: int,
        *,
        sampler,
        stop,
        generated: list[list[int]],
        offset: int,
        on_token: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(ids, gpu_batch_size, max_new_tokens)
        self.sampler, self.stop, self.generated, self.offset = sampler, stop, generated, offset
        self.on_token = on_token
        self._new: list[torch.Tensor | None] = [None] * len(self.batch_rows)
        self._finished = self._all_stopped()

    def _all_stopped(self) -> bool:
        return all(self.stop.finished[self.offset : self.offset + len(self.ids)])

    def finished(self) -> bool:
        return self._finished  # asked after every compute; only this head's update changes it

    def take(self, answer, t, k):
        new = self._new[k] = self.sampler(answer)  # stays on the device for the next embed
        if k == len(self.batch_rows) - 1:
            # After the block's last batch: one host sync per token brings every new token over.
            running = 0
            for row, tok in enumerate(torch.cat(self._new).tolist()):
                if not self.stop.finished[self.offset + row]:
                    self.generated[self.offset + row].append(tok)
                    running += 1
            self.stop.update(self.generated)
            self._finished = self._all_stopped()
            if self.on_token is not None:
                self.on_token(running)
            if t == 0:
                self.prefill_done = time.perf_counter()  # .tolist() waited for the device: the prefill is done
        return new


class ScoreHead(Head):
    """One prefill; ``scores[i]``: float32 log-probabilities of tokens ``1..n-1`` of sequence ``i``;
    ``greedy[i]``: whether each of them is the most likely token there (bool)."""

    keeps_cache = False

    def __init__(self, ids, gpu_batch_size: int) -> None:
        super().__init__(ids, gpu_batch_size, 1)
        self.width = max(map(len, ids)) - 1  # the fed tokens (all but each last) are left-padded to it
        self.scores: list[torch.Tensor] = [torch.empty(0)] * len(ids)
        self.greedy: list[torch.Tensor] = [torch.empty(0, dtype=torch.bool)] * len(ids)

    def prefill_ids(self):
        # A sequence's last token is only predicted: feeding it would cost a position and compute.
        return [[self.ids[r][:-1] for r in rows] for rows in self.batch_rows]

    def ask(self, h, t, k):
        # Each sequence's own positions (left-padded to the batch's width), all of the batch's in one
        # pass over the head's matrix: a streamed head reads it once, not once per sequence.
        seqs = [self.ids[row] for row in self.batch_rows[k]]
        xs = [h[r, self.width - (len(seq) - 1) :] for r, seq in enumerate(seqs)]
        return TargetScores(xs, [torch.tensor(seq[1:], device=h.device) for seq in seqs])

    def take(self, answer, t, k):
        for row, (scores, greedy) in zip(self.batch_rows[k], answer):
            self.scores[row], self.greedy[row] = scores.cpu(), greedy.cpu()
        return None


class TeacherHead(Head):
    """Each sequence fed one token at a time; ``scores`` as :class:`ScoreHead`'s."""

    def __init__(self, ids, gpu_batch_size: int, pad_token_id: int, device: torch.device) -> None:
        longest = max(map(len, ids))
        super().__init__(ids, gpu_batch_size, longest - 1)
        # right-padded: token i of every sequence in column i
        self.targets = [
            torch.tensor([ids[r] + [pad_token_id] * (longest - len(ids[r])) for r in rows], device=device)
            for rows in self.batch_rows
        ]
        self._logprobs: list[list[torch.Tensor]] = [[] for _ in self.batch_rows]
        self._greedy: list[list[torch.Tensor]] = [[] for _ in self.batch_rows]
        self.scores: list[torch.Tensor] = [torch.empty(0)] * len(ids)
        self.greedy: list[torch.Tensor] = [torch.empty(0, dtype=torch.bool)] * len(ids)

    def prefill_ids(self):
        return [[self.ids[r][:1] for r in rows] for rows in self.batch_rows]  # the rest come one by one

    def take(self, answer, t, k):
        logprobs = torch.log_softmax(answer.float(), dim=-1)  # [b, vocab]
        target = self.targets[k][:, min(t + 1, self.targets[k].shape[1] - 1)]
        self._logprobs[k].append(logprobs.gather(-1, target[:, None]).squeeze(-1))
        self._greedy[k].append(logprobs.argmax(-1) == target)
        if t == self.num_tokens - 1:
            lp = torch.stack(self._logprobs[k], dim=1).cpu()  # [b, tokens]
            top = torch.stack(self._greedy[k], dim=1).cpu()
            for r, row in enumerate(self.batch_rows[k]):
                self.scores[row] = lp[r, : len(self.ids[row]) - 1]
                self.greedy[row] = top[r, : len(self.ids[row]) - 1]
        return target  # the next input is the sequence's own next token
