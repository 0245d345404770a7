"""The LLaMA family (Llama, Mistral, Qwen2, Qwen3) equals transformers, on the reference path and
under offloading policies (float32, CPU), on tiny random checkpoints that exercise each feature."""

from __future__ import annotations

import json

import pytest
import torch

import flexlab
from flexlab import Policy
from tests.integration.test_exactness import hf_greedy

PROMPTS = [[1, 17, 40, 99, 5], [1, 7], [1, 250, 31, 8, 77, 12, 3], [1, 64, 65]]
NEW = 6

VARIANTS = {  # name: (model_type, config overrides)
    "llama gqa untied": ("llama", dict(num_key_value_heads=2)),
    "llama mha tied llama3-rope": (
        "llama",
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama linear-rope": ("llama", dict(num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # generation runs past the 8 trained positions, where the rotation's base grows with each call's length
    "llama dynamic-rope": (
        "llama",
        dict(num_key_value_heads=2, max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    ),
    # YaRN (as Qwen's long-context configs set it): interpolated frequencies, sharper attention
    "qwen2 yarn-rope": (
        "qwen2",
        dict(
            num_key_value_heads=2,
            max_position_embeddings=8,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
        ),
    ),
    "mistral window": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),  # prompts reach past it
    "qwen2 biases tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3 qk-norm head_dim": ("qwen3", dict(num_key_value_heads=2, head_dim=24)),
}


def hf_model(model_type: str, overrides: dict, seed: int = 0):
    import transformers

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[model_type]
    config = getattr(transformers, f"{cls}Config")(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=overrides.pop("max_position_embeddings", 128),
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=overrides.pop("tie_word_embeddings", False),
        **overrides,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    with torch.no_grad():  # default init sets norms to 1 and biases to 0: randomise so they matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    model_type, overrides = VARIANTS[request.param]
    hf = hf_model(model_type, dict(overrides))
    d = tmp_path_factory.mktemp(request.param.replace(" ", "-"))
    hf.save_pretrained(d)
    return hf, flexlab.Model.from_pretrained(d, dtype=torch.float32)


def hf_scores(hf, seqs):
    out = []
    with torch.no_grad():
        for s in seqs:
            lp = torch.log_softmax(hf(torch.tensor([s])).logits[0, :-1].float(), dim=-1)
            out.append(lp.gather(-1, torch.tensor(s[1:])[:, None]).squeeze(-1))
    return out


def test_config_is_read_as_the_variant_says(pair):
    hf, model = pair
    c, h = model.config, hf.config
    assert (c.num_kv_heads, c.head_dim) == (h.num_key_value_heads, getattr(h, "head_dim", None) or 16)
    assert c.kv_cache_bytes_per_token(2) == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2


def test_reference_path_equals_transformers(pair):
    hf, model = pair
    expected = hf_greedy(hf, PROMPTS, NEW)
    assert len({t for row in expected for t in row}) > 4  # not a degenerate model
    assert model.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected
    for ours, theirs in zip(model.score(PROMPTS), hf_scores(hf, PROMPTS)):
        assert torch.allclose(ours, theirs, atol=1e-4)


GRID = {
    "weights gpu/cpu/disk": Policy.from_percent([20, 30, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2),
    "cache split three ways": Policy.from_percent([100, 0, 30, 30, 100, 0], gpu_batch_size=3, num_gpu_batches=2),
    "everything offloaded, overlap off": Policy.from_percent(
        [10, 40, 20, 40, 0, 0], gpu_batch_size=2, num_gpu_batches=2, overlap=False
    ),
    "cache on cpu, attention on cpu": Policy.from_percent(
        [30, 30, 25, 50, 0, 100], gpu_batch_size=4, cpu_cache_compute=True
    ),
}


@pytest.mark.parametrize("name", list(GRID))
def test_engine_equals_transformers_under_offloading(pair, tmp_path, name):
    hf, model = pair
    expected = hf_greedy(hf, PROMPTS, NEW)
    with flexlab.Engine(model, GRID[name], offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected
        for ours, theirs in zip(engine.score(PROMPTS), hf_scores(hf, PROMPTS)):
            assert torch.allclose(ours, theirs, atol=1e-4)


def test_dynamic_rope_grows_its_base_past_the_trained_length(tmp_path):
    """Dynamic NTK scaling: a sequence longer than ``max_position_embeddings`` rotates with a larger
    base (transformers', computed from the call's length: a sequence scored is fed without its last
    token, as lm-eval's hf backend does), and the model takes ``factor`` times the trained length."""
    import dataclasses

    hf = hf_model("llama", dict(max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    hf.save_pretrained(tmp_path)
    model = flexlab.Model.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.max_positions == 16
    long = [1] + [(7 * i) % 290 + 5 for i in range(13)]  # 14 tokens: 13 fed, past the 8 trained positions
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([long[:-1]])).logits[0].float(), dim=-1)
    expected = lp.gather(-1, torch.tensor(long[1:])[:, None]).squeeze(-1)
    assert torch.allclose(model.score([long])[0], expected, atol=1e-4)
    # Without the scaling every position rotates differently (the call is longer than 8), so the
    # comparison above can fail; a call within the trained length is the same with or without.
    plain = flexlab.Model(dataclasses.replace(model.config, rope_scaling=None), model.weights, dtype=torch.float32)
    assert not torch.allclose(plain.score([long])[0], expected, atol=1e-3)
    assert torch.allclose(plain.score([long[:8]])[0], model.score([long[:8]])[0])


def test_unsupported_rope_scaling_is_refused_by_name(tmp_path):
    hf = hf_model(
        "llama", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8})
    )
    hf.save_pretrained(tmp_path)
    with pytest.raises(flexlab.ConfigError, match="rope_scaling type 'longrope' is not supported; supported: default"):
        flexlab.Model.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0}  # no factor
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(flexlab.ConfigError, match="rope_scaling type 'dynamic' needs factor; add it to config.json"):
        flexlab.Model.from_pretrained(tmp_path)


def test_the_sliding_window_changes_attention_past_it(pair):
    hf, model = pair
    if hf.config.model_type != "mistral":
        pytest.skip("only the mistral variant sets a window")
    assert (model.config.sliding_window, model.config.max_positions) == (4, 128)
    full = flexlab.Model(model.config.replace(sliding_window=None), model.weights, dtype=torch.float32)
    ours, unwindowed = model.score(PROMPTS[2:3])[0], full.score(PROMPTS[2:3])[0]
    assert torch.equal(ours[:3], unwindowed[:3])  # the first 4 tokens are inside the window
    assert not torch.allclose(ours[3:], unwindowed[3:], atol=1e-3)


def test_qwen2_per_layer_windows_are_refused(tmp_path):
    hf = hf_model("qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=8))
    hf.save_pretrained(tmp_path)
    with pytest.raises(flexlab.ConfigError, match="use_sliding_window=True"):
        flexlab.Model.from_pretrained(tmp_path)


def test_a_compressed_cache_gives_the_same_result_on_every_placement(pair, tmp_path):
    hf, model = pair
    q4 = flexlab.QuantConfig(bits=4, group_size=8)
    runs = []
    placements = [([100, 0, 100, 0, 100, 0], False), ([50, 20, 0, 0, 0, 100], False), ([0, 0, 30, 30, 0, 0], False)]
    for percent, on_cpu in placements + [([0, 0, 30, 30, 0, 0], True)]:  # cpu rows decoded, attended on the host
        policy = Policy.from_percent(
            percent, gpu_batch_size=2, num_gpu_batches=2, compress_cache=q4, cpu_cache_compute=on_cpu
        )
        with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
            runs.append(engine.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=None).token_ids)
    assert all(r == runs[0] for r in runs[1:])


def test_random_preset_checkpoint_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    from flexlab.cli import main

    assert main(["convert", "llama-tiny", str(tmp_path / "rnd"), "--random", "--dtype", "float32", "--seed", "4"]) == 0
    ours = flexlab.Model.from_config("llama-tiny", seed=4, dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "rnd", dtype=torch.float32)  # every weight loaded, none new
    seq = [1, 5, 6, 9, 40]
    (theirs,) = hf_scores(hf, [seq])
    assert torch.allclose(ours.score([seq])[0], theirs, atol=1e-5)
    assert flexlab.Model.from_pretrained(tmp_path / "rnd").config.num_kv_heads == 2


@pytest.mark.parametrize("percent", [[100, 0, 100, 0, 100, 0], [0, 30, 100, 0, 0, 0]])
def test_compressed_weights_compute_exactly_the_quantized_model(pair, percent, tmp_path):
    from tests.integration.test_compression import FakeQuantized

    hf, model = pair
    w4 = flexlab.QuantConfig(bits=4, group_size=32)
    quantized = flexlab.Model(model.config, FakeQuantized(model.weights, w4), dtype=torch.float32, device="cpu")
    expected = quantized.generate(PROMPTS, max_new_tokens=NEW).token_ids
    policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2, compress_weight=w4)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected
        for ours, theirs in zip(engine.score(PROMPTS), quantized.score(PROMPTS)):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_sparse_attention_keeping_everything_is_exact_with_grouped_query_attention(pair, tmp_path):
    hf, model = pair
    expected = hf_greedy(hf, PROMPTS, NEW)
    policy = Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2, attn_sparsity=0.999)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:  # keeps ceil(0.999 L) = L rows
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected


