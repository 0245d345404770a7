"""The LLaMA family: Llama 2/3, Mistral, Qwen2, Qwen3 — config, weight specs and the maths.

Quirks, each handled where it bites:

* RMSNorm (no mean, no bias), computed in float32 and cast back, as transformers does.
* Rotary position embeddings on q and k in every layer, by each token's own position (left
  padding makes them per sequence), with ``rope_theta`` and the ``rope_scaling`` variants of
  :mod:`flexlab.models.rope` (others are refused by name). ``dynamic`` and ``yarn`` stretch the
  trained length ``factor`` times, so the model takes that many positions. The halves convention:
  a head's first half pairs with its second (``rotate_half``), not interleaved pairs.
* Grouped-query attention: ``num_kv_heads`` key/value heads, each serving a group of query
  heads; the KV cache stores only those (:func:`flexlab.models.attention.expand_kv`).
* SwiGLU MLP: ``down(silu(gate(x)) * up(x))``.
* A tied head (Llama-3.2-1B/3B, small Qwen2.5) reads the token embedding; an untied one its own
  ``lm_head.weight``. Qwen2 has q/k/v biases; Qwen3 an RMSNorm over each head's q and k (before
  the rotation) and a ``head_dim`` of its own.
* Mistral v0.1's sliding window: each token attends to the last ``sliding_window`` tokens
  (the attention mask says so; the cache still holds every token). Qwen2's per-layer windows
  (``use_sliding_window``, off in the released checkpoints) are refused.
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
from flexlab.models.layers import linear, project, rms_norm, rotate_halves
from flexlab.models.rope import ROPE_KEYS, is_dynamic, rope_frequencies

MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


# ---- config ----------------------------------------------------------------------------------
def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """A :class:`ModelConfig` from a Llama/Mistral/Qwen2/Qwen3 ``config.json`` dictionary."""
    model_type = hf["model_type"]
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{name}: attention_bias/mlp_bias=True (biases on every projection) is not supported")
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5; older configs: rope_theta + rope_scaling
    if not rope:
        rope = dict(hf.get("rope_scaling") or {})
        rope["rope_theta"] = hf.get("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type not in ROPE_KEYS:
        supported = ", ".join(ROPE_KEYS)
        raise ConfigError(f"{name}: rope_scaling type {rope_type!r} is not supported; supported: {supported}")
    max_positions = hf.get("max_position_embeddings", 2048)
    if rope_type == "dynamic":  # its trained length is max_position_embeddings, whatever else the dict says
        rope["original_max_position_embeddings"] = max_positions
    elif rope_type in ("llama3", "yarn"):  # transformers' default, where a config leaves it out
        rope.setdefault("original_max_position_embeddings", max_positions)
    if rope_type == "yarn" and rope.get("factor") is None:
        rope["factor"] = max_positions / rope["original_max_position_embeddings"]
    missing = [k for k in ROPE_KEYS[rope_type] if rope.get(k) is None]
    if missing:
        raise ConfigError(f"{name}: rope_scaling type {rope_type!r} needs {', '.join(missing)}; add it to config.json")
    if rope_type in ("dynamic", "yarn"):  # both stretch the trained length `factor` times: allow that many
        max_positions = max(max_positions, int(rope["original_max_position_embeddings"] * rope["factor"]))
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type != "mistral" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise ConfigError(
            f"{name}: use_sliding_window=True ({model_type}'s per-layer windows) is not supported; "
            "set it to false to run with full attention, as the released checkpoints do"
        )
    heads = hf["num_attention_heads"]
    return ModelConfig(
        name=name,
        family=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_dim=hf["intermediate_size"],
        max_positions=max_positions,
        sliding_window=int(window) if window else None,
        enable_bias=False,
        activation=_activation(hf, name),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=(("rope_type", rope_type), *sorted(rope.items())) if rope_type != "default" else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        **token_ids_from_hf(hf, pad=0, bos=1, eos=2),
    )


def _activation(hf: dict, name: str) -> str:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{name}: hidden_act={act!r} is not supported; the LLaMA family uses 'silu'")
    return act


def config_to_hf(cfg: ModelConfig) -> dict:
    """The ``config.json`` dictionary of ``cfg``, for its own ``model_type``."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling or ())}
    # dynamic NTK's trained length is transformers' max_position_embeddings (see config_from_hf)
    trained = rope.pop("original_max_position_embeddings") if rope["rope_type"] == "dynamic" else cfg.max_positions
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
        max_position_embeddings=trained,
        rms_norm_eps=cfg.norm_eps,
        hidden_act=cfg.activation,
        rope_parameters=rope,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False,
        attention_dropout=0.0,
        sliding_window=cfg.sliding_window,
        use_sliding_window=cfg.sliding_window is not None,
        **token_ids_to_hf(cfg),
    )


