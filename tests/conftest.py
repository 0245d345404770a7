"""Shared fixtures: tiny random OPT checkpoints written by transformers itself, in temp dirs, and
the session's one calibration of this machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexlab.models.config import ModelConfig, get_preset
from flexlab.models.opt import config_to_hf


def hf_opt(cfg: ModelConfig, seed: int = 0):
    """A transformers OPTForCausalLM with ``cfg``'s shape and random (non-trivial) weights."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    # init_std 0.3 (not OPT's 0.02): a tiny model then generates varied tokens, not one repeated
    # token, so greedy comparisons exercise many decode steps.
    model = OPTForCausalLM(OPTConfig(**config_to_hf(cfg), init_std=0.3)).eval()
    with torch.no_grad():  # default init zeroes biases and sets norms to 1; randomise so they matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_bin_checkpoint(model, directory: Path, shards: int = 1) -> None:
    """Save as pytorch_model.bin (transformers 5 no longer writes .bin itself)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf_from(model)))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in part}, directory / fname)
        weight_map.update({k: fname for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def config_to_hf_from(model) -> dict:
    d = model.config.to_dict()
    d["model_type"] = "opt"
    return d


@pytest.fixture(scope="session")
def tiny_hf():
    return hf_opt(get_preset("opt-tiny"), seed=1)


@pytest.fixture(scope="session")
def tiny_postln_hf():
    return hf_opt(get_preset("opt-tiny-postln"), seed=2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_hf) -> Path:
    d = tmp_path_factory.mktemp("opt-tiny")
    tiny_hf.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_postln_dir(tmp_path_factory, tiny_postln_hf) -> Path:
    d = tmp_path_factory.mktemp("opt-tiny-postln")
    tiny_postln_hf.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def quick_profile(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``flexlab calibrate --quick`` run once for the session (~14 s on two cores): the profile it
    wrote and the finished command. Its own test checks both; the experiments read the profile
    instead of calibrating again."""
    d = tmp_path_factory.mktemp("calibrated")
    (d / "probes").mkdir()
    args = ["calibrate", "--quick", "--out", str(d / "hw.json"), "--offload-dir", str(d / "probes")]
    done = subprocess.run([sys.executable, "-m", "flexlab", *args], capture_output=True, text=True, timeout=300)
    return d / "hw.json", done
