"""Top-k sparse attention (``attn_sparsity < 1``): the maths, exactness when everything is kept,
the same result on every placement, and fewer value bytes read."""

from __future__ import annotations

import pytest
import torch

import flexlab
from flexlab import CacheQuantConfig, Policy
from flexlab.models.attention import attend, attention_bias, sparse_attend, sparse_weights
from tests.integration.test_engine import PROMPTS
from tests.integration.test_exactness import hf_greedy

NEW = 6
PLACEMENTS = [[100, 0, 100, 0, 100, 0], [100, 0, 0, 100, 100, 0], [100, 0, 0, 0, 100, 0], [40, 30, 30, 30, 0, 100]]
SPLIT = [40, 30, 25, 50, 0, 100]  # of 4 sequences a batch: 1 on the gpu tier, 2 on the cpu tier, 1 on disk


@pytest.fixture(scope="module")
def model(tiny_dir):
    return flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")


def test_sparse_maths_keeps_the_top_weights_of_each_head():
    gen = torch.Generator().manual_seed(0)
    b, h, L, d = 3, 4, 9, 8
    q, k, v = (
        torch.randn(b, h, 1, d, generator=gen),
        torch.randn(b, h, L + 1, d, generator=gen),
        torch.randn(b, h, L + 1, d, generator=gen),
    )
    bias = attention_bias(torch.ones(b, L + 1, dtype=torch.bool), 1)
    dense = attend(q, k, v, bias)
    values = v[:, :, :-1].transpose(1, 2)  # [b, L, heads, d]: token-major, as the cache stores them
    kept, w_new = sparse_weights(q, k, bias, keep=1.0)
    torch.testing.assert_close(sparse_attend(kept, values, w_new, v[:, :, -1:]), dense)

    kept, w_new = sparse_weights(q, k, bias, keep=0.3)  # ceil(0.3 * 9) = 3 per head
    assert ((kept > 0).sum(-1) == 3).all()
    probs = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)[:, :, 0]
    top = probs[..., :-1].topk(3, dim=-1).indices
    manual = torch.zeros_like(probs)
    manual.scatter_(-1, top, probs.gather(-1, top))
    manual[..., -1] = probs[..., -1]  # the new token always counts; nothing is renormalised
    torch.testing.assert_close(sparse_attend(kept, values, w_new, v[:, :, -1:]), (manual[:, :, None] @ v))


def test_keeping_everything_through_the_sparse_path_is_exact(model, tiny_hf, tmp_path):
    expected = hf_greedy(tiny_hf, PROMPTS, NEW)
    for percent in PLACEMENTS:  # 0.999 keeps every cached token, but reads values row by row
        policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2, attn_sparsity=0.999)
        with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
            assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected
    # the cpu tier's rows attending where they are (cpu_cache_compute), beside gpu and disk rows
    policy = Policy.from_percent(SPLIT, gpu_batch_size=4, attn_sparsity=0.999, cpu_cache_compute=True)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS[:4], max_new_tokens=NEW).token_ids == hf_greedy(tiny_hf, PROMPTS[:4], NEW)


@pytest.mark.parametrize("cache", [None, CacheQuantConfig(bits=4, group_size=16, window=2)])
def test_sparse_results_are_the_same_on_every_placement(model, cache, tmp_path):
    dense = model.score(PROMPTS)
    results = []
    for percent in PLACEMENTS:
        policy = Policy.from_percent(
            percent, gpu_batch_size=2, num_gpu_batches=2, attn_sparsity=0.3, compress_cache=cache
        )
        with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
            results.append(
                (engine.generate(PROMPTS, max_new_tokens=NEW).token_ids, engine.score(PROMPTS, teacher_forced=True))
            )
    for tokens, scores in results[1:]:
        assert tokens == results[0][0]
        for a, b in zip(scores, results[0][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(results[0][1], dense)) > 1e-3  # sparsity acts


@pytest.mark.parametrize("cache", [None, CacheQuantConfig(bits=4, group_size=16, window=2)])
def test_sparse_attention_of_host_rows_on_the_cpu_equals_it_on_the_device(model, cache, tmp_path, monkeypatch):
    """``cpu_cache_compute`` with ``attn_sparsity < 1``: the cpu tier's sequences attend beside
    their cache, the others on the device, and the results are those of one sparse attention."""
    from flexlab.engine.cache import CacheStore

    spans, original = [], CacheStore.load

    def spy(self, *args, **kwargs):
        loaded, moved = original(self, *args, **kwargs)
        spans.append(loaded.host_span)
        return loaded, moved

    monkeypatch.setattr(CacheStore, "load", spy)
    results = []
    for on_cpu in (False, True):
        policy = Policy.from_percent(
            SPLIT,
            gpu_batch_size=4,
            num_gpu_batches=2,
            attn_sparsity=0.3,
            compress_cache=cache,
            cpu_cache_compute=on_cpu,
        )
        with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
            results.append(
                (engine.generate(PROMPTS, max_new_tokens=NEW).token_ids, engine.score(PROMPTS, teacher_forced=True))
            )
    # the second run's loads left the cpu rows on the host: batch 0 holds 2 gpu + 2 cpu, batch 1 1 cpu + 2 disk
    assert None in spans and {(2, 2), (0, 1)} <= set(spans)
    assert results[1][0] == results[0][0]
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_only_kept_value_rows_are_read(model, tmp_path):
    moved = {}
    for sparsity in (1.0, 0.25):
        policy = Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=4, attn_sparsity=sparsity)
        with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
            result = engine.generate([[2] + list(range(10, 60))] * 4, max_new_tokens=NEW, stop_token_ids=None)
        df = result.timeline.to_pandas()
        moved[sparsity] = (df[df.kind == "load_cache"].bytes.sum(), df[df.kind == "gather_values"].bytes.sum())
    dense_cache, _ = moved[1.0]
    keys_only, values = moved[0.25]
    assert keys_only == dense_cache / 2  # the prefetch reads keys only
    assert 0 < values < 0.75 * dense_cache / 2  # ...and a fraction of the value rows (union over 4 heads)


