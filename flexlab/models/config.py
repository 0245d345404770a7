"""Model configurations as data: one frozen dataclass and a table of presets.

The analytic sizes here (bytes of weights per layer, of KV cache and activations per token) are
what the placement code and the cost model reason with, so they are computed from the same
weight specs the loader and the engine use — one source of truth for shapes.

Example:
    >>> from flexlab.models.config import get_preset
    >>> cfg = get_preset("opt-1.3b")
    >>> cfg.num_layers, cfg.hidden_size
    (24, 2048)
    >>> round(cfg.total_weight_bytes(2) / 2**30, 2)  # GiB in float16
    2.45
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


from flexlab.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and architecture of a decoder-only model.

    Field names follow the paper/flexlab vocabulary; ``to_hf_dict``/``family.config_from_hf``
    translate to and from a Hugging Face ``config.json``.
    """

    name: str
    family: str = "opt"
    vocab_size: int = 50272
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_positions: int = 2048
    # opt-350m embeds words in 512 dims and projects in/out of the 1024-dim residual stream.
    word_embed_proj_dim: int | None = None
    # True: pre-LayerNorm (all OPT sizes but 350m). False: post-LayerNorm (opt-350m).
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation: str = "relu"
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_dim", "max_positions"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; choose a head count that divides it"
            )
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.activation != "relu":
            raise ConfigError(f"ModelConfig.activation={self.activation!r} is not supported; OPT uses 'relu'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (the dataclass is frozen)."""
        return dataclasses.replace(self, **changes)

    # ---- analytic sizes ------------------------------------------------------------------
    def layer_weight_bytes(self, layer: int, bytes_per_elem: float = 2) -> float:
        """Bytes of the weights that belong to transformer layer ``layer`` (0-based)."""
        from flexlab.models.family import get_family

        specs = get_family(self.family).weight_specs(self)
        return sum(s.numel for s in specs if s.layer == layer) * bytes_per_elem

    def embedding_weight_bytes(self, bytes_per_elem: float = 2) -> float:
        """Bytes of the weights outside the transformer layers (embeddings, final norm, projections)."""
        from flexlab.models.family import get_family

        specs = get_family(self.family).weight_specs(self)
        return sum(s.numel for s in specs if s.layer is None) * bytes_per_elem

    def total_weight_bytes(self, bytes_per_elem: float = 2) -> float:
        """Bytes of all weights (the output projection is tied to the token embedding)."""
        from flexlab.models.family import get_family

        return sum(s.numel for s in get_family(self.family).weight_specs(self)) * bytes_per_elem

    def num_parameters(self) -> int:
        return int(self.total_weight_bytes(1))

    def kv_cache_bytes_per_token(self, bytes_per_elem: float = 2) -> float:
        """KV-cache bytes one token of one sequence occupies, summed over all layers."""
        return 2 * self.num_layers * self.hidden_size * bytes_per_elem

    def activation_bytes_per_token(self, bytes_per_elem: float = 2) -> float:
        """Bytes of the hidden state one token carries between layers."""
        return self.hidden_size * bytes_per_elem


def _opt(name: str, hidden: int, layers: int, heads: int, **kw) -> ModelConfig:
    return ModelConfig(name=name, hidden_size=hidden, num_layers=layers, num_heads=heads, ffn_dim=4 * hidden, **kw)


# Official OPT dimensions (Zhang et al. 2022, Table 1; the facebook/opt-* config.json files).
_PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _opt("opt-125m", 768, 12, 12),
        _opt("opt-350m", 1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
        _opt("opt-1.3b", 2048, 24, 32),
        _opt("opt-2.7b", 2560, 32, 32),
        _opt("opt-6.7b", 4096, 32, 32),
        _opt("opt-13b", 5120, 40, 40),
        _opt("opt-30b", 7168, 48, 56),
        _opt("opt-66b", 9216, 64, 72),
        _opt("opt-175b", 12288, 96, 96),
        # Tiny shapes for tests and demos: seconds on a CPU.
        ModelConfig(name="opt-tiny", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256,
                    max_positions=256),
        ModelConfig(name="opt-tiny-postln", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                    ffn_dim=256, max_positions=256, word_embed_proj_dim=32, do_layer_norm_before=False),
    )
}


def preset_names() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return list(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The preset called exactly ``name`` (a ``facebook/`` prefix is accepted)."""
    key = name.removeprefix("facebook/")
    if key not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(_PRESETS)}")
    return _PRESETS[key]
