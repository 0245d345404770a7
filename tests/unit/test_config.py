import pytest
import torch

import flexlab
from flexlab.errors import ConfigError
from flexlab.models.config import ModelConfig, get_preset, preset_names
from flexlab.models.family import part_weights
from flexlab.models.registry import get_family, num_parameters, weight_bytes

# Parameter counts of the released OPT checkpoints, rounded to the printed precision.
OFFICIAL_PARAMS_M = {
    "opt-125m": 125.2,
    "opt-350m": 331.2,
    "opt-1.3b": 1315.8,
    "opt-2.7b": 2651.6,
    "opt-6.7b": 6658.5,
    "opt-13b": 12853.5,
    "opt-30b": 29974.5,
    "opt-66b": 65719.7,
    "opt-175b": 174604.5,
}


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS_M))
def test_presets_have_official_parameter_counts(name):
    assert round(num_parameters(get_preset(name)) / 1e6, 1) == OFFICIAL_PARAMS_M[name]


def test_every_opt_size_and_tiny_presets_exist():
    assert set(OFFICIAL_PARAMS_M) <= set(preset_names())
    assert {"opt-tiny", "opt-tiny-postln"} <= set(preset_names())
    assert get_preset("facebook/opt-1.3b") is get_preset("opt-1.3b")


def test_opt_350m_is_post_ln_with_projections():
    cfg = get_preset("opt-350m")
    assert not cfg.do_layer_norm_before and cfg.word_embed_proj_dim == 512
    names = {s.name for s in get_family("opt").weight_specs(cfg)}
    assert {"decoder.project_in.weight", "decoder.project_out.weight"} <= names
    assert "decoder.final_layer_norm.weight" not in names


def test_analytic_sizes_add_up():
    cfg = get_preset("opt-1.3b")
    h, f = cfg.hidden_size, cfg.ffn_dim
    per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attention, mlp, two layer norms
    assert weight_bytes(cfg, 2, layer=0) == per_layer * 2
    assert weight_bytes(cfg, 2) == cfg.num_layers * per_layer * 2 + weight_bytes(cfg, 2, layer=None)
    assert cfg.kv_cache_bytes_per_token(2) == 2 * 24 * 2048 * 2
    assert cfg.activation_bytes_per_token(4) == 2048 * 4


def test_parts_partition_layer_weights():
    cfg = get_preset("opt-tiny")
    specs = get_family("opt").weight_specs(cfg)
    attn, mlp = part_weights(specs, "attention", 1), part_weights(specs, "mlp", 1)
    assert {s.short for s in attn} >= {"self_attn.q_proj.weight", "self_attn_layer_norm.bias"}
    assert {s.short for s in mlp} >= {"fc1.weight", "final_layer_norm.weight"}
    assert len(attn) + len(mlp) == len([s for s in specs if s.layer == 1])
    # the tied token embedding is read by both ends of the model
    assert [s.name for s in part_weights(specs, "head") if s.short == "embed_tokens.weight"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=100, num_heads=3), "not divisible by num_heads=3"),
        (dict(num_layers=0), "num_layers must be a positive int"),
        (dict(activation="gelu"), "not supported"),
    ],
)
def test_invalid_configs(kwargs, message):
    base = dict(name="x", hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**base, **kwargs})


def test_from_config_is_lazy_and_deterministic():
    big = flexlab.Model.from_config("opt-175b", seed=0)  # instant: nothing is allocated up front
    w = big.weights.get("decoder.layers.95.self_attn_layer_norm.weight")
    assert w.shape == (12288,) and torch.all(w == 1)
    a = flexlab.Model.from_config("opt-tiny", seed=3).weights.get("decoder.layers.0.fc1.weight")
    b = flexlab.Model.from_config("opt-tiny", seed=3).weights.get("decoder.layers.0.fc1.weight")
    c = flexlab.Model.from_config("opt-tiny", seed=4).weights.get("decoder.layers.0.fc1.weight")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.015 < a.std().item() < 0.025


def test_default_dtype_is_fast_on_the_device():
    from flexlab.devices import cpu_has_fast_bfloat16

    fast = torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32  # AVX2 alone emulates bfloat16
    assert flexlab.Model.from_config("opt-tiny", device="cpu").dtype == fast
