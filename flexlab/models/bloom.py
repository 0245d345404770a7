"""BLOOM (``BloomForCausalLM``, ``model_type`` bloom) as plain functions behind the family interface.

What sets it apart from OPT and the LLaMA family:

* No position embeddings and no rotation: ALiBi. Each head adds ``slope × position`` of the key
  to its attention scores (the query's own position would shift a whole row by a constant,
  which softmax ignores). Slopes are a geometric sequence per head; for a head count that is not
  a power of two, the heads beyond the largest power take every other slope of the next power.
  Positions count real tokens only, as everywhere in flexlab, so left padding is invisible.
* A LayerNorm right after the word embedding (``word_embeddings_layernorm``).
* One fused ``query_key_value`` projection whose output is laid out head by head: for each head
  its query, key and value (``[heads, 3, head_dim]``), not all queries then all keys.
* GELU (tanh approximation) in the MLP, biases everywhere, the head tied to the word embedding.

Checkpoints name their tensors with or without the ``transformer.`` prefix (the original
bigscience files have none); both load.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from flexlab.errors import ConfigError
from flexlab.models.config import ModelConfig
from flexlab.models.family import ModelFamily, Part, Weights, WeightSpec, token_ids_from_hf, token_ids_to_hf
from flexlab.models.layers import layer_norm, linear

PREFIX = "transformer."


# ---- config ----------------------------------------------------------------------------------
def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """A ModelConfig from a BLOOM ``config.json`` (old and new field names alike)."""
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ConfigError(
            f"{name}: apply_residual_connection_post_layernorm=True is not supported (no released "
            "BLOOM checkpoint sets it)"
        )
    hidden = hf.get("hidden_size", hf.get("n_embed"))
    heads = hf.get("n_head", hf.get("num_attention_heads"))
    if hidden is None or heads is None:
        raise KeyError("hidden_size" if hidden is None else "n_head")
    return ModelConfig(
        name=name,
        family="bloom",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf.get("n_layer") or hf.get("num_hidden_layers") or 0,
        num_heads=heads,
        ffn_dim=4 * hidden,
        # ALiBi has no position table; 2048 is the length BLOOM was trained on.
        max_positions=hf.get("seq_length", 2048),
        activation="gelu_tanh",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=True,
        **token_ids_from_hf(hf, pad=3, bos=1, eos=2),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The ``config.json`` dictionary of ``cfg`` (accepted by ``transformers.BloomConfig(**d)``)."""
    return dict(
        model_type="bloom",
        architectures=["BloomForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        seq_length=cfg.max_positions,
        layer_norm_epsilon=cfg.norm_eps,
        apply_residual_connection_post_layernorm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        **token_ids_to_hf(cfg),
    )


# ---- weights ---------------------------------------------------------------------------------
def _norm(name: str, size: int, layer: int | None, part: Part) -> list[WeightSpec]:
    return [
        WeightSpec(f"{name}.weight", (size,), layer, (part,), "ones"),
        WeightSpec(f"{name}.bias", (size,), layer, (part,), "zeros"),
    ]


def _linear(name: str, rows: int, cols: int, layer: int | None, part: Part) -> list[WeightSpec]:
    return [
        WeightSpec(f"{name}.weight", (rows, cols), layer, (part,)),
        WeightSpec(f"{name}.bias", (rows,), layer, (part,), "zeros"),
    ]


def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every weight under its checkpoint name (``transformer.`` prefixed)."""
    h, f = cfg.hidden_size, cfg.ffn_dim
    specs = [WeightSpec(PREFIX + "word_embeddings.weight", (cfg.vocab_size, h), None, ("embed", "head"))]
    specs += _norm(PREFIX + "word_embeddings_layernorm", h, None, "embed")
    for i in range(cfg.num_layers):
        pre = f"{PREFIX}h.{i}."
        specs += _norm(pre + "input_layernorm", h, i, "attention")
        specs += _linear(pre + "self_attention.query_key_value", 3 * h, h, i, "attention")
        specs += _linear(pre + "self_attention.dense", h, h, i, "attention")
        specs += _norm(pre + "post_attention_layernorm", h, i, "mlp")
        specs += _linear(pre + "mlp.dense_h_to_4h", f, h, i, "mlp")
        specs += _linear(pre + "mlp.dense_4h_to_h", h, f, i, "mlp")
    specs += _norm(PREFIX + "ln_f", h, None, "head")
    return specs


def canonical_name(checkpoint_name: str, cfg: ModelConfig) -> str | None:
    """Spec name for a checkpoint tensor name; None for the tied head's copy."""
    if checkpoint_name == "lm_head.weight":
        return None
    return checkpoint_name if checkpoint_name.startswith(PREFIX) else PREFIX + checkpoint_name


# ---- maths -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Each head's ALiBi slope (float32, on the CPU): ``2^(-8i/n)`` for ``n`` the largest power of
    two not above ``num_heads``; any further heads take the odd steps of the sequence for ``2n``."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    slopes += [2.0 ** (-8.0 * i / (2 * n)) for i in range(1, 2 * (num_heads - n), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def position_bias(cfg: ModelConfig, key_positions: torch.Tensor) -> torch.Tensor:
    """ALiBi: ``[b, heads, 1, kv]`` float32 added to every query's scores, from each key's
    position ``[b, kv]`` (padding, at -1, is masked anyway)."""
    slopes = alibi_slopes(cfg.num_heads).to(key_positions.device)
    return slopes[None, :, None, None] * key_positions.clamp(min=0)[:, None, None, :].float()


def embed(w: Weights, cfg: ModelConfig, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Word embedding and its LayerNorm (positions enter as ALiBi biases, not here)."""
    x = F.embedding(input_ids, w["word_embeddings.weight"])
    return layer_norm(w, "word_embeddings_layernorm", x, cfg.norm_eps)


def attention_qkv(
    w: Weights, cfg: ModelConfig, h: torch.Tensor, positions: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (pre-scaled), k, v as ``[b, heads, s, d]`` from the fused, head-interleaved projection."""
    x = layer_norm(w, "input_layernorm", h, cfg.norm_eps)
    b, s, _ = x.shape
    fused = linear(w, "self_attention.query_key_value", x).view(b, s, cfg.num_heads, 3, cfg.head_dim)
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
    return q * cfg.head_dim**-0.5, k, v


def attention_out(w: Weights, cfg: ModelConfig, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Output projection and residual: ``attn`` ``[b, heads, s, d]``."""
    b, _, s, _ = attn.shape
    return h + linear(w, "self_attention.dense", attn.transpose(1, 2).reshape(b, s, cfg.hidden_size))


def mlp(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """LayerNorm, GELU (tanh) MLP and residual."""
    x = layer_norm(w, "post_attention_layernorm", h, cfg.norm_eps)
    return h + linear(w, "mlp.dense_4h_to_h", F.gelu(linear(w, "mlp.dense_h_to_4h", x), approximate="tanh"))


def head(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Final LayerNorm and the tied output projection → logits."""
    return F.linear(layer_norm(w, "ln_f", h, cfg.norm_eps), w["word_embeddings.weight"])


def elementwise(cfg: ModelConfig, part: str) -> float:
    """Hidden-sized vectors per token moved by a part's elementwise ops (see ``ModelFamily``).
    Embed: the lookup's row and its LayerNorm (2). Attention: LayerNorm 2, fused qkv written 3
    and read 3, output 1, bias adds 4, residual 3. MLP: LayerNorm 2, GELU over 4× hidden read
    and written 8, biases 5, residual 3. Head: LayerNorm 2."""
    return {"embed": 3.0, "attention": 16.0, "mlp": 18.0, "head": 2.0}[part]


FAMILY = ModelFamily(
    name="bloom",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    weight_specs=weight_specs,
    canonical_name=canonical_name,
    embed=embed,
    attention_qkv=attention_qkv,
    attention_out=attention_out,
    mlp=mlp,
    head=head,
    elementwise=elementwise,
    token_table="word_embeddings.weight",
    position_bias=position_bias,
)
