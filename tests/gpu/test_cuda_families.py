"""Every family beyond OPT on CUDA: the LLaMA family's eight tiny variants and BLOOM, CodeGen and
GLM's six, under the offloading grid their CPU tests use; greedy tokens equal transformers' (float32,
on the CPU), log-probs within float32 rounding of a GPU's kernels.

Skipped without a GPU (CI has none). Written without one: run it first on a lent GPU machine
(``pytest tests/gpu``) and record the result in the README.
"""

from __future__ import annotations

import pytest
import torch

import flexlab
from tests.integration import test_families, test_llama
from tests.integration.test_exactness import hf_greedy
from tests.integration.test_llama import GRID, NEW, PROMPTS, hf_scores

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BUILDERS = {
    **{
        name: (lambda kind=kind, o=o: test_llama.hf_model(kind, dict(o)))
        for name, (kind, o) in test_llama.VARIANTS.items()
    },
    **{name: (lambda build=build: test_families.randomised(build())) for name, build in test_families.VARIANTS.items()},
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = BUILDERS[request.param]()
    d = tmp_path_factory.mktemp("cuda-family")
    hf.save_pretrained(d)
    return hf, flexlab.Model.from_pretrained(d, dtype=torch.float32, device="cuda")


@pytest.mark.parametrize("name", list(GRID))
def test_every_family_gives_transformers_tokens_on_cuda(pair, tmp_path, name):
    hf, model = pair
    with flexlab.Engine(model, GRID[name], offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == hf_greedy(hf, PROMPTS, NEW)
        for ours, theirs in zip(engine.score(PROMPTS), hf_scores(hf, PROMPTS)):
            assert torch.allclose(ours.cpu(), theirs, atol=1e-3)
    assert list(tmp_path.iterdir()) == []


def test_every_family_on_the_reference_path_on_cuda(pair):
    hf, model = pair
    assert model.generate(PROMPTS, max_new_tokens=NEW).token_ids == hf_greedy(hf, PROMPTS, NEW)
