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


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "prompts is empty"),
        ([[2, 3], []], "prompt 1 is empty"),
        ("a string", "wrap a single prompt in a list"),
        (["text"], "need a tokenizer"),
    ],
)
def test_bad_prompts(model, prompts, message):
    with pytest.raises(PromptError, match=message):
        model.generate(prompts, max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
        (dict(do_sample=True, temperature=0.0), "temperature must be a finite number > 0"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=0), "top_k must be >= 1"),
        (dict(stop_token_ids=[[2], [2], [2]]), "3 per-sequence lists for 1 prompts"),
        (dict(stop_strings=["x"]), "stop_strings need a tokenizer"),
    ],
)
def test_bad_generation_arguments(model, kwargs, message):
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises(PromptError, match=message):
        model.generate([[2, 3]], **kwargs)


def test_score_needs_two_tokens(model):
    with pytest.raises(PromptError, match="fewer than 2 tokens"):
        model.score([[2, 3, 4], [2]])


def test_score_takes_one_token_past_the_positions_and_no_more(model):
    n = model.config.max_positions
    fits = [2] + [5] * n  # the last token is only predicted: n + 1 tokens need n positions
    assert model.score([fits])[0].shape == (n,)
    with pytest.raises(PromptError, match=f"sequence\\(s\\) \\[0\\] have more than {n + 1} tokens.*in windows"):
        model.score([fits + [5]])


def test_temperature_nan_and_inf_are_refused(model):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(PromptError, match="temperature must be a finite number > 0"):
            model.generate([[2, 3]], max_new_tokens=2, do_sample=True, temperature=bad)


# ---- token ids: checked before any work, on every entry point ------------------------------------
BAD_IDS = [
    ([[2, 5], [2, 512]], r"prompt 1, position 1: token id 512 is outside the vocabulary \[0, 511\]"),
    ([[2, -1]], r"prompt 0, position 1: token id -1 is outside the vocabulary"),
    ([[2, 5.7]], r"prompt 0, position 1: token id 5.7 is not an integer"),
    ([[2, True]], r"prompt 0, position 1: token id True is not an integer"),
    ([[2, "5"]], r"prompt 0, position 1: token id '5' is not an integer"),
    ([torch.tensor([2.0, 5.0])], r"prompt 0 is a 1-d torch.float32 tensor"),
    ([torch.tensor([[2, 5]])], r"prompt 0 is a 2-d torch.int64 tensor"),
    ([5], r"prompt 0 is a int; pass a string or a list of token ids"),
]


@pytest.mark.parametrize("prompts, message", BAD_IDS)
def test_bad_token_ids_on_the_reference_path(model, prompts, message):
    with pytest.raises(PromptError, match=message):
        model.generate(prompts, max_new_tokens=2)


@pytest.mark.parametrize("prompts, message", BAD_IDS)
def test_bad_token_ids_on_the_engine_generate_and_score(model, prompts, message, tmp_path):
    policy = flexlab.Policy.from_percent([0, 0, 0, 0, 0, 0], gpu_batch_size=2)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        with pytest.raises(PromptError, match=message):
            engine.generate(prompts, max_new_tokens=2)
        with pytest.raises(PromptError, match=message):
            engine.score([p + [3] if isinstance(p, list) else p for p in prompts])
        assert engine.generate([[2, 5]], max_new_tokens=2).token_ids  # and it goes on


def test_integer_tensors_and_numpy_ints_are_token_ids(model):
    import numpy as np

    expected = model.generate([[2, 5, 6]], max_new_tokens=3).token_ids
    assert model.generate([torch.tensor([2, 5, 6])], max_new_tokens=3).token_ids == expected
    assert model.generate([list(np.array([2, 5, 6]))], max_new_tokens=3).token_ids == expected


