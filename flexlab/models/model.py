"""``flexlab.Model``: a config, a lazy weight source and (when there is one) a tokenizer.

Example (the random-weights path needs no files):
    >>> import flexlab, torch
    >>> model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    >>> result = model.generate([[2, 10, 20]], max_new_tokens=4)
    >>> len(result.token_ids[0])
    4
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flexlab.devices import device_and_dtype
from flexlab.errors import CheckpointError, ConfigError
from flexlab.models.config import ModelConfig, get_preset
from flexlab.models.family import ModelFamily
from flexlab.models.generation import GenerationResult, encode_for_scoring, prepare_generation
from flexlab.models.loading import (
    CheckpointWeights,
    RandomWeights,
    WeightSource,
    generation_eos_ids,
    read_hf_config,
    resolve_checkpoint,
)
from flexlab.models.reference import ReferenceRunner
from flexlab.models.registry import get_family, num_parameters

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class Model:
    """A model ready to generate with, on the reference path or through an offloading engine.

    Create it with :meth:`from_pretrained` or :meth:`from_config`. Weights stay in their source
    (checkpoint files, or a seeded generator) until something needs them.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: WeightSource,
        *,
        tokenizer=None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        source: str = "",
    ) -> None:
        self.config = config
        self.family: ModelFamily = get_family(config.family)
        self.weights = weights
        self.tokenizer = tokenizer
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.source = source
        self._reference: ReferenceRunner | None = None

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> Model:
        """Load a Hugging Face checkpoint: a local directory, or a hub id (downloaded when online).

        Tensors are read lazily from memory-mapped files; nothing is loaded until used.
        """
        directory = resolve_checkpoint(name_or_path)
        hf = read_hf_config(directory)
        model_type = hf.get("model_type")
        if not isinstance(model_type, str):
            raise ConfigError(f"{directory}/config.json has no model_type string; is it a transformers checkpoint?")
        family = get_family(model_type)
        try:
            config = family.config_from_hf(hf, Path(str(name_or_path)).name)
        except KeyError as e:
            raise CheckpointError(
                f"{directory}/config.json lacks {e.args[0]!r}, which a {model_type} config needs; is it complete?"
            ) from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise CheckpointError(
                f"{directory}/config.json has a field of the wrong type ({e}); is it a "
                f"{model_type} config written by transformers?"
            ) from None
        more_eos = [i for i in generation_eos_ids(directory) if i not in config.eos_token_ids]
        if more_eos:
            config = config.replace(extra_eos_token_ids=(*config.extra_eos_token_ids, *more_eos))
        weights = CheckpointWeights(
            directory, family.weight_specs(config), lambda stored: family.canonical_name(stored, config)
        )
        return cls(
            config, weights, tokenizer=_load_tokenizer(directory), dtype=dtype, device=device, source=str(directory)
        )

    @classmethod
    def from_config(
        cls,
        preset_or_config: str | ModelConfig,
        *,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> Model:
        """Random weights of any size (FlexGen's dummy weights), generated tensor by tensor."""
        config = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
        family = get_family(config.family)
        weights = RandomWeights(family.weight_specs(config), seed=seed)
        return cls(config, weights, dtype=dtype, device=device, source=f"random(seed={seed})")

    # ---- the reference path ------------------------------------------------------------
    @property
    def reference(self) -> ReferenceRunner:
        """The runner with every weight on the compute device (built on first use)."""
        if self._reference is None:
            self._reference = ReferenceRunner(self.family, self.config, self.weights, self.device, self.dtype)
        return self._reference

    def generate(
        self,
        prompts,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids=(),
        stop_strings=None,
    ) -> GenerationResult:
        """Generate on the reference path (no offloading).

        ``prompts``: strings or token-id lists. Greedy unless ``do_sample``. ``stop_token_ids``
        and ``stop_strings`` are a flat list for all prompts or one list per prompt; by default
        generation stops at the model's end-of-sequence token (pass ``None`` to never stop early).
        """
        ids, sampling, stop = prepare_generation(
            prompts,
            self.tokenizer,
            self.config,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            stop_strings=stop_strings,
        )
        return self.reference.generate(ids, max_new_tokens, sampling, stop)

    def score(self, sequences) -> list[torch.Tensor]:
        """For each sequence (string or token ids, at least 2 tokens), the log-probabilities of
        tokens ``1..n-1`` given their prefix, as float32 1-D tensors."""
        return self.reference.score(encode_for_scoring(sequences, self.tokenizer, self.config))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({c.name!r}, {num_parameters(c) / 1e6:.1f}M parameters, {c.num_layers} layers, "
            f"dtype={self.dtype}, device={self.device}, source={self.source!r})"
        )


def _load_tokenizer(directory: Path):
    if not any((directory / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
