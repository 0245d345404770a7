"""What a model family supplies, so that nothing outside ``flexlab.models`` knows it is OPT.

A family is data plus plain functions:

* ``config_from_hf`` / ``config_to_hf``: translate a Hugging Face ``config.json``.
* ``weight_specs``: every weight's checkpoint name, shape, owning layer and initialisation.
* ``canonical_name``: maps a name found in a checkpoint to a spec name (or None to ignore it),
  given the model's config (a tied head's copy in the checkpoint is ignored, for instance).
* the maths, on tensors already on the compute device, split where the engine needs seams:
  ``embed`` → per layer ``attention_qkv`` → :func:`flexlab.models.attention.attend` →
  ``attention_out`` → ``mlp`` → ``head``. ``embed`` and ``attention_qkv`` receive each token's
  position (``[b, s]``, counting real tokens only, so left padding is invisible): learned
  position embeddings read them once, rotary embeddings in every layer. ``attention_qkv`` also
  receives ``length``, the cache slots every sequence of the call spans once its tokens are in
  (the longest sequence's positions so far + 1: the same for every GPU batch of a block), which
  a rotation whose frequencies grow with the length (dynamic NTK) needs. Splitting attention at
  the cache lets the engine put the KV cache anywhere, and run ``attend`` on the CPU next to a
  host-resident cache.

Weights reach these functions as a ``Mapping[str, Tensor]`` keyed by the *short* names of
:attr:`WeightSpec.short` (``"q_proj.weight"``), so one function serves every layer. A layer's
matrices and a head's own (all but the token table) are applied only through
:func:`flexlab.models.layers.project`: the engine may hold them in a layout only it reads
(:func:`~flexlab.models.layers.packed`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from flexlab.models.config import ModelConfig

Weights = Mapping[str, torch.Tensor]
Part = Literal["embed", "attention", "mlp", "head"]


@dataclass(frozen=True)
class WeightSpec:
    """One weight tensor as a family describes it.

    ``layer`` is the transformer layer index, or None for weights outside the layers
    (embeddings, final norm, projections). ``parts`` says which sub-layers read it, which is how
    the engine splits a layer into attention and MLP (FlexGen's ``sep_layer``); a tied weight
    lists every part that reads it (OPT's token embedding is also its output projection).
    """

    name: str
    shape: tuple[int, ...]
    layer: int | None
    parts: tuple[Part, ...]
    init: Literal["normal", "zeros", "ones"] = "normal"
    local: str | None = None  # the short name, where the rule below does not give a clear one

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def short(self) -> str:
        """The name the layer functions use: the part after ``layers.N.`` (or after the prefix)."""
        if self.local is not None:
            return self.local
        return self.name.split(".", 3)[-1] if self.layer is not None else self.name.split(".", 1)[-1]


@dataclass(frozen=True)
class ModelFamily:
    """The interface a family implements; see the module docstring."""

    name: str
    config_from_hf: Callable[[dict, str], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    weight_specs: Callable[[ModelConfig], list[WeightSpec]]
    canonical_name: Callable[[str, ModelConfig], str | None]
    embed: Callable[[Weights, ModelConfig, torch.Tensor, torch.Tensor], torch.Tensor]
    attention_qkv: Callable[
        [Weights, ModelConfig, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ]
    attention_out: Callable[[Weights, ModelConfig, torch.Tensor, torch.Tensor], torch.Tensor]
    mlp: Callable[[Weights, ModelConfig, torch.Tensor], torch.Tensor]
    head: Callable[[Weights, ModelConfig, torch.Tensor], torch.Tensor]
    # For the cost model: hidden-sized vectors read or written per token by a part's elementwise
    # ops (norms, biases, activations, rotations, residuals), around its matmuls.
    elementwise: Callable[[ModelConfig, Part], float]
    token_table: str = "embed_tokens.weight"  # the short name of the token embedding
    # Per-head biases on the attention scores from each key's position (BLOOM's ALiBi):
    # ``(cfg, key_positions [b, kv]) -> [b, heads, 1, kv]`` float32, or None for none.
    position_bias: Callable[[ModelConfig, torch.Tensor], torch.Tensor] | None = None


def table_parts(cfg: ModelConfig) -> tuple[Part, ...]:
    """The parts the token table serves: the embedding, and the head too when it is tied."""
    return ("embed", "head") if cfg.tie_word_embeddings else ("embed",)


def part_weights(specs: list[WeightSpec], part: Part, layer: int | None = None) -> list[WeightSpec]:
    """The specs one part reads: ``part_weights(specs, "mlp", 3)``, ``part_weights(specs, "head")``."""
    return [s for s in specs if s.layer == layer and part in s.parts]


def specs_by_part(specs: list[WeightSpec]) -> dict[tuple[Part, int | None], list[WeightSpec]]:
    """``part_weights`` for every ``(part, layer)`` at once, in one pass (a model has thousands of
    specs and hundreds of stages: asking per stage would be quadratic)."""
    out: dict[tuple[Part, int | None], list[WeightSpec]] = {}
    for s in specs:
        for part in s.parts:
            out.setdefault((part, s.layer), []).append(s)
    return out


# ---- helpers for config_from_hf / config_to_hf ------------------------------------------------
def token_ids_from_hf(hf: dict, pad: int, bos: int, eos: int) -> dict:
    """The special-token fields of a ModelConfig from ``config.json`` (defaults where absent).
    An id may be a list (Llama 3: ``eos_token_id: [128001, 128008, 128009]``): its first entry
    is the canonical id, every entry of an eos list ends a sequence."""

    def first(key: str, default: int) -> int:
        value = hf.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        return default if value is None else int(value)

    eos_list = hf.get("eos_token_id")
    extra = tuple(int(v) for v in eos_list[1:]) if isinstance(eos_list, list) else ()
    return dict(
        pad_token_id=first("pad_token_id", pad),
        bos_token_id=first("bos_token_id", bos),
        eos_token_id=first("eos_token_id", eos),
        extra_eos_token_ids=extra,
    )


def token_ids_to_hf(cfg: ModelConfig) -> dict:
    """The special-token fields of ``config.json`` (an eos list where there are several)."""
    eos = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_id
    return dict(pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=eos)
