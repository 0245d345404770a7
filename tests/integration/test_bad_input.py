"""Bad input fails early with an error that says what is wrong and how to fix it."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import flexlab
from flexlab.errors import CheckpointError, ConfigError, PromptError
from tests.conftest import write_bin_checkpoint


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown model preset 'opt-7b'.*opt-125m.*opt-175b"):
        flexlab.Model.from_config("opt-7b")


def test_missing_directory():
    with pytest.raises(CheckpointError, match="does not exist"):
        flexlab.Model.from_pretrained("./no/such/dir")


def test_missing_config(tiny_dir, tmp_path):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        flexlab.Model.from_pretrained(d)


def test_missing_weights_file(tiny_dir, tmp_path):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights: expected one of"):
        flexlab.Model.from_pretrained(d)


def test_missing_shard(tiny_hf, tmp_path):
    d = tmp_path / "sharded"
    tiny_hf.save_pretrained(d, max_shard_size="100KB")
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {victim.name}"):
        flexlab.Model.from_pretrained(d)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    before = listing(d)
    with pytest.raises(CheckpointError, match="truncated"):
        flexlab.Model.from_pretrained(d)
    assert listing(d) == before  # nothing written or left behind


def test_truncated_header(tiny_dir, tmp_path):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    os.truncate(d / "model.safetensors", 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        flexlab.Model.from_pretrained(d)


def test_truncated_bin(tiny_hf, tmp_path):
    d = tmp_path / "bin"
    write_bin_checkpoint(tiny_hf, d)
    f = d / "pytorch_model.bin"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        flexlab.Model.from_pretrained(d)


def test_weight_missing_from_checkpoint(tiny_hf, tmp_path):
    d = tmp_path / "bin"
    write_bin_checkpoint(tiny_hf, d)
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    del state["model.decoder.layers.1.fc2.weight"]
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing from the checkpoint.*layers.1.fc2.weight"):
        flexlab.Model.from_pretrained(d)


def test_config_that_does_not_match_weights(tiny_dir, tmp_path):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["ffn_dim"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json implies"):
        flexlab.Model.from_pretrained(d)


def test_pickle_payload_is_refused(tmp_path, tiny_dir):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    (d / "model.safetensors").unlink()
    torch.save({"weights": object()}, d / "pytorch_model.bin")  # not just tensors
    with pytest.raises(CheckpointError, match="will not unpickle"):
        flexlab.Model.from_pretrained(d)


def test_unsupported_model_type(tiny_dir, tmp_path):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model type 'gpt2'; supported: opt"):
        flexlab.Model.from_pretrained(d)


def test_offline_hub_id_says_how_to_use_a_local_directory(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="hf download facebook/opt-125m --local-dir DIR"):
        flexlab.Model.from_pretrained("facebook/opt-125m")


@pytest.fixture(scope="module")
def model():
    return flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)


def test_prompt_longer_than_max_positions(model):
    too_long = [[2] * (model.config.max_positions - 3)]
    with pytest.raises(PromptError, match="prompt 0 has 253 tokens.*exceeds the model's 256 positions"):
        model.generate(too_long, max_new_tokens=4)


@pytest.mark.parametrize("prompts, message", [
    ([], "prompts is empty"),
    ([[2, 3], []], "prompt 1 is empty"),
    ("a string", "wrap a single prompt in a list"),
    (["text"], "need a tokenizer"),
])
def test_bad_prompts(model, prompts, message):
    with pytest.raises(PromptError, match=message):
        model.generate(prompts, max_new_tokens=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_k=0), "top_k must be >= 1"),
    (dict(stop_token_ids=[[2], [2], [2]]), "3 per-sequence lists for 1 prompts"),
    (dict(stop_strings=["x"]), "stop_strings need a tokenizer"),
])
def test_bad_generation_arguments(model, kwargs, message):
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises(PromptError, match=message):
        model.generate([[2, 3]], **kwargs)


def test_score_needs_two_tokens(model):
    with pytest.raises(PromptError, match="fewer than 2 tokens"):
        model.score([[2, 3, 4], [2]])
