"""On a CPU computing in bfloat16 the engine holds the matrices it keeps in memory in oneDNN's
packed layout (``flexlab.models.layers.packed``): in every family, resident or with some weights
on disk, the tokens are the reference path's and the log-probs those of the plain layout, bit for bit."""

from __future__ import annotations

import pytest
import torch

import flexlab
from flexlab import Policy
from flexlab.models.layers import packed, packs, project

pytestmark = pytest.mark.skipif(
    not packs(torch.device("cpu"), torch.bfloat16), reason="no native bfloat16 kernels on this CPU"
)

PRESETS = ["opt-tiny", "llama-tiny", "bloom-tiny", "codegen-tiny", "glm-tiny"]
PROMPTS = [[1, 5, 9, 33, 7], [1, 200, 3], [1, 44, 45, 46, 47, 48, 2]]


@pytest.mark.parametrize(
    "shape, bias", [((1, 64), True), ((3, 5, 64), False), ((7, 64), True)], ids=["a row", "3-D", "rows"]
)
def test_a_packed_matrix_gives_the_plain_product_bit_for_bit(shape, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16() if bias else None
    x = torch.randn(*shape, generator=g).bfloat16()
    ours = project(x, packed(w), b)
    assert ours.shape == (*shape[:-1], 96)
    assert torch.equal(ours, torch.nn.functional.linear(x, w, b))
    assert torch.equal(project(x.transpose(0, -2), packed(w), b), torch.nn.functional.linear(x.transpose(0, -2), w, b))


@pytest.mark.parametrize("percent", [[100, 0, 100, 0, 100, 0], [40, 30, 100, 0, 100, 0]], ids=["resident", "split"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_family_computes_the_same_on_packed_matrices(preset, percent, tmp_path):
    model = flexlab.Model.from_config(preset, seed=0, dtype=torch.bfloat16)
    expected = model.generate(PROMPTS, max_new_tokens=6, stop_token_ids=None).token_ids
    policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2)
    with flexlab.Engine(model, policy, pack_weights=False) as plain:
        scores = plain.score(PROMPTS)  # (the reference path's batches round some log-probs apart by 5e-7)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        held = {w.spec.name: w.tensors[0] for w in engine.weights.placed.values() if w.tensors}
        assert any(t.is_mkldnn for t in held.values())  # packing happened
        table = next(n for n in held if n.endswith(model.family.token_table))
        assert not held[table].is_mkldnn  # the embedding looks its rows up: kept plain
        assert all(t.is_mkldnn for n, t in held.items() if n.endswith("lm_head.weight"))  # an untied head's
        assert engine.generate(PROMPTS, max_new_tokens=6, stop_token_ids=None).token_ids == expected
        for ours, theirs in zip(engine.score(PROMPTS), scores):
            assert torch.equal(ours, theirs)


def test_pack_weights_false_keeps_the_plain_layout(tmp_path):
    model = flexlab.Model.from_config("llama-tiny", seed=0, dtype=torch.bfloat16)
    with flexlab.Engine(model, Policy(), pack_weights=False) as engine:
        assert not any(t.is_mkldnn for w in engine.weights.placed.values() for t in w.tensors)
