"""The head's projection a slice of the vocabulary at a time (``heads.Projection``): its
log-probabilities of targets, summed across slices from a running maximum, equal
``log_softmax``'s over the whole vocabulary, and its greedy flags ``argmax``'s."""

from __future__ import annotations

import pytest
import torch

from flexlab.engine.heads import Projection


def _sliced(weight: torch.Tensor, width: int, passes: list[int]) -> Projection:
    vocab = weight.shape[0]

    def slices():
        passes.append(1)
        for start in range(0, vocab, width):
            ids = range(start, min(start + width, vocab))
            yield ids, lambda x, w=weight[ids.start : ids.stop]: x @ w.T

    return Projection(slices)


@pytest.mark.parametrize("width", [7, 50, 64])  # slices of uneven width, one slice, the whole
def test_sliced_log_probs_equal_log_softmax(width, monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(64, 16)
    weight[40] = weight[3]  # a tie across slices: argmax picks the first
    xs = [torch.randn(n, 16) for n in (5, 1, 9)]
    targets = [torch.randint(0, 64, (len(x),)) for x in xs]
    targets[0][0] = 3
    xs[0][0] = weight[3] * 10  # its most likely tokens are 3 and 40, tied
    monkeypatch.setattr("flexlab.engine.heads.LOGIT_BYTES", 2 * 4 * width)  # two positions at a time
    passes: list[int] = []
    got = _sliced(weight, width, passes).target_log_probs(xs, targets)
    assert len(passes) == 1  # one pass over the matrix for every sequence
    for (lp, greedy), x, target in zip(got, xs, targets):
        logits = x @ weight.T
        ref = torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
        torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
        assert greedy.tolist() == (logits.argmax(-1) == target).tolist()
    assert got[0][1][0]  # token 3, tied with 40, is the greedy one


def test_a_sliced_projection_joins_its_logits():
    weight = torch.randn(20, 4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(_sliced(weight, 6, []).__call__(x), x @ weight.T)
    whole = Projection.whole(lambda h: h @ weight.T, 20)
    torch.testing.assert_close(whole(x), x @ weight.T)
