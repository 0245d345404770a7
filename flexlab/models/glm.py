"""GLM (``GlmForCausalLM``, ``Glm4ForCausalLM``: ``model_type`` glm and glm4; GLM-4-9B and the GLM-4
0414 releases) as plain functions behind the family interface.

A LLaMA-like decoder (RMSNorm, grouped-query attention, a SwiGLU MLP, untied head) with its own
details:

* Partial rotary embeddings on the first half of each head (``partial_rotary_factor``, 0.5),
  rotating interleaved pairs (dimensions 0 and 1, 2 and 3, ...), not two halves.
* Biases on q, k and v (``attention_bias``), none on the output projection.
* The MLP's gate and up projections fused into one ``gate_up_proj`` (gate first).
* glm4 normalises each sub-layer's output again before its residual add
  (``post_self_attn_layernorm``, ``post_mlp_layernorm``).

GLM-130B and ChatGLM ship only remote code (``trust_remote_code``); they are refused with a
line naming the native classes this module runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexlab.errors import ConfigError
from flexlab.models.config import ModelConfig
from flexlab.models.family import (
    ModelFamily,
    Weights,
    WeightSpec,
    table_parts,
    token_ids_from_hf,
    token_ids_to_hf,
)
from flexlab.models.layers import linear, project, rms_norm, rotate_leading_pairs

MODEL_TYPES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}
REMOTE_ONLY = ("chatglm", "glm130b")  # model_type values of checkpoints that need trust_remote_code


def refuse_remote_code(model_type: str) -> ConfigError:
    """The error for a GLM checkpoint transformers runs only with its own remote code."""
    return ConfigError(
        f"model_type {model_type!r} (GLM-130B / ChatGLM) needs trust_remote_code, which flexlab does not run; "
        f"the native GLM classes are supported: {', '.join(MODEL_TYPES.values())} (GLM-4-9B, GLM-4-0414)"
    )


# ---- config ----------------------------------------------------------------------------------
def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """A ModelConfig from a GLM or GLM-4 ``config.json``."""
    model_type = hf["model_type"]
    if hf.get("mlp_bias"):
        raise ConfigError(f"{name}: mlp_bias=True is not supported (no released GLM sets it)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{name}: hidden_act={hf['hidden_act']!r} is not supported; GLM uses 'silu'")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{name}: rope_scaling type {kind!r} is not supported for GLM; supported: default")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    factor = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))
    return ModelConfig(
        name=name,
        family=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        ffn_dim=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 131072),
        enable_bias=False,
        activation="silu",
        norm_eps=float(hf.get("rms_norm_eps", 1.5625e-7)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rotary_dim=int(head_dim * factor),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", True)),
        **token_ids_from_hf(hf, pad=151329, bos=151329, eos=151329),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The ``config.json`` dictionary of ``cfg``, for its own ``model_type``."""
    factor = (cfg.rotary_dim or cfg.head_dim) / cfg.head_dim
    return dict(
        model_type=cfg.family,
        architectures=[MODEL_TYPES[cfg.family]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor},
        partial_rotary_factor=factor,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.qkv_bias,
        attention_dropout=0.0,
        **token_ids_to_hf(cfg),
    )


