"""Model configurations as data: one frozen dataclass and a table of presets.

The sizes here (bytes of KV cache and activations per token) are what the placement code and
the cost model reason with; weight sizes come from the family's weight specs, the same ones the
loader and the engine use, through :func:`flexlab.models.registry.weight_bytes`.

Example:
    >>> from flexlab.models.config import get_preset
    >>> cfg = get_preset("opt-1.3b")
    >>> cfg.num_layers, cfg.hidden_size
    (24, 2048)
    >>> cfg.kv_cache_bytes_per_token(2) / 2**10  # KiB per token in float16
    192.0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flexlab.errors import ConfigError

# The MLP activations the families use, and who uses them.
ACTIVATIONS = {"relu": "OPT", "silu": "the LLaMA family", "gelu_tanh": "BLOOM, CodeGen"}


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
    # Grouped-query attention: key/value heads (None: num_heads); the KV cache stores these.
    # Both are ints after __post_init__ fills them in, which is what the type says.
    num_kv_heads: int = None  # type: ignore[assignment]
    head_dim: int = None  # type: ignore[assignment]  # None: hidden_size // num_heads (Qwen3 sets its own)
    max_positions: int = 2048
    # opt-350m embeds words in 512 dims and projects in/out of the 1024-dim residual stream.
    word_embed_proj_dim: int = None  # type: ignore[assignment]  # None: hidden_size
    # True: pre-LayerNorm (all OPT sizes but 350m). False: post-LayerNorm (opt-350m).
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation: str = "relu"  # one of ACTIVATIONS
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] | None = None  # config.json's dict, as sorted items
    tie_word_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2: biases on q/k/v only
    qk_norm: bool = False  # Qwen3: RMSNorm of each head's q and k
    sliding_window: int | None = None  # Mistral v0.1: each token attends to the last N tokens only
    rotary_dim: int | None = None  # CodeGen, GLM: only the first N dimensions of each head rotate (None: all)
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    # More ids that end a sequence (Llama 3 lists three: end of text, of turn, of message).
    extra_eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_dim", "max_positions"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads and self.head_dim is None:
            raise ConfigError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; choose a head count that divides it"
            )
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads!r} must divide num_heads={self.num_heads} "
                "(each key/value head serves a group of query heads)"
            )
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"ModelConfig.sliding_window={self.sliding_window!r} must be a positive int or None")
        if self.rotary_dim is not None and (
            not isinstance(self.rotary_dim, int)
            or self.rotary_dim < 2
            or self.rotary_dim % 2
            or self.rotary_dim > self.head_dim
        ):
            raise ConfigError(
                f"ModelConfig.rotary_dim={self.rotary_dim!r} must be an even int in [2, "
                f"head_dim={self.head_dim}] or None"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"ModelConfig.activation={self.activation!r} is not supported; use one of "
                + ", ".join(f"{a!r} ({who})" for a, who in ACTIVATIONS.items())
            )

    @property
    def padding_id(self) -> int:
        """The id padding slots are filled with: ``pad_token_id`` where the vocabulary has it,
        else 0 (padding is masked, so any id in the table does; some configs name one outside)."""
        return self.pad_token_id if 0 <= self.pad_token_id < self.vocab_size else 0

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence, the canonical ``eos_token_id`` first."""
        return tuple(dict.fromkeys((self.eos_token_id, *self.extra_eos_token_ids)))

    @property
    def kv_dim(self) -> int:
        """Elements of one token's keys (or values) in one layer: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (the dataclass is frozen). Derived defaults follow
        what they derive from: a new ``hidden_size`` or ``num_heads`` gives a new ``head_dim``,
        a new ``num_heads`` a new ``num_kv_heads``, unless those are changed too."""
        if {"hidden_size", "num_heads"} & set(changes):
            changes.setdefault("head_dim", None)
        if "num_heads" in changes:
            changes.setdefault("num_kv_heads", None)
        return dataclasses.replace(self, **changes)

    # ---- analytic sizes (weights need the family: flexlab.models.registry.weight_bytes) ----
    def kv_cache_bytes_per_token(self, bytes_per_elem: float = 2) -> float:
        """KV-cache bytes one token of one sequence occupies, summed over all layers."""
        return 2 * self.num_layers * self.kv_dim * bytes_per_elem

    def activation_bytes_per_token(self, bytes_per_elem: float = 2) -> float:
        """Bytes of the hidden state one token carries between layers."""
        return self.hidden_size * bytes_per_elem


def _opt(name: str, hidden: int, layers: int, heads: int, **kw) -> ModelConfig:
    return ModelConfig(name=name, hidden_size=hidden, num_layers=layers, num_heads=heads, ffn_dim=4 * hidden, **kw)


def _llama(
    name: str,
    family: str,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    max_positions: int,
    theta: float,
    *,
    tied: bool = False,
    eps: float = 1e-5,
    llama3: float | None = None,
    **kw,
) -> ModelConfig:
    scaling = (
        None
        if llama3 is None
        else (
            ("rope_type", "llama3"),
            ("factor", llama3),
            ("high_freq_factor", 4.0),
            ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192),
        )
    )
    ids = {"qwen2": (151643, 151643, 151643)}.get(family, (0, 1, 2))
    return ModelConfig(
        name=name,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        ffn_dim=ffn,
        max_positions=max_positions,
        enable_bias=False,
        activation="silu",
        norm_eps=eps,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=tied,
        qkv_bias=family == "qwen2",
        pad_token_id=ids[0],
        bos_token_id=ids[1],
        eos_token_id=ids[2],
        **kw,
    )


