"""The families FlexGen promised and never shipped (BLOOM, ...) equal transformers, on the
reference path and under the offloading grid (float32, CPU), on tiny random checkpoints that
exercise each family's quirks; the same checks as the LLaMA family's."""

from __future__ import annotations

import pytest
import torch

import flexlab
from flexlab import Policy
from tests.integration.test_exactness import hf_greedy
from tests.integration.test_llama import GRID, NEW, PROMPTS, hf_scores


def _bloom(**overrides):
    import transformers

    config = dict(vocab_size=300, hidden_size=48, n_layer=2, n_head=4, initializer_range=0.3)
    return transformers.BloomForCausalLM(transformers.BloomConfig(**{**config, **overrides}))


def _codegen(**overrides):
    import transformers

    config = dict(
        vocab_size=300,
        n_embd=64,
        n_layer=2,
        n_head=8,
        n_positions=128,
        rotary_dim=4,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.CodeGenForCausalLM(transformers.CodeGenConfig(**{**config, **overrides}))


def _glm(cls: str = "Glm", **overrides):
    import transformers

    config = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = getattr(transformers, f"{cls}Config")(**{**config, **overrides})
    return getattr(transformers, f"{cls}ForCausalLM")(config)


VARIANTS = {  # name: builder of a transformers model
    "bloom 4 heads": lambda: _bloom(),
    "bloom 6 heads (ALiBi slopes beyond a power of two)": lambda: _bloom(n_head=6),
    "codegen partial rotary": lambda: _codegen(),
    "codegen full rotary, own ffn width": lambda: _codegen(n_head=4, rotary_dim=16, n_inner=80),
    "glm gqa, q/k/v biases": lambda: _glm(),
    "glm4 post-norms, tied": lambda: _glm("Glm4", num_key_value_heads=4, tie_word_embeddings=True),
}


def randomised(model, seed: int = 0):
    """Norms and biases moved off their defaults (1 and 0), so that they matter."""
    torch.manual_seed(seed)
    model = model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = randomised(VARIANTS[request.param]())
    d = tmp_path_factory.mktemp("family")
    hf.save_pretrained(d)
    return hf, flexlab.Model.from_pretrained(d, dtype=torch.float32)


def test_reference_path_equals_transformers(pair):
    hf, model = pair
    expected = hf_greedy(hf, PROMPTS, NEW)
    assert len({t for row in expected for t in row}) > 4  # not a degenerate model
    assert model.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected
    for ours, theirs in zip(model.score(PROMPTS), hf_scores(hf, PROMPTS)):
        assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("name", list(GRID))
def test_engine_equals_transformers_under_offloading(pair, tmp_path, name):
    hf, model = pair
    expected = hf_greedy(hf, PROMPTS, NEW)
    with flexlab.Engine(model, GRID[name], offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected
        for ours, theirs in zip(engine.score(PROMPTS), hf_scores(hf, PROMPTS)):
            assert torch.allclose(ours, theirs, atol=1e-4)
        teacher = engine.score(PROMPTS, teacher_forced=True)  # every token through decode and the cache
        for ours, theirs in zip(teacher, hf_scores(hf, PROMPTS)):
            assert torch.allclose(ours, theirs, atol=1e-4)


def test_compressed_weights_compute_exactly_the_quantized_model(pair, tmp_path):
    from tests.integration.test_compression import FakeQuantized

    _, model = pair
    w4 = flexlab.QuantConfig(bits=4, group_size=16)
    quantized = flexlab.Model(model.config, FakeQuantized(model.weights, w4), dtype=torch.float32, device="cpu")
    expected = quantized.generate(PROMPTS, max_new_tokens=NEW).token_ids
    policy = Policy.from_percent([0, 30, 100, 0, 0, 0], gpu_batch_size=2, num_gpu_batches=2, compress_weight=w4)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected


def test_a_compressed_cache_gives_the_same_result_on_every_placement(pair, tmp_path):
    _, model = pair
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


def test_sparse_attention_keeping_everything_is_exact(pair, tmp_path):
    hf, model = pair
    policy = Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2, attn_sparsity=0.999)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:  # keeps ceil(0.999 L) = L rows
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == hf_greedy(hf, PROMPTS, NEW)


@pytest.mark.parametrize(
    "preset, cls",
    [("bloom-tiny", "BloomForCausalLM"), ("codegen-tiny", "CodeGenForCausalLM"), ("glm-tiny", "Glm4ForCausalLM")],
)
def test_random_preset_checkpoint_loads_in_transformers(tmp_path, preset, cls):
    import transformers

    from flexlab.cli import main

    assert main(["convert", preset, str(tmp_path / "rnd"), "--random", "--dtype", "float32", "--seed", "4"]) == 0
    ours = flexlab.Model.from_config(preset, seed=4, dtype=torch.float32)
    hf = getattr(transformers, cls).from_pretrained(tmp_path / "rnd", dtype=torch.float32)  # all loaded, none new
    seq = [1, 5, 6, 9, 40]
    (theirs,) = hf_scores(hf, [seq])
    assert torch.allclose(ours.score([seq])[0], theirs, atol=1e-5)


def test_bloom_checkpoints_without_the_transformer_prefix_load(tmp_path):
    """The original bigscience files name tensors ``h.0...``, not ``transformer.h.0...``."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    hf = randomised(_bloom())
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file(
        {k.removeprefix("transformer."): v for k, v in state.items()},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    model = flexlab.Model.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.generate(PROMPTS, max_new_tokens=NEW).token_ids == hf_greedy(hf, PROMPTS, NEW)


def test_alibi_slopes_follow_the_paper():
    from flexlab.models.bloom import alibi_slopes

    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]  # 2^(-8/n), its powers
    six = alibi_slopes(6).tolist()  # four of the 4-head sequence, then the odd ones of the 8-head one
    assert six == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


@pytest.mark.parametrize("model_type", ["chatglm", "glm130b"])
def test_remote_code_only_glm_is_refused_naming_the_native_classes(tmp_path, model_type):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "auto_map": {}}))
    with pytest.raises(flexlab.ConfigError, match="trust_remote_code.*GlmForCausalLM, Glm4ForCausalLM"):
        flexlab.Model.from_pretrained(tmp_path)
