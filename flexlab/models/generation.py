"""What every generation path shares: prompt checks and padding, token choice, stopping, results.

The reference path (:mod:`flexlab.models.reference`) and the offloading engine both use these,
so greedy decoding, sampling and stop rules are defined once.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flexlab.errors import PromptError


def encode_prompts(prompts, tokenizer, *, max_positions: int, max_new_tokens: int, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt, checked before any work starts.

    ``prompts`` is a list of strings (needs a tokenizer) or of token-id lists (or 1-d integer
    tensors); every id must be an integer in ``[0, vocab_size)``.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise PromptError(
            f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}; "
            "wrap a single prompt in a list"
        )
    if len(prompts) == 0:
        raise PromptError("prompts is empty; pass at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PromptError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise PromptError("string prompts need a tokenizer, and this model has none; pass token-id lists")
            p = tokenizer(p)["input_ids"]
        p = _token_ids(p, i, vocab_size)
        if not p:
            raise PromptError(f"prompt {i} is empty; every prompt needs at least one token")
        if len(p) + max_new_tokens > max_positions:
            raise PromptError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's {max_positions} positions; shorten the prompt or generate fewer tokens"
            )
        ids.append(p)
    return ids


def _token_ids(prompt, i: int, vocab_size: int) -> list[int]:
    """Prompt ``i`` as a list of ints, each checked: an id the embedding cannot look up would
    fail deep inside a run, and a float id would be silently truncated."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise PromptError(
                f"prompt {i} is a {prompt.dim()}-d {prompt.dtype} tensor; pass a 1-d integer tensor or a list of ints"
            )
        prompt = prompt.tolist()
    elif isinstance(prompt, (bytes, dict)) or not isinstance(prompt, Sequence):
        raise PromptError(f"prompt {i} is a {type(prompt).__name__}; pass a string or a list of token ids")
    ids = []
    for pos, t in enumerate(prompt):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise PromptError(
                f"prompt {i}, position {pos}: token id {t!r} is not an integer; pass ints in [0, {vocab_size - 1}]"
            )
        if not 0 <= int(t) < vocab_size:
            raise PromptError(
                f"prompt {i}, position {pos}: token id {t} is outside the vocabulary [0, "
                f"{vocab_size - 1}]; check the tokenizer matches the model"
            )
        ids.append(int(t))
    return ids


def prepare_generation(
    prompts,
    tokenizer,
    config,
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stop_token_ids,
    stop_strings,
) -> tuple[list[list[int]], SamplingConfig, StopCriteria]:
    """Checked token ids, sampling settings and stop rules of a ``generate`` call.

    ``stop_token_ids=()`` (the default of every ``generate``) means the model's end-of-sequence
    tokens (``config.eos_token_ids``), as in transformers; ``None`` means never stop early.
    """
    ids = encode_prompts(
        prompts,
        tokenizer,
        max_positions=config.max_positions,
        max_new_tokens=max_new_tokens,
        vocab_size=config.vocab_size,
    )
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if stop_token_ids == ():
        stop_token_ids = list(config.eos_token_ids)
    return ids, sampling, StopCriteria(len(ids), stop_token_ids, stop_strings, tokenizer)


def encode_for_scoring(sequences, tokenizer, config) -> list[list[int]]:
    """Token ids of sequences to score: each needs at least 2 tokens and at most one more than the
    model's positions (the last token is only predicted, never fed)."""
    ids = encode_prompts(
        sequences, tokenizer, max_positions=sys.maxsize, max_new_tokens=1, vocab_size=config.vocab_size
    )
    short = [i for i, s in enumerate(ids) if len(s) < 2]
    if short:
        raise PromptError(f"sequence(s) {short} have fewer than 2 tokens; nothing to score")
    long = [i for i, s in enumerate(ids) if len(s) > config.max_positions + 1]
    if long:
        raise PromptError(
            f"sequence(s) {long} have more than {config.max_positions + 1} tokens: the model has "
            f"{config.max_positions} positions (the last token is only predicted); score them in windows"
        )
    return ids


