"""The reference path on CUDA: float32 equals transformers on the CPU; float16 stays close.

Skipped without a GPU (CI has none); run on a lent GPU machine and recorded in the README.
"""

from __future__ import annotations

import pytest
import torch

import flexlab
from tests.integration.test_exactness import PROMPTS, flexlab_logits, hf_greedy, hf_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("which", ["pre_ln", "post_ln"])
def test_float32_on_cuda_matches_transformers_on_cpu(which, tiny_hf, tiny_postln_hf, tiny_dir, tiny_postln_dir):
    hf, directory = (tiny_hf, tiny_dir) if which == "pre_ln" else (tiny_postln_hf, tiny_postln_dir)
    model = flexlab.Model.from_pretrained(directory, dtype=torch.float32, device="cuda")
    for ours, theirs in zip(flexlab_logits(model, PROMPTS), hf_logits(hf, PROMPTS)):
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    assert model.generate(PROMPTS, max_new_tokens=12).token_ids == hf_greedy(hf, PROMPTS, 12)


def test_float16_on_cuda_is_close_to_float32(tiny_dir):
    fp16 = flexlab.Model.from_pretrained(tiny_dir, device="cuda")
    assert fp16.dtype == torch.float16
    fp32 = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
    for a, b in zip(flexlab_logits(fp16, PROMPTS), flexlab_logits(fp32, PROMPTS)):
        scale = b.abs().max()
        assert (a.float() - b).abs().max() < 2e-2 * scale
        agree = (a.float().argmax(-1) == b.argmax(-1)).float().mean()
        assert agree >= 0.9


def test_sampling_on_cuda_is_seeded(tiny_dir):
    model = flexlab.Model.from_pretrained(tiny_dir, device="cuda")
    kw = dict(max_new_tokens=10, do_sample=True, top_p=0.9, seed=5, stop_token_ids=None)
    assert model.generate(PROMPTS, **kw).token_ids == model.generate(PROMPTS, **kw).token_ids
