"""The head's projection a slice of the vocabulary at a time (``projection.Projection``): the
log-probabilities of targets, summed across slices from a running maximum, equal
``log_softmax``'s over the whole vocabulary, the greedy flags ``argmax``'s, and several asks'
logits equal their own projections; every answer comes from one pass over the slices."""

from __future__ import annotations

import pytest
import torch

from flexlab.engine.projection import Logits, Projection, TargetScores


def _sliced(weight: torch.Tensor, width: int, passes: list[int]) -> Projection:
    vocab = weight.shape[0]

    def slices():
        passes.append(1)
        for start in range(0, vocab, width):
            ids = range(start, min(start + width, vocab))
            yield ids, lambda x, w=weight[ids.start : ids.stop]: x @ w.T

    return Projection(slices, vocab)


@pytest.mark.parametrize("width", [7, 50, 64])  # slices of uneven width, two, the whole
def test_sliced_log_probs_equal_log_softmax(width, monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(64, 16)
    weight[40] = weight[3]  # a tie across slices: argmax picks the first
    xs = [torch.randn(n, 16) for n in (5, 1, 9)]
    targets = [torch.randint(0, 64, (len(x),)) for x in xs]
    targets[0][0] = 3
    xs[0][0] = weight[3] * 10  # its most likely tokens are 3 and 40, tied
    monkeypatch.setattr("flexlab.engine.projection.LOGIT_BYTES", 2 * 4 * width)  # two positions at a time
    passes: list[int] = []
    first, second = _sliced(weight, width, passes).answer(
        [TargetScores(xs[:2], targets[:2]), TargetScores(xs[2:], targets[2:])]
    )
    assert len(passes) == 1  # one pass over the matrix for every ask
    for (lp, greedy), x, target in zip(first + second, xs, targets):
        logits = x @ weight.T
        ref = torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
        torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
        assert greedy.tolist() == (logits.argmax(-1) == target).tolist()
    assert first[0][1][0]  # token 3, tied with 40, is the greedy one


@pytest.mark.parametrize("width", [6, 20])
def test_several_asks_get_their_own_logits_in_one_pass(width):
    weight = torch.randn(20, 4)
    xs = [torch.randn(n, 4) for n in (3, 1, 2)]
    passes: list[int] = []
    answers = _sliced(weight, width, passes).answer([Logits(x) for x in xs])
    assert len(passes) == 1
    for got, x in zip(answers, xs):
        torch.testing.assert_close(got, x @ weight.T)
    (whole,) = Projection.whole(lambda h: h @ weight.T, 20).answer([Logits(xs[0])])
    torch.testing.assert_close(whole, xs[0] @ weight.T)
