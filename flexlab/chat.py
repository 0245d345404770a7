"""A multi-turn chat over any causal LM: prompt formatting, history that fits the context, and
stopping when the model starts the next human turn (as FlexGen's sample chatbot).

A tokenizer with a chat template (an instruction-tuned Llama, Mistral or Qwen) formats the turns
itself (``apply_chat_template``) and its end-of-sequence token ends the answer; without one, the
plain format below is used and the answer ends where the model starts the next human turn.

    >>> chat = Chat(lambda prompts, **kw: None, tokenizer=None, max_positions=2048)
    >>> print(chat.prompt("What is a list?"))                 # doctest: +NORMALIZE_WHITESPACE
    A chat between a curious human and a knowledgeable artificial intelligence assistant.
    Human: Hello! What can you do?
    Assistant: As an AI assistant, I can answer questions and chat with you.
    Human: What is a list?
    Assistant:
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

SYSTEM = "A chat between a curious human and a knowledgeable artificial intelligence assistant."
EXAMPLE = ("Hello! What can you do?", "As an AI assistant, I can answer questions and chat with you.")


class Chat:
    """Keeps the history; :meth:`reply` formats the prompt, generates and records the turn.

    ``generate`` is ``Model.generate`` or an engine's; ``tokenizer`` (to fit the context; None
    counts characters / 4) and ``max_positions`` bound the prompt: the oldest turns are dropped
    until prompt plus ``max_new_tokens`` fit. ``eos_token_ids`` (the model's
    ``config.eos_token_ids``) end a templated answer as well as the tokenizer's own.
    """

    def __init__(
        self,
        generate: Callable,
        tokenizer,
        max_positions: int,
        *,
        max_new_tokens: int = 96,
        user: str = "Human",
        bot: str = "Assistant",
        system: str = SYSTEM,
        example: tuple[str, str] | None = EXAMPLE,
        eos_token_ids: Sequence[int] = (),
        **sampling,
    ) -> None:
        self.generate, self.tokenizer, self.max_positions = generate, tokenizer, max_positions
        self.max_new_tokens, self.user, self.bot, self.system = max_new_tokens, user, bot, system
        self.example, self.sampling, self.eos_token_ids = example, sampling, tuple(eos_token_ids)
        self.history: list[tuple[str, str]] = []

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"]) if self.tokenizer is not None else len(text) // 4 + 1

    @property
    def templated(self) -> bool:
        """Whether the tokenizer formats the turns (it has a chat template)."""
        return getattr(self.tokenizer, "chat_template", None) is not None

    def _templated_prompt(self, message: str) -> list[int]:
        """Token ids, as the template makes them (tokenizing its text again would add a second
        beginning-of-sequence token)."""
        history = list(self.history)
        while True:
            turns = [{"role": "system", "content": self.system}] if self.system else []
            for q, a in history:
                turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            turns.append({"role": "user", "content": message})
            ids = self.tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            if len(ids) <= self.max_positions - self.max_new_tokens or not history:
                break
            history = history[1:]  # drop the oldest exchange
        if len(ids) > self.max_positions - self.max_new_tokens:
            raise ValueError(
                f"the message is too long for the model's {self.max_positions} positions with "
                f"{self.max_new_tokens} new tokens; shorten it"
            )
        return ids

    def prompt(self, message: str) -> str | list[int]:
        """The prompt for ``message``: system line, example turn, as much history as fits (with
        a chat template: the template's token ids)."""
        if self.templated:
            return self._templated_prompt(message)
        head = [self.system] + (
            [f"{self.user}: {self.example[0]}", f"{self.bot}: {self.example[1]}"] if self.example else []
        )
        tail = [f"{self.user}: {message}", f"{self.bot}:"]
        turns = [line for q, a in self.history for line in (f"{self.user}: {q}", f"{self.bot}: {a}")]
        budget = self.max_positions - self.max_new_tokens
        while turns and self._length("\n".join(head + turns + tail)) > budget:
            turns = turns[2:]  # drop the oldest exchange
        text = "\n".join(head + turns + tail)
        if self._length(text) > budget:
            raise ValueError(
                f"the message is too long for the model's {self.max_positions} positions with "
                f"{self.max_new_tokens} new tokens; shorten it"
            )
        return text

    def reply(self, message: str) -> str:
        """Generate the assistant's answer to ``message`` and add the exchange to the history."""
        stop = f"\n{self.user}:"
        if self.templated:  # the template's turn ends with an end-of-sequence token
            eos = self.tokenizer.eos_token_id
            ids = dict.fromkeys(([] if eos is None else [int(eos)]) + list(self.eos_token_ids))
            rules: dict[str, Any] = dict(stop_token_ids=list(ids) or (), stop_strings=None)
        else:
            rules = dict(stop_strings=[stop])
        result = self.generate([self.prompt(message)], max_new_tokens=self.max_new_tokens, **rules, **self.sampling)
        text = (result.texts or [""])[0]
        answer = text.split(stop)[0]
        if self.templated and self.tokenizer.eos_token:
            answer = answer.split(self.tokenizer.eos_token)[0]
        answer = answer.strip()
        self.history.append((message, answer))
        return answer
