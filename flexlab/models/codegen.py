"""CodeGen (``CodeGenForCausalLM``, ``model_type`` codegen) as plain functions behind the family interface.

GPT-J-style blocks, and what that means here:

* Attention and MLP run *in parallel* from one LayerNorm: ``h + attn(ln(h)) + mlp(ln(h))``. The
  MLP needs the layer's input, which the engine no longer holds once attention has added its
  output, so the MLP's weights belong to the attention part and :func:`attention_out` computes
  both; the MLP stage of a ``sep_layer`` schedule has no weights and passes ``h`` through.
* Partial rotary embeddings: only the first ``rotary_dim`` dimensions of each head rotate, in
  interleaved pairs (dimensions 0 and 1, 2 and 3, ...), not the LLaMA family's two halves.
* One fused ``qkv_proj`` laid out for the four model-parallel shards CodeGen was trained on: the
  output splits into 4 blocks, each holding its heads' queries, then values, then keys.
* No biases in attention; an untied ``lm_head`` with a bias; GELU (tanh approximation).
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
from flexlab.models.layers import layer_norm, project, rotate_leading_pairs

PREFIX = "transformer."
MP_NUM = 4  # the model-parallel shards the fused projection is laid out for


# ---- config ----------------------------------------------------------------------------------
def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """A ModelConfig from a CodeGen ``config.json``."""
    hidden = hf.get("n_embd", hf.get("hidden_size"))
    heads = hf.get("n_head", hf.get("num_attention_heads"))
    if hidden is None or heads is None:
        raise KeyError("n_embd" if hidden is None else "n_head")
    if heads % MP_NUM:
        raise ConfigError(
            f"{name}: n_head={heads} is not a multiple of {MP_NUM}, which CodeGen's fused qkv layout needs"
        )
    return ModelConfig(
        name=name,
        family="codegen",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf.get("n_layer") or hf.get("num_hidden_layers") or 0,
        num_heads=heads,
        ffn_dim=hf.get("n_inner") or 4 * hidden,
        max_positions=hf.get("n_positions", hf.get("max_position_embeddings", 2048)),
        activation=_activation(hf, name),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        rotary_dim=hf.get("rotary_dim"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **token_ids_from_hf(hf, pad=50256, bos=50256, eos=50256),
    )


def _activation(hf: dict, name: str) -> str:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{name}: activation_function={act!r} is not supported; CodeGen uses 'gelu_new'")
    return "gelu_tanh"


def config_to_hf(cfg: ModelConfig) -> dict:
    """The ``config.json`` dictionary of ``cfg`` (accepted by ``transformers.CodeGenConfig(**d)``)."""
    return dict(
        model_type="codegen",
        architectures=["CodeGenForCausalLM"],
        vocab_size=cfg.vocab_size,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.ffn_dim,
        n_positions=cfg.max_positions,
        rotary_dim=cfg.rotary_dim,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **token_ids_to_hf(cfg),
    )


# ---- weights ---------------------------------------------------------------------------------
def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every weight under its checkpoint name. The MLP's weights are read by the attention part
    (see the module docstring)."""
    h, f = cfg.hidden_size, cfg.ffn_dim
    specs = [WeightSpec(PREFIX + "wte.weight", (cfg.vocab_size, h), None, table_parts(cfg))]
    for i in range(cfg.num_layers):
        pre = f"{PREFIX}h.{i}."
        specs += [
            WeightSpec(pre + "ln_1.weight", (h,), i, ("attention",), "ones"),
            WeightSpec(pre + "ln_1.bias", (h,), i, ("attention",), "zeros"),
            WeightSpec(pre + "attn.qkv_proj.weight", (3 * h, h), i, ("attention",)),
            WeightSpec(pre + "attn.out_proj.weight", (h, h), i, ("attention",)),
            WeightSpec(pre + "mlp.fc_in.weight", (f, h), i, ("attention",)),
            WeightSpec(pre + "mlp.fc_in.bias", (f,), i, ("attention",), "zeros"),
            WeightSpec(pre + "mlp.fc_out.weight", (h, f), i, ("attention",)),
            WeightSpec(pre + "mlp.fc_out.bias", (h,), i, ("attention",), "zeros"),
        ]
    specs += [
        WeightSpec(PREFIX + "ln_f.weight", (h,), None, ("head",), "ones"),
        WeightSpec(PREFIX + "ln_f.bias", (h,), None, ("head",), "zeros"),
    ]
    if not cfg.tie_word_embeddings:
        specs += [
            WeightSpec("lm_head.weight", (cfg.vocab_size, h), None, ("head",), local="lm_head.weight"),
            WeightSpec("lm_head.bias", (cfg.vocab_size,), None, ("head",), "zeros", local="lm_head.bias"),
        ]
    return specs


