import pytest
import torch

import flexlab
from flexlab.models.attention import attention_bias
from flexlab.models.generation import Sampler, SamplingConfig, StopCriteria, left_pad, positions_from_mask


def test_left_pad_and_positions():
    tokens, valid = left_pad([[5, 6, 7], [8]], pad_id=1)
    assert tokens.tolist() == [[5, 6, 7], [1, 1, 8]]
    assert positions_from_mask(valid).tolist() == [[0, 1, 2], [-1, -1, 0]]


def test_attention_bias_is_causal_and_hides_padding():
    valid = torch.tensor([[True, True, True], [False, True, True]])
    allowed = attention_bias(valid, q_len=3) == 0  # [b, 1, q, kv]
    assert allowed[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert allowed[1, 0].tolist() == [[False, False, False], [False, True, False], [False, True, True]]
    decode = attention_bias(valid, q_len=1) == 0
    assert decode[1, 0].tolist() == [[False, True, True]]


def logits_batch():
    return torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2000))


def test_greedy_takes_the_argmax():
    assert Sampler(SamplingConfig(), "cpu")(logits_batch()[:3]).tolist() == [0, 0, 0]


def test_top_k_restricts_support_and_sampling_is_seeded():
    a = Sampler(SamplingConfig(do_sample=True, top_k=2, seed=7), "cpu")(logits_batch())
    b = Sampler(SamplingConfig(do_sample=True, top_k=2, seed=7), "cpu")(logits_batch())
    assert torch.equal(a, b)
    assert set(a.tolist()) == {0, 1}
    share0 = (a == 0).float().mean().item()
    assert abs(share0 - 0.5 / 0.8) < 0.05  # renormalised over the two kept tokens


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    out = Sampler(SamplingConfig(do_sample=True, top_p=0.7, seed=0), "cpu")(logits_batch())
    assert set(out.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    out = Sampler(SamplingConfig(do_sample=True, top_p=0.01, seed=0), "cpu")(logits_batch())
    assert set(out.tolist()) == {0}


def test_low_temperature_approaches_greedy_and_high_spreads():
    cold = Sampler(SamplingConfig(do_sample=True, temperature=0.05, seed=0), "cpu")(logits_batch())
    hot = Sampler(SamplingConfig(do_sample=True, temperature=5.0, seed=0), "cpu")(logits_batch())
    assert (cold == 0).float().mean() > 0.99
    assert (hot == 3).float().mean() > 0.15


def test_stop_token_ids_per_sequence():
    stop = StopCriteria(2, [[7], [9]], None, None)
    assert stop.update([[7], [7]]) == [True, False]
    assert stop.update([[7], [7, 9]]) == [True, True]


@pytest.fixture(scope="module")
def model():
    return flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)


def test_generation_stops_early_per_sequence(model):
    prompts = [[2, 40, 41, 42], [2, 50]]
    free = model.generate(prompts, max_new_tokens=10, stop_token_ids=None).token_ids
    stop_id = free[0][3]
    out = model.generate(prompts, max_new_tokens=10, stop_token_ids=[[stop_id], []]).token_ids
    assert out[0] == free[0][: free[0].index(stop_id) + 1]
    assert out[1] == free[1]


def test_sampling_stops_early_and_is_reproducible(model):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, seed=11)
    free = model.generate([[2, 40, 41]], stop_token_ids=None, **kw).token_ids[0]
    again = model.generate([[2, 40, 41]], stop_token_ids=None, **kw).token_ids[0]
    assert free == again
    stop_id = free[5]
    cut = model.generate([[2, 40, 41]], stop_token_ids=[stop_id], **kw).token_ids[0]
    assert cut == free[: free.index(stop_id) + 1]


def test_top_k_one_sampling_equals_greedy(model):
    greedy = model.generate([[2, 9, 8, 7]], max_new_tokens=8, stop_token_ids=None).token_ids
    sampled = model.generate(
        [[2, 9, 8, 7]], max_new_tokens=8, stop_token_ids=None, do_sample=True, top_k=1, seed=3
    ).token_ids
    assert greedy == sampled


def test_metrics_count_tokens(model):
    r = model.generate([[2, 3], [2, 4, 5]], max_new_tokens=5, stop_token_ids=None)
    assert r.metrics["new_tokens"] == 10
    assert r.metrics["throughput_tok_s"] == pytest.approx(10 / (r.metrics["prefill_s"] + r.metrics["decode_s"]))


@pytest.mark.parametrize("heads, kv_heads, per_head_bias", [(4, 4, False), (4, 2, False), (6, 3, True)])
def test_attention_in_chunks_of_queries_equals_all_at_once(heads, kv_heads, per_head_bias):
    """A long prefill's scores are computed a chunk of queries at a time (memory); the result
    must not change, with grouped-query heads and with per-head biases (ALiBi) alike."""
    from flexlab.models.attention import attend

    g = torch.Generator().manual_seed(0)
    b, n, d = 2, 37, 8
    q = torch.randn(b, heads, n, d, generator=g)
    k, v = (torch.randn(b, kv_heads, n, d, generator=g) for _ in range(2))
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, :5] = False  # left padding
    bias = attention_bias(valid, n)
    if per_head_bias:
        bias = bias + torch.randn(b, heads, 1, n, generator=g)
    whole = attend(q, k, v, bias)
    chunked = attend(q, k, v, bias, score_bytes=4 * b * heads * n * 5)  # 5 queries at a time, 8 chunks
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_with_grouped_heads_attends_the_cache_as_stored(dtype):
    """A decode step's query heads are grouped onto their key/value head (no copy of the cache
    per group): the result equals attention over keys and values expanded to every head."""
    from flexlab.models.attention import _attend_rows, attend, expand_kv

    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, n, d = 3, 8, 2, 29, 16
    q = torch.randn(b, heads, 1, d, generator=g).to(dtype)
    k, v = (torch.randn(b, kv_heads, n, d, generator=g).to(dtype) for _ in range(2))
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :4] = False
    bias = attention_bias(valid, 1)
    expanded = _attend_rows(q, expand_kv(k, heads), expand_kv(v, heads), bias)
    grouped = attend(q, k, v, bias)
    assert grouped.shape == (b, heads, 1, d)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(grouped.float(), expanded.float(), atol=tol, rtol=tol)
    assert not torch.allclose(grouped[:, :4].float(), grouped[:, 4:].float())  # each group its own head