def _bloom(name: str, hidden: int, layers: int, heads: int, vocab: int = 250880) -> ModelConfig:
    return ModelConfig(
        name=name,
        family="bloom",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        ffn_dim=4 * hidden,
        activation="gelu_tanh",
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )


def _codegen(name: str, hidden: int, layers: int, heads: int, rotary: int, vocab: int = 51200) -> ModelConfig:
    return ModelConfig(
        name=name,
        family="codegen",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        ffn_dim=4 * hidden,
        activation="gelu_tanh",
        rotary_dim=rotary,
        tie_word_embeddings=False,
        pad_token_id=50256,
        bos_token_id=50256,
        eos_token_id=50256,
    )


def _glm(
    name: str,
    family: str,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    max_positions: int,
    ids: tuple[int, ...] = (151329, 151329, 151329, 151336, 151338),  # pad, bos, eos, more eos
) -> ModelConfig:
    head_dim = hidden // heads
    return ModelConfig(
        name=name,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_dim=ffn,
        max_positions=max_positions,
        enable_bias=False,
        activation="silu",
        norm_eps=1.5625e-7,
        rotary_dim=head_dim // 2,
        tie_word_embeddings=False,
        qkv_bias=True,
        pad_token_id=ids[0],
        bos_token_id=ids[1],
        eos_token_id=ids[2],
        extra_eos_token_ids=ids[3:],
    )


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
        # The LLaMA family, shapes as in the published config.json files (transcribed by hand).
        _llama("llama-2-7b", "llama", 32000, 4096, 32, 32, 32, 11008, 4096, 1e4),
        _llama("llama-2-13b", "llama", 32000, 5120, 40, 40, 40, 13824, 4096, 1e4),
        _llama("llama-2-70b", "llama", 32000, 8192, 80, 64, 8, 28672, 4096, 1e4),
        _llama("llama-3.2-1b", "llama", 128256, 2048, 16, 32, 8, 8192, 131072, 5e5, tied=True, llama3=32.0),
        _llama("llama-3.2-3b", "llama", 128256, 3072, 28, 24, 8, 8192, 131072, 5e5, tied=True, llama3=32.0),
        _llama("llama-3.1-8b", "llama", 128256, 4096, 32, 32, 8, 14336, 131072, 5e5, llama3=8.0),
        _llama("llama-3.1-70b", "llama", 128256, 8192, 80, 64, 8, 28672, 131072, 5e5, llama3=8.0),
        _llama("llama-3.1-405b", "llama", 128256, 16384, 126, 128, 8, 53248, 131072, 5e5, llama3=8.0),
        _llama("mistral-7b", "mistral", 32768, 4096, 32, 32, 8, 14336, 32768, 1e6),  # v0.3: no sliding window
        _llama("qwen2.5-0.5b", "qwen2", 151936, 896, 24, 14, 2, 4864, 32768, 1e6, tied=True, eps=1e-6),
        _llama("qwen2.5-1.5b", "qwen2", 151936, 1536, 28, 12, 2, 8960, 32768, 1e6, tied=True, eps=1e-6),
        _llama("qwen2.5-7b", "qwen2", 152064, 3584, 28, 28, 4, 18944, 32768, 1e6, eps=1e-6),
        _llama("qwen2.5-14b", "qwen2", 152064, 5120, 48, 40, 8, 13824, 32768, 1e6, eps=1e-6),
        _llama("qwen2.5-32b", "qwen2", 152064, 5120, 64, 40, 8, 27648, 32768, 1e6, eps=1e-6),
        _llama("qwen2.5-72b", "qwen2", 152064, 8192, 80, 64, 8, 29568, 32768, 1e6, eps=1e-6),
        # BLOOM (bigscience/bloom-* config.json): ALiBi, so no position table; trained on 2048 tokens.
        _bloom("bloom-560m", 1024, 24, 16),
        _bloom("bloom-1b1", 1536, 24, 16),
        _bloom("bloom-1b7", 2048, 24, 16),
        _bloom("bloom-3b", 2560, 30, 32),
        _bloom("bloom-7b1", 4096, 30, 32),
        _bloom("bloom-176b", 14336, 70, 112),
        # CodeGen (Salesforce/codegen-*-{mono,multi,nl} config.json; the three share shapes).
        _codegen("codegen-350m", 1024, 20, 16, 32),
        _codegen("codegen-2b", 2560, 32, 32, 64),
        _codegen("codegen-6b", 4096, 33, 16, 64),
        _codegen("codegen-16b", 6144, 34, 24, 64),
        # GLM (THUDM/glm-4-9b-hf config.json): half of each head rotates.
        _glm("glm-4-9b", "glm", 151552, 4096, 40, 32, 2, 13696, 131072),
        # Tiny shapes for tests and demos: seconds on a CPU.
        _llama("llama-tiny", "llama", 512, 64, 2, 4, 2, 128, 256, 1e4),
        _bloom("bloom-tiny", 48, 2, 6, vocab=512),  # 6 heads: ALiBi's slopes for a count not a power of two
        _codegen("codegen-tiny", 64, 2, 8, 4, vocab=512),
        _glm("glm-tiny", "glm4", 512, 64, 2, 4, 2, 128, 256, ids=(0, 1, 2)),  # glm4: the extra post-norms too
        ModelConfig(
            name="opt-tiny", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256, max_positions=256
        ),
        ModelConfig(
            name="opt-tiny-postln",
            vocab_size=512,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            ffn_dim=256,
            max_positions=256,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
        ),
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
