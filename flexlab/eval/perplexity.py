"""Perplexity of texts under a model, and the unigram baseline it must beat."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch


def chunk_ids(ids: Sequence[int], max_len: int) -> list[list[int]]:
    """Split a token stream into consecutive windows of at most ``max_len`` tokens (≥ 2 each)."""
    chunks = [list(ids[i : i + max_len]) for i in range(0, len(ids), max_len)]
    return [c for c in chunks if len(c) >= 2]


def perplexity(
    score: Callable[[list[list[int]]], list[torch.Tensor]], sequences: list[list[int]], batch_size: int = 8
) -> float:
    """exp of the mean negative log-likelihood over every scored token.

    ``score`` is ``Model.score`` (or an engine's): sequences → log-probs of tokens 1..n-1.
    """
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        for lp in score(sequences[i : i + batch_size]):
            total -= float(lp.double().sum())
            count += lp.numel()
    return math.exp(total / count)


def unigram_perplexity(train_ids: Sequence[int], test_ids: Sequence[int], vocab_size: int) -> float:
    """Perplexity of a add-one-smoothed unigram model fitted on ``train_ids``."""
    counts = Counter(train_ids)
    denom = len(train_ids) + vocab_size
    nll = -sum(math.log((counts[t] + 1) / denom) for t in test_ids)
    return math.exp(nll / len(test_ids))
