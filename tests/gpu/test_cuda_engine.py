"""The engine on CUDA: streams, pinned weights, CUDA-event timing; tokens equal transformers.

Skipped without a GPU (CI has none); run on a lent GPU machine and recorded in the README.
"""

from __future__ import annotations

import pytest
import torch

import flexlab
from flexlab import Policy
from tests.integration.test_engine import GRID, NEW, PROMPTS
from tests.integration.test_exactness import hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_model(tiny_dir):
    return flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32, device="cuda")


@pytest.mark.parametrize("name", list(GRID))
def test_every_policy_gives_transformers_tokens_on_cuda(name, cuda_model, tiny_hf, tmp_path):
    with flexlab.Engine(cuda_model, GRID[name], offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == hf_greedy(tiny_hf, PROMPTS, NEW)
    assert list(tmp_path.iterdir()) == []


def test_cpu_tier_weights_are_pinned_and_copies_overlap_compute():
    cfg = flexlab.get_preset("opt-tiny").replace(
        name="opt-mid", hidden_size=1024, num_heads=16, ffn_dim=4096, num_layers=8
    )
    model = flexlab.Model.from_config(cfg, seed=0, dtype=torch.float32, device="cuda")
    policy = Policy.from_percent([0, 100, 100, 0, 100, 0], gpu_batch_size=8, num_gpu_batches=4)
    with flexlab.Engine(model, policy) as engine:
        assert all(p.is_pinned() for w in engine.weights.placed.values() if w.tier == "cpu" for p in w.tensors)
        result = engine.generate([[2] + list(range(10, 200))] * 32, max_new_tokens=4, stop_token_ids=None)
    s = result.timeline.summary()
    assert s["bytes[load weight]"] > 0 and s["io_hidden_s"] > 0
    reference = model.generate([[2] + list(range(10, 200))] * 32, max_new_tokens=4, stop_token_ids=None)
    assert result.token_ids == reference.token_ids


def test_compressed_weights_on_cuda_compute_the_fake_quantized_model(cuda_model, tiny_dir, tmp_path):
    from tests.integration.test_compression import W4, FakeQuantized

    cpu = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
    quantized = flexlab.Model(cpu.config, FakeQuantized(cpu.weights, W4), dtype=torch.float32, device="cpu")
    expected = quantized.generate(PROMPTS, max_new_tokens=NEW).token_ids
    policy = Policy.from_percent([20, 30, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2, compress_weight=W4)
    with flexlab.Engine(cuda_model, policy, offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected


def test_compressed_cache_and_sparse_attention_on_cuda(cuda_model, tiny_dir, tiny_hf, tmp_path):
    cpu = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
    cache = flexlab.CacheQuantConfig(bits=4, group_size=16, kv_layout="per-channel", window=2)
    policy = Policy.from_percent([100, 0, 30, 30, 100, 0], gpu_batch_size=2, num_gpu_batches=2, compress_cache=cache)
    scores = {}
    for name, model in (("cpu", cpu), ("cuda", cuda_model)):
        with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
            scores[name] = engine.score(PROMPTS, teacher_forced=True)
    # the codes are computed from slightly different k/v on each device: close, not identical
    for a, b in zip(scores["cpu"], scores["cuda"]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)
    sparse = Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2, attn_sparsity=0.999)
    with flexlab.Engine(cuda_model, sparse, offload_dir=tmp_path) as engine:  # keeps every row: exact
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == hf_greedy(tiny_hf, PROMPTS, NEW)
    # ...and with the cpu tier's rows attending on the CPU beside gpu and disk rows
    sparse = Policy.from_percent(
        [100, 0, 25, 50, 100, 0], gpu_batch_size=4, num_gpu_batches=2, attn_sparsity=0.999, cpu_cache_compute=True
    )
    with flexlab.Engine(cuda_model, sparse, offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == hf_greedy(tiny_hf, PROMPTS, NEW)


@pytest.mark.parametrize("shares", [[0, 100, 100, 0, 100, 0], [0, 0, 100, 0, 100, 0]], ids=["cpu", "disk"])
def test_the_embedding_brings_only_its_rows_of_the_token_table_to_the_gpu(shares, cuda_model, tiny_hf, tmp_path):
    """A token table in host memory or on disk is not copied to the GPU whole each token: the
    embedding looks its rows up where the table lies and moves only those."""
    table_bytes = cuda_model.config.vocab_size * cuda_model.config.hidden_size * 4
    with flexlab.Engine(cuda_model, Policy.from_percent(shares, gpu_batch_size=2), offload_dir=tmp_path) as engine:
        assert 0 in engine.weights.looked_up
        result = engine.generate(PROMPTS, max_new_tokens=NEW)
    assert result.token_ids == hf_greedy(tiny_hf, PROMPTS, NEW)
    events = result.timeline.to_pandas()
    embed = events[events.stage == 0]
    assert (embed[embed.kind == "load_weight"].bytes < table_bytes).all()
    assert (embed[embed.kind == "read_rows"].bytes > 0).all() and len(embed[embed.kind == "read_rows"])
