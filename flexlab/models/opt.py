"""OPT (Zhang et al. 2022): config translation, weight specs and the maths as plain functions.

Every function takes tensors already on the compute device and in the compute dtype; where they
live the rest of the time is the engine's business. OPT's quirks, handled where they bite:

* learned positions are offset by 2 (a fairseq leftover): position ``p`` reads row ``p + 2``;
* positions count only real tokens, so a left-padded prompt starts at position 0;
* the output projection is the token embedding (tied); checkpoints' ``lm_head.weight`` is ignored;
* opt-350m is post-LayerNorm, embeds words in 512 dims and projects them in/out of the
  1024-dim residual stream (``project_in``/``project_out``), and has no final LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexlab.errors import ConfigError
from flexlab.models.config import ModelConfig
from flexlab.models.family import ModelFamily, Weights, WeightSpec, token_ids_from_hf, token_ids_to_hf
from flexlab.models.layers import layer_norm, linear, project

POSITION_OFFSET = 2
LN_EPS = 1e-5  # every OPT LayerNorm


# ---- config ----------------------------------------------------------------------------------
def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """A :class:`ModelConfig` from an OPT ``config.json`` dictionary."""
    if hf.get("_remove_final_layer_norm", False):
        raise ConfigError(
            f"{name}: checkpoints with _remove_final_layer_norm=True (pre-v4.20 fine-tunes) "
            "are not supported; re-save the model with a current transformers"
        )
    if hf.get("activation_function", "relu") != "relu":  # every released OPT; the maths below is ReLU
        raise ConfigError(
            f"{name}: activation_function={hf['activation_function']!r} is not supported; OPT uses 'relu'"
        )
    return ModelConfig(
        name=name,
        family="opt",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        ffn_dim=hf["ffn_dim"],
        max_positions=hf.get("max_position_embeddings", 2048),
        word_embed_proj_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
        do_layer_norm_before=hf.get("do_layer_norm_before", True),
        enable_bias=hf.get("enable_bias", True),
        layer_norm_elementwise_affine=hf.get("layer_norm_elementwise_affine", True),
        activation=hf.get("activation_function", "relu"),
        **token_ids_from_hf(hf, pad=1, bos=2, eos=2),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The ``config.json`` dictionary of ``cfg`` (accepted by ``transformers.OPTConfig(**d)``)."""
    return dict(
        model_type="opt",
        architectures=["OPTForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        ffn_dim=cfg.ffn_dim,
        max_position_embeddings=cfg.max_positions,
        word_embed_proj_dim=cfg.word_embed_proj_dim,
        do_layer_norm_before=cfg.do_layer_norm_before,
        enable_bias=cfg.enable_bias,
        layer_norm_elementwise_affine=cfg.layer_norm_elementwise_affine,
        activation_function=cfg.activation,
        **token_ids_to_hf(cfg),
        dropout=0.0,
        attention_dropout=0.0,
    )


# ---- weights ---------------------------------------------------------------------------------
def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every OPT weight, in checkpoint order, under its checkpoint name (``model.`` prefix dropped)."""
    h, p, f = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.ffn_dim
    specs = [
        WeightSpec("decoder.embed_tokens.weight", (cfg.vocab_size, p), None, ("embed", "head")),
        WeightSpec("decoder.embed_positions.weight", (cfg.max_positions + POSITION_OFFSET, h), None, ("embed",)),
    ]
    if p != h:
        specs.append(WeightSpec("decoder.project_in.weight", (h, p), None, ("embed",)))
        specs.append(WeightSpec("decoder.project_out.weight", (p, h), None, ("head",)))
    if cfg.do_layer_norm_before:
        specs += _norm("decoder.final_layer_norm", h, None, "head", cfg)

    for i in range(cfg.num_layers):
        pre = f"decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += _linear(pre + "self_attn." + proj, h, h, i, "attention", cfg)
        specs += _norm(pre + "self_attn_layer_norm", h, i, "attention", cfg)
        specs += _linear(pre + "fc1", f, h, i, "mlp", cfg)
        specs += _linear(pre + "fc2", h, f, i, "mlp", cfg)
        specs += _norm(pre + "final_layer_norm", h, i, "mlp", cfg)
    return specs


def _linear(name: str, out_dim: int, in_dim: int, layer: int, part, cfg: ModelConfig) -> list[WeightSpec]:
    specs = [WeightSpec(name + ".weight", (out_dim, in_dim), layer, (part,))]
    if cfg.enable_bias:
        specs.append(WeightSpec(name + ".bias", (out_dim,), layer, (part,), "zeros"))
    return specs


def _norm(name: str, dim: int, layer: int | None, part, cfg: ModelConfig) -> list[WeightSpec]:
    if not cfg.layer_norm_elementwise_affine:
        return []
    return [
        WeightSpec(name + ".weight", (dim,), layer, (part,), "ones"),
        WeightSpec(name + ".bias", (dim,), layer, (part,), "zeros"),
    ]


def canonical_name(checkpoint_name: str, cfg: ModelConfig) -> str | None:
    """Spec name for a checkpoint tensor name; None for tensors flexlab does not read."""
    name = checkpoint_name.removeprefix("model.")
    if name == "lm_head.weight":  # tied to decoder.embed_tokens.weight
        return None
    return name


# ---- maths -----------------------------------------------------------------------------------
def embed(w: Weights, cfg: ModelConfig, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token plus learned position embedding: ``[b, s]`` ids and positions → ``[b, s, hidden]``."""
    x = F.embedding(input_ids, w["embed_tokens.weight"])
    if "project_in.weight" in w:
        x = F.linear(x, w["project_in.weight"])
    return x + F.embedding(positions + POSITION_OFFSET, w["embed_positions.weight"])


def attention_qkv(
    w: Weights, cfg: ModelConfig, h: torch.Tensor, positions: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project ``h`` ``[b, s, hidden]`` to q (pre-scaled), k, v, each ``[b, heads, s, head_dim]``.

    ``positions`` (``[b, s]``, see :func:`embed`) is unused: OPT's positions are learned
    embeddings added once, at the bottom (families with rotary embeddings rotate q and k here)."""
    x = layer_norm(w, "self_attn_layer_norm", h, LN_EPS) if cfg.do_layer_norm_before else h
    b, s, _ = x.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [b, heads, s, d]

    # Scale q before the product, as transformers does, so rounding matches it.
    q = linear(w, "self_attn.q_proj", x) * cfg.head_dim**-0.5
    return heads(q), heads(linear(w, "self_attn.k_proj", x)), heads(linear(w, "self_attn.v_proj", x))


def attention_out(w: Weights, cfg: ModelConfig, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Output projection and residual: ``h`` is the layer input, ``attn`` is ``[b, heads, s, d]``."""
    b, _, s, _ = attn.shape
    attn = attn.transpose(1, 2).reshape(b, s, cfg.hidden_size)  # [b, s, hidden]
    h = h + linear(w, "self_attn.out_proj", attn)
    return h if cfg.do_layer_norm_before else layer_norm(w, "self_attn_layer_norm", h, LN_EPS)


def mlp(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """The ReLU feed-forward block with its residual (and post-LayerNorm for opt-350m)."""
    x = layer_norm(w, "final_layer_norm", h, LN_EPS) if cfg.do_layer_norm_before else h
    h = h + linear(w, "fc2", F.relu(linear(w, "fc1", x)))
    return h if cfg.do_layer_norm_before else layer_norm(w, "final_layer_norm", h, LN_EPS)


def head(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Final norm, projection out, and logits through the tied token embedding."""
    if cfg.do_layer_norm_before:
        h = layer_norm(w, "final_layer_norm", h, LN_EPS)
    if "project_out.weight" in w:
        h = project(h, w["project_out.weight"])
    return F.linear(h, w["embed_tokens.weight"])


def elementwise(cfg: ModelConfig, part: str) -> float:
    """Hidden-sized vectors per token moved by a part's elementwise ops. Attention: layer norm 2,
    q/k/v/out written 4, read for attention 3, residual 3; MLP: layer norm 2, fc1 written 4, the
    activation 8, fc2 read 4 and written 1, residual 3 (fc1 is 4 x hidden wide)."""
    return {"attention": 12.0, "mlp": 2 + 17 * cfg.ffn_dim / (4 * cfg.hidden_size) + 3}.get(part, 0.0)


FAMILY = ModelFamily(
    name="opt",
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
)