@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny", "bloom-tiny"])
def test_the_cost_model_prices_the_value_rows_heads_keep_as_chosen_independently(name):
    """The value rows gathered (data-dependent) against the model's expectation: heads choosing
    independently, close for a random OPT or LLaMA; an upper bound where heads agree (ALiBi's
    heads all favour recent tokens)."""
    from flexlab.cost import CostModel
    from tests.integration.test_cost_model import CPU_ONLY

    model = flexlab.Model.from_config(name, seed=0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 200, (4, 40), generator=gen)
    prompts[:, 0] = 2
    policy = Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2, attn_sparsity=0.25)
    with flexlab.Engine(model, policy) as engine:
        df = engine.generate(prompts.tolist(), max_new_tokens=8, stop_token_ids=None).timeline.to_pandas()
    measured = df[df.kind == "gather_values"].bytes.sum()
    pred = CostModel(model.config, policy, CPU_ONLY, prompt_len=40, gen_len=8, itemsize=4, num_prompts=4).predict()
    predicted = pred.bytes_per_kind["gather_values"]
    dense = CostModel(
        model.config, policy.replace(attn_sparsity=1.0), CPU_ONLY, prompt_len=40, gen_len=8, itemsize=4, num_prompts=4
    ).predict()
    assert 0 < predicted < dense.bytes_per_kind["load_cache"] / 2  # fewer than every value row
    if name == "bloom-tiny":
        assert measured <= predicted / 2
    else:
        assert 0.95 * measured <= predicted <= 1.1 * measured


def test_sparse_attentions_own_work_is_charged_where_it_was_measured():
    """With ``sparse_call_s``/``sparse_value_bw`` (calibrate measures them) each batch and layer
    of a decode step costs the fixed part and the kept rows at the rate, on top of the dense
    step's price; profiles without them charge the gather alone."""
    from flexlab.cost import CostModel
    from tests.integration.test_cost_model import CPU_ONLY

    config = flexlab.get_preset("opt-125m")
    policy = Policy.from_percent([100, 0, 100, 0, 100, 0], gpu_batch_size=8, num_gpu_batches=2, attn_sparsity=0.25)

    def decode_compute(hw, p) -> float:
        pred = CostModel(config, p, hw, prompt_len=64, gen_len=8, itemsize=2, num_prompts=16).predict()
        return sum(r["compute_s"] for r in pred.stages)

    measured = CPU_ONLY.replace(sparse_call_s=1e-3, sparse_value_bw=4e9)
    dense = decode_compute(measured, policy.replace(attn_sparsity=1.0))
    calls = config.num_layers * 2 * 7  # layers x batches x decode tokens
    extra = decode_compute(measured, policy) - dense
    assert (
        calls * 1e-3 < extra < calls * 1e-3 + calls * 8 * 72 * 768 * 2 / 4e9
    )  # the fixed cost, plus at most every row
    assert decode_compute(CPU_ONLY, policy) - dense < 0.1 * extra  # not measured: the gather alone (at memory speed)


def test_search_prices_every_candidate_with_the_sparsity_asked_and_prints_its_flag(capsys, tmp_path):
    import json
    import re

    from flexlab.cli import main
    from flexlab.cli_args import policy_from_flags

    argv = ["search", "--preset", "opt-1.3b", "--hardware", "colab-t4", "--prompt-len", "256", "--gen-len", "8"]
    assert main([*argv, "--attn-sparsity", "0.2", "--save-policy", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    policy = Policy.from_dict(json.loads((tmp_path / "p.json").read_text()))
    assert policy.attn_sparsity == 0.2 and "attention sparsity 0.2" in out
    assert policy_from_flags(re.search(r"^flags: (.*)$", out, re.M).group(1)) == policy
    assert main([*argv, "--attn-sparsity", "0"]) == 2
    assert "--attn-sparsity must be in (0, 1]" in capsys.readouterr().err
