"""Accuracy beyond perplexity: agreement with a reference generation, and last-word prediction.

>>> token_agreement([[5, 6, 7], [1, 2]], [[5, 6, 9], [1, 2]])
0.8
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flexlab.models.generation import GenerationResult


def token_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Share of generated positions where ``other`` has ``reference``'s token (pairs compared up
    to the shorter of the two, so an early stop on one side does not count as agreement)."""
    if len(reference) != len(other):
        raise ValueError(f"token_agreement got {len(reference)} reference generations and {len(other)} others")
    pairs = [(a, b) for ra, rb in zip(reference, other) for a, b in zip(ra, rb)]
    if not pairs:
        raise ValueError("token_agreement needs at least one generated token on both sides")
    return sum(a == b for a, b in pairs) / len(pairs)


@dataclass(frozen=True)
class LastWordItem:
    """A LAMBADA-style item: a passage's context and the token ids of its final word."""

    context: list[int]
    target: list[int]
    word: str


_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[.!?]?\s*$", re.DOTALL)


def last_word_items(
    texts: Sequence[str], tokenizer, *, min_words: int = 12, max_tokens: int = 200, limit: int | None = None
) -> list[LastWordItem]:
    """Passages (paragraphs of ``texts``) that end in a word, split into context and that word.

    The target is what the tokenizer makes of the whole passage after the context's tokens, so a
    word is predicted exactly as the model would see it; passages whose tokens do not split
    cleanly there are skipped.
    """
    items = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            m = _LAST_WORD.match(para)
            if m is None or len(para.split()) < min_words:
                continue
            context = tokenizer(m.group(1))["input_ids"]
            full = tokenizer(m.group(1) + " " + m.group(2))["input_ids"]
            if full[: len(context)] != context or len(full) > max_tokens or len(full) == len(context):
                continue
            items.append(LastWordItem(context, full[len(context) :], m.group(2)))
            if limit is not None and len(items) == limit:
                return items
    return items


def last_word_accuracy(
    generate: Callable[..., GenerationResult], items: Sequence[LastWordItem], batch_size: int = 16
) -> float:
    """Share of items whose final word greedy decoding reproduces exactly.

    ``generate`` is ``Model.generate`` or an engine's (prompts, ``max_new_tokens=``) → a result
    with ``token_ids``.
    """
    if not items:
        raise ValueError("last_word_accuracy needs at least one item")
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        result = generate(
            [it.context for it in chunk], max_new_tokens=max(len(it.target) for it in chunk), stop_token_ids=None
        )
        correct += sum(list(ids[: len(it.target)]) == it.target for ids, it in zip(result.token_ids, chunk))
    return correct / len(items)
