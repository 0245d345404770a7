"""The reference path: every weight and the whole KV cache on the compute device, no schedule.

It is the oracle the offloading engine is tested against and the "no offloading" baseline in
benchmarks. It calls the family's maths in the plainest order: prefill the prompts, then one
token at a time against a preallocated KV cache.
"""

from __future__ import annotations

import time

import torch

from flexlab.models.attention import attend, attention_bias
from flexlab.models.family import ModelFamily, Part, part_weights
from flexlab.models.generation import (
    GenerationResult,
    Sampler,
    SamplingConfig,
    StopCriteria,
    generation_metrics,
    left_pad,
    positions_from_mask,
)


class ReferenceRunner:
    """All weights materialised on ``device`` in ``dtype``; ``generate`` and ``score`` on top."""

    def __init__(self, family: ModelFamily, config, weights, device: torch.device, dtype: torch.dtype) -> None:
        self.family, self.config, self.device, self.dtype = family, config, device, dtype
        specs = family.weight_specs(config)

        def load(part: Part, layer: int | None = None) -> dict[str, torch.Tensor]:
            return {s.short: weights.get(s.name, dtype, device) for s in part_weights(specs, part, layer)}

        self.embed_w, self.head_w = load("embed"), load("head")
        table = family.token_table
        if table in self.head_w:  # tied: share one tensor, not two copies
            self.head_w[table] = self.embed_w[table]
        self.layers = [(load("attention", i), load("mlp", i)) for i in range(config.num_layers)]

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        cache: list | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` of ``tokens`` ``[b, s]`` placed at cache slots ``start..start+s``.

        ``valid`` is ``[b, start + s]``: which cache slots hold real tokens. With ``cache``
        (a list of ``(k, v)`` per layer, each ``[b, heads, capacity, d]``) the new keys and values
        are written into it and attention reads slots ``0..start+s``. ``last_only``: the head runs
        on the last position alone (``[b, 1, vocab]``), as generation needs and the engine does;
        a prompt's other positions would cost a matmul over the vocabulary each.
        """
        f, cfg = self.family, self.config
        s = tokens.shape[1]
        positions = positions_from_mask(valid)[:, start : start + s]
        by_key = f.position_bias
        per_head = None if by_key is None else (lambda positions: by_key(cfg, positions))
        bias = attention_bias(valid, s, cfg.sliding_window, per_head)
        h = f.embed(self.embed_w, cfg, tokens, positions)
        for i, (attn_w, mlp_w) in enumerate(self.layers):
            q, k, v = f.attention_qkv(attn_w, cfg, h, positions, valid.shape[1])
            if cache is not None:
                k_cache, v_cache = cache[i]
                k_cache[:, :, start : start + s] = k
                v_cache[:, :, start : start + s] = v
                k, v = k_cache[:, :, : start + s], v_cache[:, :, : start + s]
            h = f.attention_out(attn_w, cfg, h, attend(q, k, v, bias))
            h = f.mlp(mlp_w, cfg, h)
        return f.head(self.head_w, cfg, h[:, -1:] if last_only else h)

    def new_cache(self, batch: int, capacity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.config.num_kv_heads, capacity, self.config.head_dim)
        return [
            (
                torch.empty(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.config.num_layers)
        ]

    @torch.inference_mode()
    def generate(
        self, ids: list[list[int]], max_new_tokens: int, sampling: SamplingConfig, stop: StopCriteria
    ) -> GenerationResult:
        """Generate for already-encoded prompts ``ids`` (see ``Model.generate`` for the user API)."""
        tokens, valid = left_pad(ids, self.config.padding_id, self.device)
        batch, prompt_len = tokens.shape
        cache = self.new_cache(batch, prompt_len + max_new_tokens)
        sampler = Sampler(sampling, self.device)
        generated: list[list[int]] = [[] for _ in ids]

        t0 = time.perf_counter()
        logits = self.forward(tokens, valid, cache, last_only=True)[:, -1]
        next_tok = sampler(logits)
        _sync(self.device)
        t1 = time.perf_counter()
        step = 0
        while True:
            for i, t in enumerate(next_tok.tolist()):
                if not stop.finished[i]:
                    generated[i].append(t)
            step += 1
            if all(stop.update(generated)) or step == max_new_tokens:
                break
            valid = torch.cat([valid, torch.ones((batch, 1), dtype=torch.bool, device=self.device)], dim=1)
            logits = self.forward(next_tok[:, None], valid, cache, start=prompt_len + step - 1, last_only=True)[:, -1]
            next_tok = sampler(logits)
        _sync(self.device)
        t2 = time.perf_counter()

        metrics = generation_metrics(sum(map(len, generated)), t1 - t0, t2 - t1)
        return GenerationResult(token_ids=generated, texts=stop.texts(generated), metrics=metrics)

    @torch.inference_mode()
    def score(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, float32 log-probabilities of tokens ``1..n-1`` given their prefix."""
        # each sequence's last token is only predicted, never fed (it may be one past the positions)
        tokens, valid = left_pad([seq[:-1] for seq in ids], self.config.padding_id, self.device)
        logprobs = torch.log_softmax(self.forward(tokens, valid).float(), dim=-1)
        out = []
        for row, seq in enumerate(ids):
            lp = logprobs[row, tokens.shape[1] - (len(seq) - 1) :]  # predictions for tokens 1..n-1
            target = torch.tensor(seq[1:], device=lp.device)[:, None]
            out.append(lp.gather(-1, target).squeeze(-1).cpu())
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