def canonical_name(checkpoint_name: str, cfg: ModelConfig) -> str | None:
    """Spec name for a checkpoint tensor name; None for buffers older checkpoints saved."""
    if checkpoint_name.endswith(("attn.causal_mask", "attn.masked_bias", "attn.bias")):
        return None
    if checkpoint_name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    return checkpoint_name


# ---- maths -----------------------------------------------------------------------------------
def embed(w: Weights, cfg: ModelConfig, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token embedding only (positions enter by rotation in each layer)."""
    return F.embedding(input_ids, w["wte.weight"])


def attention_qkv(
    w: Weights, cfg: ModelConfig, h: torch.Tensor, positions: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (rotated, pre-scaled), k (rotated), v as ``[b, heads, s, d]``."""
    x = layer_norm(w, "ln_1", h, cfg.norm_eps)
    b, s, _ = x.shape
    local = cfg.hidden_size // MP_NUM
    fused = project(x, w["attn.qkv_proj.weight"]).view(b, s, MP_NUM, 3 * local)
    q, v, k = (part.reshape(b, s, cfg.num_heads, cfg.head_dim) for part in fused.split(local, dim=-1))
    r = cfg.rotary_dim or cfg.head_dim
    q, k = (rotate_leading_pairs(t, positions, r, 10000.0, heads_dim=2) for t in (q, k))
    return q.transpose(1, 2) * cfg.head_dim**-0.5, k.transpose(1, 2), v.transpose(1, 2)


def attention_out(w: Weights, cfg: ModelConfig, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The whole parallel block: ``h + out_proj(attn) + mlp(ln_1(h))``."""
    b, _, s, _ = attn.shape
    x = layer_norm(w, "ln_1", h, cfg.norm_eps)
    ff = project(x, w["mlp.fc_in.weight"], w["mlp.fc_in.bias"])
    ff = project(F.gelu(ff, approximate="tanh"), w["mlp.fc_out.weight"], w["mlp.fc_out.bias"])
    out = project(attn.transpose(1, 2).reshape(b, s, cfg.hidden_size), w["attn.out_proj.weight"])
    return out + ff + h


def mlp(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Nothing: the MLP ran beside attention, in :func:`attention_out`."""
    return h


def head(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Final LayerNorm and the output projection (with its bias; the token table when tied)."""
    x = layer_norm(w, "ln_f", h, cfg.norm_eps)
    if cfg.tie_word_embeddings:
        return F.linear(x, w["wte.weight"])
    return project(x, w["lm_head.weight"], w["lm_head.bias"])


def elementwise(cfg: ModelConfig, part: str) -> float:
    """Hidden-sized vectors per token moved by a part's elementwise ops (see ``ModelFamily``).
    Attention (the whole parallel block): LayerNorm twice 4, fused qkv written 3 and read 3,
    q and k rotated 4, output 1, GELU over 4× hidden read and written 8, biases 5, two residual
    adds 5. MLP: nothing. Head: LayerNorm 2, the bias over the vocabulary."""
    return {"embed": 1.0, "attention": 33.0, "mlp": 0.0, "head": 2.0 + cfg.vocab_size / cfg.hidden_size}[part]


FAMILY = ModelFamily(
    name="codegen",
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
    token_table="wte.weight",
)