def test_every_end_of_sequence_id_ends_a_sequence(tmp_path):
    """Llama 3 lists several eos ids in config.json, instruct models more in generation_config.json:
    each of them stops a sequence (as in transformers), and a saved config keeps the list."""
    import json

    hf = hf_model("llama", dict(num_key_value_heads=2))
    hf.save_pretrained(tmp_path)
    free = (
        flexlab.Model.from_pretrained(tmp_path, dtype=torch.float32)
        .generate(PROMPTS[:1], max_new_tokens=NEW, stop_token_ids=None)
        .token_ids[0]
    )
    first, second = free[2], free[4]  # ids the model emits, third and fifth
    assert first not in free[:2] and 2 not in free[:3]
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, first]}))
    model = flexlab.Model.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.eos_token_ids == (2, first)
    assert model.generate(PROMPTS[:1], max_new_tokens=NEW).token_ids[0] == free[:3]
    assert model.family.config_to_hf(model.config)["eos_token_id"] == [2, first]

    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, second]}))
    model = flexlab.Model.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.eos_token_ids == (2, second)
    assert model.generate(PROMPTS[:1], max_new_tokens=NEW).token_ids[0] == free[:5]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "end"}))
    with pytest.raises(flexlab.CheckpointError, match="generation_config.json: eos_token_id='end' must be an int"):
        flexlab.Model.from_pretrained(tmp_path)
