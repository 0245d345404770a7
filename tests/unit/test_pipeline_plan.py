"""Pipeline plans (layer splits, checks) and their cost-model prediction, without processes."""

from __future__ import annotations

import math
import re

import pytest

from flexlab import Policy
from flexlab.cost import CostModel, get_hardware, predict_pipeline
from flexlab.engine.pipeline import PipelineError, make_plan, split_layers
from flexlab.models.config import get_preset


@pytest.mark.parametrize("preset, n", [("opt-1.3b", 2), ("opt-1.3b", 4), ("llama-3.1-8b", 3), ("opt-tiny", 2)])
def test_a_split_covers_every_layer_once_in_order_and_is_as_even_as_can_be(preset, n):
    cfg = get_preset(preset)
    ranges = split_layers(cfg, n)
    assert [i for r in ranges for i in r] == list(range(cfg.num_layers)) and all(len(r) for r in ranges)
    # moving one layer across any boundary cannot lower the largest share
    from flexlab.engine.pipeline import _shares

    best = max(_shares(cfg, [len(r) for r in ranges]))
    for b in range(n - 1):
        for d in (-1, 1):
            counts = [len(r) for r in ranges]
            counts[b] += d
            counts[b + 1] -= d
            if min(counts) >= 1:
                assert max(_shares(cfg, counts)) >= best


def test_plan_checks_name_the_fix():
    cfg = get_preset("opt-tiny")
    with pytest.raises(PipelineError, match="at most 2 stages"):
        make_plan(cfg, 3)
    with pytest.raises(PipelineError, match="groups must be from 1 to num_gpu_batches"):
        make_plan(cfg, 2, Policy(num_gpu_batches=2), groups=3)
    assert make_plan(cfg, 2, Policy(num_gpu_batches=4)).groups == 2  # one group per stage by default
    assert make_plan(cfg, 2, Policy(num_gpu_batches=1)).groups == 1


def test_one_stage_is_predicted_as_the_cost_model_predicts_one_process():
    cfg, hw = get_preset("opt-1.3b"), get_hardware("colab-t4")
    policy = Policy.from_percent([30, 70, 100, 0, 100, 0], gpu_batch_size=8, num_gpu_batches=2)
    one = CostModel(cfg, policy, hw, prompt_len=64, gen_len=8).predict()
    piped = predict_pipeline(cfg, make_plan(cfg, 1, policy, groups=1), hw, prompt_len=64, gen_len=8)
    assert piped.throughput_tok_s == pytest.approx(one.throughput_tok_s, rel=1e-9)


def test_ranks_hold_the_models_bytes_between_them():
    """Each rank's cost model counts its own layers' weights and cache: together the whole
    model's, plus the tied token table, held by the first rank and the last."""
    cfg, hw = get_preset("opt-1.3b"), get_hardware("colab-t4")
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2)
    whole = CostModel(cfg, policy, hw, prompt_len=32, gen_len=4)
    parts = [CostModel(cfg, policy, hw, prompt_len=32, gen_len=4, layers=r) for r in split_layers(cfg, 3)]
    table = cfg.vocab_size * cfg.hidden_size * 2
    assert sum(p.weight_bytes["gpu"] for p in parts) == whole.weight_bytes["gpu"] + table
    cache = [m.peak_bytes()["gpu"] - m.weight_bytes["gpu"] for m in (whole, *parts)]
    assert sum(cache[1:]) == pytest.approx(cache[0], rel=0.02)  # the cache is per layer (read buffers aside)


