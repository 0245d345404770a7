"""The reference path equals transformers' OPTForCausalLM in float32 on CPU: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

import flexlab
from tests.conftest import write_bin_checkpoint

PROMPTS = [[2, 31, 7, 99, 100, 4], [2, 11], [2, 200, 201, 202, 203, 204, 205, 206, 207]]  # ragged: left padding
ATOL = 1e-4


def hf_logits(hf, ids: list[list[int]]) -> list[torch.Tensor]:
    """transformers' logits per sequence, run one sequence at a time (no padding involved)."""
    with torch.no_grad():
        return [hf(torch.tensor([s])).logits[0] for s in ids]


def hf_greedy(hf, ids: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy continuation of a left-padded batch, eos stopping as flexlab's default."""
    width = max(map(len, ids))
    tokens = torch.tensor([[1] * (width - len(s)) + s for s in ids])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
    with torch.no_grad():
        out = hf.generate(
            input_ids=tokens, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=1, eos_token_id=2
        )[:, width:].tolist()
    result = []
    for row in out:  # drop the padding transformers appends after an eos
        cut = row.index(2) + 1 if 2 in row else len(row)
        result.append(row[:cut])
    return result


def flexlab_logits(model, ids):
    """Logits of a left-padded batch through the reference forward, unpadded per sequence."""
    from flexlab.models.generation import left_pad

    tokens, valid = left_pad(ids, model.config.pad_token_id, model.device)
    logits = model.reference.forward(tokens, valid).cpu()
    return [logits[i, tokens.shape[1] - len(s) :] for i, s in enumerate(ids)]


@pytest.mark.parametrize("which", ["pre_ln", "post_ln"])
def test_logits_and_greedy_match_transformers(which, tiny_hf, tiny_postln_hf, tiny_dir, tiny_postln_dir):
    hf, directory = (tiny_hf, tiny_dir) if which == "pre_ln" else (tiny_postln_hf, tiny_postln_dir)
    model = flexlab.Model.from_pretrained(directory, dtype=torch.float32, device="cpu")
    for ours, theirs in zip(flexlab_logits(model, PROMPTS), hf_logits(hf, PROMPTS)):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    expected = hf_greedy(hf, PROMPTS, 12)
    assert len({t for row in expected for t in row}) > 8, "degenerate fixture: greedy repeats one token"
    assert model.generate(PROMPTS, max_new_tokens=12).token_ids == expected


def test_post_ln_model_really_projects(tiny_postln_dir):
    """The opt-350m shape is exercised: project_in/out exist and there is no final LayerNorm."""
    model = flexlab.Model.from_pretrained(tiny_postln_dir, dtype=torch.float32)
    assert "project_in.weight" in model.reference.embed_w
    assert "project_out.weight" in model.reference.head_w
    assert "final_layer_norm.weight" not in model.reference.head_w


def test_score_matches_transformers_log_probs(tiny_hf, tiny_dir):
    model = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32)
    for lp, logits, seq in zip(model.score(PROMPTS), hf_logits(tiny_hf, PROMPTS), PROMPTS):
        expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(lp, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["safetensors_sharded", "bin", "bin_sharded"])
def test_checkpoint_formats_load_identically(layout, tiny_hf, tmp_path):
    directory = tmp_path / layout
    if layout == "safetensors_sharded":
        tiny_hf.save_pretrained(directory, max_shard_size="100KB")
        assert len(list(directory.glob("*.safetensors"))) > 1
    else:
        write_bin_checkpoint(tiny_hf, directory, shards=1 if layout == "bin" else 3)
    model = flexlab.Model.from_pretrained(directory, dtype=torch.float32)
    for ours, theirs in zip(flexlab_logits(model, PROMPTS), hf_logits(tiny_hf, PROMPTS)):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert model.generate(PROMPTS, max_new_tokens=8).token_ids == hf_greedy(tiny_hf, PROMPTS, 8)


def test_decode_with_cache_equals_full_recompute(tiny_dir):
    """Each decode step's logits equal a fresh forward over the whole sequence (the KV cache is right)."""
    model = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32)
    out = model.generate(PROMPTS, max_new_tokens=6, stop_token_ids=None).token_ids
    full = [p + o for p, o in zip(PROMPTS, out)]
    for seq, logits in zip(full, flexlab_logits(model, full)):
        assert logits[len(seq) - 7 : -1].argmax(-1).tolist() == seq[len(seq) - 6 :]