# ---- weights ---------------------------------------------------------------------------------
def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every weight under its checkpoint name."""
    h, f, d = cfg.hidden_size, cfg.ffn_dim, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    specs = [WeightSpec("model.embed_tokens.weight", (cfg.vocab_size, h), None, table_parts(cfg))]
    post_norms = cfg.family == "glm4"
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        specs.append(WeightSpec(pre + "input_layernorm.weight", (h,), i, ("attention",), "ones"))
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            specs.append(WeightSpec(pre + f"self_attn.{proj}.weight", (rows, h), i, ("attention",)))
            if cfg.qkv_bias:
                specs.append(WeightSpec(pre + f"self_attn.{proj}.bias", (rows,), i, ("attention",), "zeros"))
        specs.append(WeightSpec(pre + "self_attn.o_proj.weight", (h, q), i, ("attention",)))
        if post_norms:
            specs.append(WeightSpec(pre + "post_self_attn_layernorm.weight", (h,), i, ("attention",), "ones"))
        specs.append(WeightSpec(pre + "post_attention_layernorm.weight", (h,), i, ("mlp",), "ones"))
        specs.append(WeightSpec(pre + "mlp.gate_up_proj.weight", (2 * f, h), i, ("mlp",)))
        specs.append(WeightSpec(pre + "mlp.down_proj.weight", (h, f), i, ("mlp",)))
        if post_norms:
            specs.append(WeightSpec(pre + "post_mlp_layernorm.weight", (h,), i, ("mlp",), "ones"))
    specs.append(WeightSpec("model.norm.weight", (h,), None, ("head",), "ones"))
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", (cfg.vocab_size, h), None, ("head",), local="lm_head.weight"))
    return specs


def canonical_name(checkpoint_name: str, cfg: ModelConfig) -> str | None:
    """Spec name for a checkpoint tensor name; None for the tied head's copy."""
    if checkpoint_name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    return checkpoint_name


# ---- maths -----------------------------------------------------------------------------------
def embed(w: Weights, cfg: ModelConfig, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token embedding only (positions enter by rotation in each layer)."""
    return F.embedding(input_ids, w["embed_tokens.weight"])


def attention_qkv(
    w: Weights, cfg: ModelConfig, h: torch.Tensor, positions: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (rotated, pre-scaled) ``[b, heads, s, d]``; k (rotated) and v ``[b, kv_heads, s, d]``."""
    x = rms_norm(h, w["input_layernorm.weight"], cfg.norm_eps)
    b, s, _ = x.shape
    q = linear(w, "self_attn.q_proj", x).view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    k = linear(w, "self_attn.k_proj", x).view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    v = linear(w, "self_attn.v_proj", x).view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    r = cfg.rotary_dim or cfg.head_dim
    q, k = (rotate_leading_pairs(t, positions, r, cfg.rope_theta, heads_dim=1, in_float32=False) for t in (q, k))
    return q * cfg.head_dim**-0.5, k, v


def attention_out(w: Weights, cfg: ModelConfig, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Output projection (glm4: normalised again) and residual."""
    b, _, s, _ = attn.shape
    out = linear(w, "self_attn.o_proj", attn.transpose(1, 2).reshape(b, s, cfg.num_heads * cfg.head_dim))
    if cfg.family == "glm4":
        out = rms_norm(out, w["post_self_attn_layernorm.weight"], cfg.norm_eps)
    return h + out


def mlp(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """SwiGLU from the fused gate/up projection (glm4: its output normalised again) and residual."""
    x = rms_norm(h, w["post_attention_layernorm.weight"], cfg.norm_eps)
    gate, up = linear(w, "mlp.gate_up_proj", x).chunk(2, dim=-1)
    out = linear(w, "mlp.down_proj", up * F.silu(gate))
    if cfg.family == "glm4":
        out = rms_norm(out, w["post_mlp_layernorm.weight"], cfg.norm_eps)
    return h + out


def head(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm and the output projection (the token table when tied) → logits."""
    x = rms_norm(h, w["norm.weight"], cfg.norm_eps)
    return project(x, w["embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"])


def elementwise(cfg: ModelConfig, part: str) -> float:
    """Hidden-sized vectors per token moved by a part's elementwise ops (see ``ModelFamily``), as
    the LLaMA family's with half of q and k rotated and, for glm4, one more norm per part."""
    extra = 2.0 if cfg.family == "glm4" else 0.0
    return {
        "embed": 1.0,
        "attention": 12.0 + extra,
        "mlp": 2.0 + 3.0 * cfg.ffn_dim / cfg.hidden_size + 3.0 + extra,
        "head": 2.0,
    }[part]


FAMILY = ModelFamily(
    name="glm",
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