def test_groups_keep_compute_bound_ranks_busy_and_taking_turns_leaves_n_minus_1_of_n_idle():
    cfg, hw = get_preset("opt-6.7b"), get_hardware("h100")
    policy = Policy(gpu_batch_size=16, num_gpu_batches=4)
    kw = dict(prompt_len=256, gen_len=32)
    turns = predict_pipeline(cfg, make_plan(cfg, 4, policy, groups=1), hw, **kw)
    busy = predict_pipeline(cfg, make_plan(cfg, 4, policy, groups=4), hw, **kw)
    assert turns.bubble == pytest.approx(0.75, abs=0.05)
    assert busy.throughput_tok_s > 2 * turns.throughput_tok_s and busy.bubble < turns.bubble
    assert [len(r["layers"]) for r in busy.ranks] == [len(r) for r in split_layers(cfg, 4)]


def test_the_pipeline_search_holds_on_gpus_what_one_gpu_offloads():
    """FlexGen's super-linear scaling: a model one GPU must offload fits two GPUs' memory, so
    two stages are predicted more than twice as fast, and every stage's pick fits its machine."""
    from flexlab.cost import fits, get_hardware, search_pipeline, search_policy

    cfg = get_preset("opt-6.7b")  # 13.4 GB of weights
    hw = get_hardware("colab-t4").replace(gpu_memory=9 * 2**30)
    grid = dict(prompt_len=256, gen_len=16, batch_sizes=(8,), num_batches=(2,))
    one = search_policy(cfg, hw, **grid)
    two = search_pipeline(cfg, hw, 2, **grid)
    assert one.policy.w_gpu_percent < 100 and all(p.w_gpu_percent == 100 for p in two.plan.policies)
    assert two.prediction.throughput_tok_s > 2 * one.prediction.throughput_tok_s
    assert all(fits(r["footprint"], hw) for r in two.prediction.ranks)
    # each number of groups tried for the one block shape (on the split balanced by weight); the best kept
    balanced = [len(r) for r in split_layers(cfg, 2)]
    assert [t["groups"] for t in two.tried if t["layers"] == balanced] == [1, 2] and two.plan.groups in (1, 2)
    assert max(t["throughput_tok_s"] for t in two.tried) == two.prediction.throughput_tok_s


def test_the_pipeline_search_moves_layers_off_the_busiest_stage():
    """Split by weight, the last stage of a resident OPT is the busiest (its head is a matmul over
    the vocabulary; the first stage's copy of the table is only looked up): the search moves layers
    to the first stage while the prediction improves, and beats the split it started from."""
    from flexlab.cost import get_hardware, search_pipeline

    cfg = get_preset("opt-1.3b")
    grid = dict(prompt_len=64, gen_len=16, batch_sizes=(8,), num_batches=(2,), groups=2)
    hw = get_hardware("colab-t4")
    balanced = [len(r) for r in split_layers(cfg, 2)]
    given = search_pipeline(cfg, hw, 2, layers=balanced, **grid)
    found = search_pipeline(cfg, hw, 2, **grid)
    counts = [len(r) for r in found.plan.layers]
    assert counts[0] > balanced[0] and sum(counts) == cfg.num_layers
    assert found.prediction.throughput_tok_s > given.prediction.throughput_tok_s
    assert {tuple(t["layers"]) for t in given.tried} == {tuple(balanced)}  # a given split is kept as given
    busy = [r["decode_group_token_s"] for r in found.prediction.ranks]
    assert max(busy) / min(busy) < max(r["decode_group_token_s"] for r in given.prediction.ranks) / min(
        r["decode_group_token_s"] for r in given.prediction.ranks
    )


def test_ranks_sharing_one_disk_read_at_its_share_of_the_bandwidth():
    """Weights on disk, disk-bound ranks: two groups read every weight twice per token. On disks of
    their own the two ranks read at once; on one machine's disk the two groups' reads take twice
    as long, while ranks taking turns (one group) have the disk alone either way."""
    cfg, hw = get_preset("opt-1.3b"), get_hardware("colab-t4")
    policy = Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=8, num_gpu_batches=2)
    kw = dict(prompt_len=32, gen_len=8)
    own, one = (
        {g: predict_pipeline(cfg, make_plan(cfg, 2, policy, groups=g), hw, shared_disk=s, **kw) for g in (1, 2)}
        for s in (False, True)
    )
    assert one[1].throughput_tok_s == pytest.approx(own[1].throughput_tok_s, rel=1e-9)
    assert one[2].decode_s == pytest.approx(2 * own[2].decode_s, rel=0.05)
    assert one[2].throughput_tok_s < one[1].throughput_tok_s / 1.5 < own[2].throughput_tok_s