# ---- checkpoints that would be silently wrong ---------------------------------------------------
def write_safetensors_checkpoint(hf, d, state=None, config_changes=None):
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    cfg = hf.config.to_dict()
    cfg.update(config_changes or {})
    (d / "config.json").write_text(json.dumps(cfg))
    state = state if state is not None else {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    return d


def test_float8_checkpoint_is_converted_correctly_also_read_in_place(tiny_hf, tmp_path):
    """An F8_E4M3 tensor is float8, not bytes: the engine reading it in place from disk and the
    reference path both give the tokens of transformers run on the same float8-rounded weights."""
    import copy

    from tests.integration.test_exactness import hf_greedy

    rounded = copy.deepcopy(tiny_hf)
    state = {}
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.to(torch.float8_e4m3fn).float())
    for name, t in rounded.state_dict().items():
        state[name] = t.to(torch.float8_e4m3fn) if t.dim() == 2 else t.contiguous()
    state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
    d = write_safetensors_checkpoint(tiny_hf, tmp_path / "f8", state)
    model = flexlab.Model.from_pretrained(d, dtype=torch.float32)
    prompts = [[2, 5, 6, 9], [2, 7]]
    expected = hf_greedy(rounded, prompts, 6)
    assert model.generate(prompts, max_new_tokens=6).token_ids == expected
    policy = flexlab.Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=2)  # every weight read from disk
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        assert all(w.tier == "disk" for w in engine.weights.placed.values())
        assert engine.generate(prompts, max_new_tokens=6).token_ids == expected


def test_integer_weights_are_refused(tiny_hf, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_hf.state_dict().items() if k != "lm_head.weight"}
    state["model.decoder.layers.0.fc1.weight"] = state["model.decoder.layers.0.fc1.weight"].to(torch.int8)
    d = write_safetensors_checkpoint(tiny_hf, tmp_path / "int", state)
    with pytest.raises(CheckpointError, match="layers.0.fc1.weight is stored as int8, not floats; .* dequantize"):
        flexlab.Model.from_pretrained(d)


def test_unknown_safetensors_dtype_is_refused(tiny_dir, tmp_path):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].replace(b'"F32"', b'"F4" ', 1)  # same length: the offsets stay right
    (d / "model.safetensors").write_bytes(raw[:8] + header + raw[8 + n :])
    with pytest.raises(CheckpointError, match="has dtype F4, which flexlab cannot read"):
        flexlab.Model.from_pretrained(d)


def test_more_layers_than_the_config_says_is_refused(tiny_hf, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_hf.state_dict().items() if k != "lm_head.weight"}
    d = write_safetensors_checkpoint(
        tiny_hf, tmp_path / "extra", state, {"num_hidden_layers": tiny_hf.config.num_hidden_layers - 1}
    )
    with pytest.raises(
        CheckpointError,
        match=r"weight\(s\) in the checkpoint that config.json does not describe, "
        r"e.g. decoder.layers.1",
    ):
        flexlab.Model.from_pretrained(d)


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_a_shard_index_may_not_leave_its_directory(tiny_dir, tmp_path, shard):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    copy_checkpoint(tiny_dir, tmp_path / "outside")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(CheckpointError, match="names shard\\(s\\) outside"):
        flexlab.Model.from_pretrained(d)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda cfg: cfg.pop("hidden_size"), "config.json lacks 'hidden_size', which a opt config needs"),
        (lambda cfg: cfg.update(num_hidden_layers=None), "ModelConfig.num_layers must be a positive int"),
        (lambda cfg: cfg.update(vocab_size="many"), "ModelConfig.vocab_size must be a positive int"),
        (lambda cfg: cfg.update(quantization_config={"quant_method": "fp8"}), "pre-quantized checkpoint .* 'fp8'"),
        (lambda cfg: cfg.update(model_type=["opt"]), "no model_type string"),
    ],
)
def test_malformed_config(tiny_dir, tmp_path, change, message):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((CheckpointError, ConfigError), match=message):
        flexlab.Model.from_pretrained(d)


def test_config_that_is_not_an_object(tiny_dir, tmp_path):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object"):
        flexlab.Model.from_pretrained(d)


@pytest.mark.parametrize(
    "header, message",
    [
        (b"[1, 2, 3]", "not a readable safetensors file .*not a JSON object"),
        (b'{"x": {"dtype": "F32"}}', "the header entry of x is malformed"),
        (b'{"x": {"dtype": "F32", "shape": "big", "data_offsets": [0, 4]}}', "the header entry of x is malformed"),
    ],
)
def test_malformed_safetensors_header(tiny_dir, tmp_path, header, message):
    d = copy_checkpoint(tiny_dir, tmp_path / "c")
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=message):
        flexlab.Model.from_pretrained(d)