def left_pad(
    ids: list[list[int]], pad_id: int, device: str | torch.device = "cpu", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, width]`` token ids padded on the left (``width`` defaults to the longest), and the
    ``[b, width]`` bool mask of real tokens."""
    width = width or max(len(p) for p in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(ids), width), dtype=torch.bool)
    for row, p in enumerate(ids):
        tokens[row, width - len(p) :] = torch.tensor(p)
        valid[row, width - len(p) :] = True
    return tokens.to(device), valid.to(device)


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens (OPT's rule, so left padding is invisible); pads get -1."""
    v = valid.long()
    return torch.cumsum(v, dim=1) * v - 1


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is chosen: greedy by default, as in transformers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, numbers.Real) or not 0 < self.temperature < math.inf:
            raise PromptError(
                f"temperature must be a finite number > 0, got {self.temperature!r}; use do_sample=False for greedy"
            )
        if self.top_k is not None and self.top_k < 1:
            raise PromptError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Chooses next tokens from ``[b, vocab]`` logits; seeded, so sampling is reproducible."""

    def __init__(self, cfg: SamplingConfig, device: str | torch.device) -> None:
        self.cfg = cfg
        self.generator = None
        if cfg.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if not self.cfg.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / self.cfg.temperature
        if self.cfg.top_k is not None and self.cfg.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.cfg.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.cfg.top_p is not None and self.cfg.top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= self.cfg.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def _per_sequence(value, n: int, name: str) -> list[list]:
    """Broadcast a stop rule (None, a flat list, or one list per sequence) to ``n`` lists."""
    if value is None:
        return [[] for _ in range(n)]
    if isinstance(value, (int, str)):
        value = [value]
    value = list(value)
    if value and all(isinstance(v, (list, tuple)) for v in value):
        if len(value) != n:
            raise PromptError(
                f"{name} has {len(value)} per-sequence lists for {n} prompts; give one per prompt "
                "or a single flat list for all"
            )
        return [list(v) for v in value]
    return [value for _ in range(n)]


class StopCriteria:
    """Per-sequence stop token ids and stop strings; tracks which sequences are finished."""

    def __init__(self, n: int, stop_token_ids, stop_strings, tokenizer) -> None:
        self.token_ids = [set(map(int, ids)) for ids in _per_sequence(stop_token_ids, n, "stop_token_ids")]
        self.strings = _per_sequence(stop_strings, n, "stop_strings")
        if any(self.strings) and tokenizer is None:
            raise PromptError("stop_strings need a tokenizer, and this model has none; use stop_token_ids")
        self.tokenizer = tokenizer
        self.finished = [False] * n

    def update(self, generated: list[list[int]]) -> list[bool]:
        """Mark sequences whose newest token completes a stop rule; returns the finished flags."""
        for i, toks in enumerate(generated):
            if self.finished[i] or not toks:
                continue
            if toks[-1] in self.token_ids[i]:
                self.finished[i] = True
            elif self.strings[i]:
                # A stop string of L characters spans at most L tokens: decode only that tail.
                tail = self.tokenizer.decode(toks[-max(map(len, self.strings[i])) - 1 :])
                self.finished[i] = any(s in tail for s in self.strings[i])
        return self.finished

    def truncate_text(self, i: int, text: str) -> str:
        """Cut ``text`` just after its first stop string (kept, as transformers keeps it)."""
        cuts = [text.find(s) + len(s) for s in self.strings[i] if s in text]
        return text[: min(cuts)] if cuts else text

    def texts(self, generated: list[list[int]]) -> list[str] | None:
        """The decoded new text of each sequence, cut at its stop string (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        return [
            self.truncate_text(i, self.tokenizer.decode(g, skip_special_tokens=True)) for i, g in enumerate(generated)
        ]


@dataclass
class GenerationResult:
    """What ``generate`` returns. ``token_ids`` holds the new tokens only, one list per prompt."""

    token_ids: list[list[int]]
    texts: list[str] | None
    metrics: dict[str, float] = field(default_factory=dict)
    timeline: Any = None  # the engine's flexlab.timeline.Timeline (a floor above this one); None on the reference path
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # tier -> category -> bytes, at its peak

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v:.4g}</td></tr>" for k, v in self.metrics.items())
        return f"<b>GenerationResult</b>: {len(self.token_ids)} sequences<table>{rows}</table>"


def generation_metrics(n_tokens: int, prefill_s: float, decode_s: float) -> dict[str, float]:
    """FlexGen's definition: generated tokens over the whole latency, prefill included."""
    total = prefill_s + decode_s
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total,
        "new_tokens": float(n_tokens),
        "throughput_tok_s": n_tokens / total if total > 0 else float("nan"),
    }