# ---- weights ---------------------------------------------------------------------------------
def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every weight under its checkpoint name."""
    h, f, d = cfg.hidden_size, cfg.ffn_dim, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    specs = [WeightSpec("model.embed_tokens.weight", (cfg.vocab_size, h), None, table_parts(cfg))]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        specs.append(WeightSpec(pre + "input_layernorm.weight", (h,), i, ("attention",), "ones"))
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            specs.append(WeightSpec(pre + f"self_attn.{proj}.weight", (rows, h), i, ("attention",)))
            if cfg.qkv_bias:
                specs.append(WeightSpec(pre + f"self_attn.{proj}.bias", (rows,), i, ("attention",), "zeros"))
        if cfg.qk_norm:
            specs += [
                WeightSpec(pre + f"self_attn.{n}.weight", (d,), i, ("attention",), "ones") for n in ("q_norm", "k_norm")
            ]
        specs.append(WeightSpec(pre + "self_attn.o_proj.weight", (h, q), i, ("attention",)))
        specs.append(WeightSpec(pre + "post_attention_layernorm.weight", (h,), i, ("mlp",), "ones"))
        specs += [
            WeightSpec(pre + f"mlp.{n}.weight", shape, i, ("mlp",))
            for n, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f)))
        ]
    specs.append(WeightSpec("model.norm.weight", (h,), None, ("head",), "ones"))
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", (cfg.vocab_size, h), None, ("head",), local="lm_head.weight"))
    return specs


def canonical_name(checkpoint_name: str, cfg: ModelConfig) -> str | None:
    """Spec name for a checkpoint tensor name; None for tensors flexlab does not read."""
    if checkpoint_name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved
        return None
    if checkpoint_name == "lm_head.weight" and cfg.tie_word_embeddings:  # a copy of the token table
        return None
    return checkpoint_name


# ---- maths -----------------------------------------------------------------------------------
def embed(w: Weights, cfg: ModelConfig, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token embedding only (positions enter by rotation in each layer): ``[b, s]`` → ``[b, s, hidden]``."""
    return F.embedding(input_ids, w["embed_tokens.weight"])


def attention_qkv(
    w: Weights, cfg: ModelConfig, h: torch.Tensor, positions: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (rotated, pre-scaled) ``[b, heads, s, d]``; k (rotated) and v ``[b, kv_heads, s, d]``."""
    x = rms_norm(h, w["input_layernorm.weight"], cfg.norm_eps)
    b, s, _ = x.shape
    q = linear(w, "self_attn.q_proj", x).view(b, s, cfg.num_heads, cfg.head_dim)
    k = linear(w, "self_attn.k_proj", x).view(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = linear(w, "self_attn.v_proj", x).view(b, s, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:  # Qwen3: each head's q and k normalised before the rotation
        q = rms_norm(q, w["self_attn.q_norm.weight"], cfg.norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], cfg.norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, d]
    scaling = cfg.rope_scaling
    inv, factor = rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling, length if is_dynamic(scaling) else 0)
    angles = positions[..., None].float() * inv.to(x.device)  # [b, s, d/2], in float32 as transformers
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [b, 1, s, d]
    cos, sin = angles.cos(), angles.sin()
    if factor != 1.0:  # YaRN's sharper attention
        cos, sin = cos * factor, sin * factor
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return rotate_halves(q, cos, sin) * cfg.head_dim**-0.5, rotate_halves(k, cos, sin), v


def attention_out(w: Weights, cfg: ModelConfig, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Output projection and residual: ``attn`` ``[b, heads, s, d]``."""
    b, _, s, _ = attn.shape
    return h + linear(w, "self_attn.o_proj", attn.transpose(1, 2).reshape(b, s, cfg.num_heads * cfg.head_dim))


def mlp(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP with its residual."""
    x = rms_norm(h, w["post_attention_layernorm.weight"], cfg.norm_eps)
    return h + linear(w, "mlp.down_proj", F.silu(linear(w, "mlp.gate_proj", x)) * linear(w, "mlp.up_proj", x))


def head(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm and the output projection (the token table when tied) → logits."""
    x = rms_norm(h, w["norm.weight"], cfg.norm_eps)
    return project(x, w["embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"])


def elementwise(cfg: ModelConfig, part: str) -> float:
    """Hidden-sized vectors per token moved by a part's elementwise ops (see ``ModelFamily``).
    Attention: RMSNorm 2, q/k/v/o written, q and k rotated (read and written), q/k/v read for
    attention, residual 3. MLP: RMSNorm 2, gate and up written, SiLU-times-up read 2 and written
    1, down read and written, residual 3."""
    h = cfg.hidden_size
    q, kv = cfg.num_heads * cfg.head_dim / h, cfg.num_kv_heads * cfg.head_dim / h
    if part == "attention":
        return 2 + (q + 2 * kv + 1) + 2 * (q + kv) + (q + 2 * kv) + 3
    if part == "mlp":
        f = cfg.ffn_dim / h
        return 2 + 2 * f + 3 * f + f + 1 + 3
    return 0.0


FAMILY = ModelFamily(
    name="llama",
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