def test_ranks_of_one_machine_share_its_cpu_for_attention_over_the_host_cache():
    """``cpu_cache_compute`` on one machine: two ranks attending over their host caches at once
    (two groups) share the host's memory bandwidth and cores, so that attention takes twice as long
    as on hosts of their own; taking turns (one group) a rank has the host alone. Without a GPU the
    CPU is the compute device, whose rates the profile gives per rank already: nothing is divided."""
    from flexlab.cost.pipeline import shared_host

    cfg, hw = get_preset("opt-1.3b"), get_hardware("colab-t4").replace(disk_read_bw=1e15, disk_write_bw=1e15)
    policy = Policy.from_percent([100, 0, 0, 100, 100, 0], gpu_batch_size=32, num_gpu_batches=2, cpu_cache_compute=True)
    kw = dict(prompt_len=1024, gen_len=16)
    slow = hw.replace(cpu_attention_bw=hw.cpu_attention_bw / 2)
    for g, host in ((1, hw), (2, slow)):
        plan = make_plan(cfg, 2, policy, groups=g)
        one = predict_pipeline(cfg, plan, hw, shared_disk=True, **kw)
        assert one.decode_s == pytest.approx(predict_pipeline(cfg, plan, host, **kw).decode_s, rel=1e-9)
    assert predict_pipeline(cfg, plan, slow, **kw).decode_s > 1.3 * predict_pipeline(cfg, plan, hw, **kw).decode_s
    cpu = get_hardware("colab-t4").replace(link_pinned_bw=math.inf, link_pageable_bw=math.inf)
    assert shared_host(cpu, 2).cpu_attention_bw == cpu.cpu_attention_bw
    assert shared_host(cpu, 2).disk_read_bw == cpu.disk_read_bw / 2


def test_ranks_on_one_machine_fit_its_host_memory_together():
    """Two T4 hosts would hold opt-13b's cache in 15 GiB of RAM between them; the two GPUs of one
    Colab-like machine have its 12 GiB to share, and the search keeps within it."""
    from flexlab.cost import search_pipeline
    from flexlab.errors import FlexlabError

    cfg, hw = get_preset("opt-13b"), get_hardware("colab-t4")
    kw = dict(prompt_len=512, gen_len=32, batch_sizes=(8,), num_batches=(2, 4))
    apart, together = (search_pipeline(cfg, hw, 2, one_machine=one, **kw) for one in (False, True))

    def host(found):
        return sum(rank["footprint"].host for rank in found.prediction.ranks)

    assert host(apart) > hw.cpu_memory >= host(together)
    with pytest.raises(FlexlabError, match="has no GPU: pipeline ranks on one CPU share its cores"):
        search_pipeline(cfg, hw.replace(link_pinned_bw=math.inf), 2, one_machine=True, **kw)


def test_the_command_line_searches_the_gpus_of_one_machine(capsys):
    from flexlab.cli import main

    code = main(["search", "--preset", "opt-13b", "--hardware", "colab-t4", "--pipeline", "2", "--one-machine"])
    out = capsys.readouterr().out
    assert code == 0 and re.search(r"^opt-13b on one colab-t4 with 2 GPUs .*: [\d.]+ tok/s predicted", out, re.M), out
    peaks = [float(g) for g in re.findall(r"^stage \d: .*peak GiB .*cpu ([\d.]+)", out, re.M)]
    assert len(peaks) == 2 and sum(peaks) <= 12, out  # the engine's bytes on the host: within its 12 GiB
