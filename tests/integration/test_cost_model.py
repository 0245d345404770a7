"""The cost model against the engine: the same bytes on every link and the same peak memory;
the search respects capacities and keeps compression; bad input is refused clearly."""

from __future__ import annotations

import importlib
import json
import re

import pytest
import torch

import flexlab
from flexlab import CacheQuantConfig, Policy, QuantConfig
from flexlab.cost import CostModel, fits, get_hardware, search_policy
from flexlab.cost.hardware import RUNTIME_BASE_CPU
from flexlab.cost.search import HEADROOM
from flexlab.engine.placement import place_weights
from flexlab.engine.schedule import make_stages
from flexlab.models.registry import weight_bytes

CPU_ONLY = get_hardware("h100").replace(
    name="cpu-like", link_pinned_bw=float("inf"), link_pageable_bw=float("inf"), runtime_base_bytes=RUNTIME_BASE_CPU
)
PROMPTS = [[2] + list(range(10, 19))] * 4  # one length: the model assumes equal prompts
NEW = 5

POLICIES = {
    "all on disk, acts on disk": Policy.from_percent([0, 0, 0, 0, 0, 0], gpu_batch_size=2, num_gpu_batches=2),
    "three-way split, acts on cpu": Policy.from_percent([20, 30, 20, 30, 0, 100], gpu_batch_size=2, num_gpu_batches=2),
    "compressed weights and cache": Policy.from_percent(
        [30, 30, 30, 30, 100, 0],
        gpu_batch_size=2,
        num_gpu_batches=2,
        compress_weight=QuantConfig(bits=4, group_size=32),
        compress_cache=QuantConfig(bits=4, group_size=16),
    ),
    "per-channel keys with a window": Policy.from_percent(
        [0, 0, 0, 0, 100, 0],
        gpu_batch_size=3,
        compress_cache=CacheQuantConfig(bits=2, group_size=8, kv_layout="per-channel", window=3),
    ),
    "cpu attention": Policy.from_percent([50, 0, 0, 100, 100, 0], gpu_batch_size=4, cpu_cache_compute=True),
    "cpu attention over a compressed cache": Policy.from_percent(
        [30, 0, 30, 40, 100, 0],
        gpu_batch_size=2,
        num_gpu_batches=2,
        cpu_cache_compute=True,
        compress_cache=QuantConfig(bits=4, group_size=16),
    ),
    # keeping every row (0.999 of at most 14): the value rows gathered are all of them, as the model expects
    "sparse attention over every tier": Policy.from_percent(
        [100, 0, 30, 30, 100, 0], gpu_batch_size=2, num_gpu_batches=2, attn_sparsity=0.999
    ),
    "sparse attention over a compressed cache": Policy.from_percent(
        [0, 0, 30, 0, 100, 0],
        gpu_batch_size=3,
        attn_sparsity=0.999,
        compress_cache=CacheQuantConfig(bits=4, group_size=8, kv_layout="per-channel", window=2),
    ),
}


@pytest.fixture(scope="module", params=["opt-tiny", "llama-tiny", "bloom-tiny", "codegen-tiny", "glm-tiny"])
def model(request):
    """OPT, and a LLaMA-family model with grouped-query attention (a cache of fewer heads)."""
    return flexlab.Model.from_config(request.param, seed=0, dtype=torch.float32)


@pytest.mark.parametrize("name", list(POLICIES))
def test_bytes_per_link_and_peak_memory_equal_the_engines(model, name, tmp_path):
    policy = POLICIES[name]
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        result = engine.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=None)
    measured = result.timeline.to_pandas().groupby("kind").bytes.sum().to_dict()
    pred = CostModel(
        model.config, policy, CPU_ONLY, prompt_len=len(PROMPTS[0]), gen_len=NEW, itemsize=4, num_prompts=len(PROMPTS)
    ).predict()
    for kind, value in pred.bytes_per_kind.items():
        assert value == measured.get(kind, 0), kind
    for tier in ("gpu", "cpu", "disk"):
        assert pred.peak_bytes[tier] == result.metrics[f"peak_bytes_{tier}"], tier


def test_placement_meets_the_shares_globally_and_per_stage():
    cfg = flexlab.get_preset("opt-1.3b")
    specs = flexlab.Model.from_config(cfg).family.weight_specs(cfg)
    stages = make_stages(cfg.num_layers, sep_layer=True)
    placed = place_weights(specs, stages, 25, 35)
    total = {t: 0 for t in ("gpu", "cpu", "disk")}
    for items in placed:
        for spec, tier, first in items:
            total[tier] += spec.numel * first
    everything = sum(total.values())
    largest = max(s.numel for s in specs)
    assert abs(total["gpu"] - 0.25 * everything) <= largest and abs(total["cpu"] - 0.35 * everything) <= largest
    # The token embedding (also the head) is read twice per token: it takes the fastest tier first.
    table = next(s for s in specs if s.name.endswith("embed_tokens.weight"))
    assert [t for items in placed for s, t, _ in items if s is table] == ["gpu", "gpu"]
    # every layer gets the share the embedding left, to within one of its tensors: none wholly on disk
    rest = everything - table.numel
    shares = {"gpu": (0.25 * everything - table.numel) / rest, "cpu": 0.35 * everything / rest}
    shares["disk"] = 1 - shares["gpu"] - shares["cpu"]
    layers = [items for items, st in zip(placed, stages) if st.layer is not None]
    for a, m in zip(layers[::2], layers[1::2]):
        size = sum(s.numel for s, _, _ in a + m)
        biggest = max(s.numel for s, _, _ in a + m)
        for tier, share in shares.items():
            assert abs(sum(s.numel for s, t, _ in a + m if t == tier) - share * size) <= biggest


def test_a_small_cpu_share_keeps_the_embedding_off_disk():
    """10% on the cpu tier holds the token embedding (8% of opt-1.3b), read twice per token."""
    cfg = flexlab.get_preset("opt-1.3b")
    specs = flexlab.Model.from_config(cfg).family.weight_specs(cfg)
    placed = place_weights(specs, make_stages(cfg.num_layers, sep_layer=True), 0, 10)
    tiers = {s.name: t for items in placed for s, t, _ in items}
    assert tiers["decoder.embed_tokens.weight"] == "cpu"
    on_cpu = sum(s.numel for s in specs if tiers[s.name] == "cpu")
    assert abs(on_cpu - 0.10 * sum(s.numel for s in specs)) <= max(s.numel for s in specs if s.layer is not None)


def test_prediction_explains_the_bottleneck():
    cfg = flexlab.get_preset("opt-6.7b")
    hw = get_hardware("colab-t4")
    on_disk = CostModel(
        cfg, Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=8), hw, prompt_len=512, gen_len=32
    ).predict()
    on_gpu = CostModel(
        cfg.replace(name="opt-tiny-ish", num_layers=2), Policy(gpu_batch_size=8), hw, prompt_len=512, gen_len=32
    ).predict()
    assert on_disk.bottleneck == "disk" and on_gpu.bottleneck == "compute"
    text = CostModel(cfg, Policy.from_percent([0, 0, 100, 0, 100, 0]), hw, prompt_len=64, gen_len=8).explain()
    assert "bottleneck: disk" in text and re.search(r"^attention 0-31 +[\d.]+", text, re.M)  # 32 alike layers: one row
    # overlap hides the smaller of compute and I/O
    no_overlap = CostModel(
        cfg,
        Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=8, overlap=False),
        hw,
        prompt_len=512,
        gen_len=32,
    ).predict()
    assert no_overlap.total_s > on_disk.total_s


def test_each_dequantized_matrix_costs_a_fixed_time_once_per_stage_and_token():
    """On a GPU a small matrix's dequantization is mostly kernel launches: the model charges
    ``dequant_call_s`` per matrix, once per stage and token (a load serves every batch)."""
    from flexlab.engine.stage_cost import price_weights

    cfg = flexlab.get_preset("opt-125m")
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, compress_weight=QuantConfig(bits=4, group_size=64))
    hw = get_hardware("h100")
    times = [
        CostModel(cfg, policy, hw.replace(dequant_call_s=call), prompt_len=16, gen_len=4).predict().total_s
        for call in (0.0, 1e-3)
    ]
    stages = tuple(make_stages(cfg.num_layers, policy.sep_layer))
    priced, _, _ = price_weights(cfg, stages, 100.0, 0.0, policy.compress_weight, 2)
    per_layer = [st.dequant_mats for st in priced if st.parts in (("attention",), ("mlp",))][:2]
    assert per_layer == [4, 2]  # q, k, v, out; fc1, fc2
    assert times[1] - times[0] == pytest.approx(4 * sum(st.dequant_mats for st in priced) * 1e-3, rel=1e-6)
    # the KV codec likewise, per layer, batch and keys/values: the prompt is quantized in one call,
    # then each decode step dequantizes the cache and quantizes its new token (groups run along the
    # hidden size: every token is a row of its own)
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, compress_cache=CacheQuantConfig(bits=4, group_size=64))
    times = [
        CostModel(cfg, policy, hw.replace(kv_codec_call_s=call), prompt_len=128, gen_len=4).predict().total_s
        for call in (0.0, 1e-3)
    ]
    assert times[1] - times[0] == pytest.approx((1 + 2 * 3) * cfg.num_layers * 2 * 2 * 1e-3, rel=1e-6)


def test_a_cpus_dequantization_rate_follows_the_models_width():
    """On a CPU, dequantization runs 3x faster on opt-125m's matrices than on twice as wide ones
    (their temporaries outgrow the cache): with both rates measured, a model of the narrow probe's
    width is predicted at the small-matrix rate, one of the wide probe's width or wider at the
    other, and one between them between them."""
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, compress_weight=QuantConfig(bits=4, group_size=64))
    both = CPU_ONLY.replace(dequant_elems=0.5e9, small_dequant_elems=1.5e9)

    def total(hidden: int, hw) -> float:
        cfg = flexlab.get_preset("opt-125m").replace(name=f"w{hidden}", hidden_size=hidden, ffn_dim=4 * hidden)
        return CostModel(cfg, policy, hw, prompt_len=16, gen_len=4).predict().total_s

    assert total(768, both) == pytest.approx(total(768, CPU_ONLY.replace(dequant_elems=1.5e9)), rel=1e-12)
    for wide in (1536, 3072):
        assert total(wide, both) == pytest.approx(total(wide, CPU_ONLY.replace(dequant_elems=0.5e9)), rel=1e-12)
    middle = total(1152, both)
    assert (
        total(1152, CPU_ONLY.replace(dequant_elems=1.5e9)) < middle < total(1152, CPU_ONLY.replace(dequant_elems=0.5e9))
    )


def test_models_of_one_search_share_cache_prices_and_predict_as_alone():
    """A search's models share their layers' cache prices (``shared``): those do not depend on
    where the weights are. Each prediction equals the same model's alone, whatever was priced
    before it, for policies that differ in the weights, the cache's tiers and its compression."""
    cfg, hw = flexlab.get_preset("opt-1.3b"), get_hardware("colab-t4")
    q4 = QuantConfig(bits=4, group_size=64)
    policies = [
        Policy(
            gpu_batch_size=8,
            num_gpu_batches=2,
            w_gpu_percent=wg,
            w_cpu_percent=wc,
            cache_gpu_percent=cg,
            cache_cpu_percent=100 - cg,
            compress_cache=cc,
            cpu_cache_compute=on_cpu,
        )
        for wg, wc in ((100, 0), (20, 30), (0, 0))
        for cg in (100, 50, 0)
        for cc in (None, q4)
        for on_cpu in (False, True)
    ]
    shared: dict = {}

    def predict(policy, shared=None):
        pred = CostModel(cfg, policy, hw, prompt_len=64, gen_len=8, shared=shared).predict()
        return pred.prefill_s, pred.decode_s, pred.bytes_per_kind, pred.stages

    for policy in policies:
        assert predict(policy, shared) == predict(policy)
    assert len(shared) == 4  # one book per cache configuration: compression x where it is attended


def test_disk_weights_read_beside_the_compute_stall_it_per_byte_with_overlap_only():
    """``disk_stall_s_per_gb``: each GB of weights read from disk adds that many seconds to the
    compute (the reader's threads take its cores); with overlap off nothing runs beside a read."""
    cfg = flexlab.get_preset("opt-125m")
    for overlap in (True, False):
        policy = Policy(gpu_batch_size=4, num_gpu_batches=2, w_gpu_percent=40, w_cpu_percent=0, overlap=overlap)

        def predict(stall: float):
            return CostModel(
                cfg, policy, CPU_ONLY.replace(disk_stall_s_per_gb=stall), prompt_len=16, gen_len=4
            ).predict()

        none, some = predict(0.0), predict(0.5)
        compute = [sum(r["compute_s"] for r in p.stages) for p in (none, some)]
        disk_gb = none.bytes_per_kind["load_weight"] / 1e9
        assert disk_gb > 0.1
        assert compute[1] - compute[0] == pytest.approx(0.5 * disk_gb if overlap else 0.0, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("compress", [None, QuantConfig(bits=4, group_size=64)])
def test_search_respects_capacities_and_keeps_compression(compress):
    cfg = flexlab.get_preset("opt-6.7b")
    hw = get_hardware("colab-t4").replace(gpu_memory=6 * 2**30, cpu_memory=8 * 2**30)
    found = search_policy(
        cfg, hw, prompt_len=256, gen_len=16, batch_sizes=(4, 16), num_batches=(1, 4), compress=(compress,)
    )
    assert found.policy.compress_weight == compress
    assert found.policy.compress_cache == (compress and flexlab.CacheQuantConfig.of(compress))
    for tier, cap in (("gpu", hw.gpu_memory), ("cpu", hw.cpu_memory), ("disk", hw.disk_space)):
        assert found.prediction.peak_bytes[tier] <= cap
    assert found.policy.w_gpu_percent < 100  # 13 GB of weights cannot all sit in 6 GiB
    best = max(c["throughput_tok_s"] for c in found.candidates)
    assert found.prediction.throughput_tok_s == best
    Policy(**{f: getattr(found.policy, f) for f in found.policy.__dataclass_fields__})  # validates


def test_without_a_gpu_the_search_pools_the_ram_of_both_tiers():
    """On a CPU the gpu and cpu tiers are one RAM: the process may take more than one tier's share
    of it, as long as it stays within the sum (0.4 GiB each is too little for opt-1.3b's process
    on either side of a GPU machine; 0.8 GiB together is enough)."""
    cfg = flexlab.get_preset("opt-1.3b")
    caps = dict(gpu_memory=0.4 * 2**30, cpu_memory=0.4 * 2**30, runtime_base_bytes=0.1 * 2**30)
    gpu, cpu_only = get_hardware("h100").replace(**caps), CPU_ONLY.replace(**caps)
    grid = dict(batch_sizes=(1, 8), num_batches=(1, 2), checkpoint_itemsize=2)
    assert gpu.has_link and not cpu_only.has_link
    with pytest.raises(flexlab.FlexlabError, match=r"in gpu 0\.4 GiB, cpu 0\.4 GiB"):
        search_policy(cfg, gpu, prompt_len=32, gen_len=32, **grid)
    found = search_policy(cfg, cpu_only, prompt_len=32, gen_len=32, **grid)
    host = found.prediction.footprint.host
    assert caps["cpu_memory"] < host <= caps["gpu_memory"] + caps["cpu_memory"] and fits(
        found.prediction.footprint, cpu_only
    )
    with pytest.raises(flexlab.FlexlabError, match=r"RAM 0\.0 GiB \(gpu and cpu tiers together\)"):
        search_policy(cfg, cpu_only.replace(gpu_memory=1e6, cpu_memory=1e6), prompt_len=32, gen_len=32, **grid)


def test_search_finds_policies_off_the_lps_line():
    """Memory is not linear in the shares (read buffers follow the largest stage on disk: keeping
    the embedding in memory shrinks them), so the LP's pick alone can miss a faster policy that
    fits; the search refines it on the exact model and must do at least as well as this one."""
    cfg = flexlab.get_preset("opt-125m")
    weights = weight_bytes(cfg, 2)
    # the engine's bytes limited to 60% of the weights and 64 MiB, on top of what the process needs besides
    hand_policy = Policy.from_percent([0, 50, 100, 0, 100, 0], gpu_batch_size=8, num_gpu_batches=2)
    fp = CostModel(cfg, hand_policy, CPU_ONLY, prompt_len=64, gen_len=8, checkpoint_itemsize=2).footprint()
    besides = fp.host - fp.tracked["gpu"] - fp.tracked["cpu"]
    room = 1 - HEADROOM  # the search keeps that share free: the limits leave it beside the hand-made policy
    limits = CPU_ONLY.replace(
        gpu_memory=(0.3 * weights + 64 * 2**20) / room, cpu_memory=(0.3 * weights + besides) / room
    )
    shape = dict(batch_sizes=(8,), num_batches=(2,), compress=(None,), act_tiers=("gpu",), checkpoint_itemsize=2)
    hand = CostModel(cfg, hand_policy, limits, prompt_len=64, gen_len=8, checkpoint_itemsize=2).predict()
    assert fits(hand.footprint, limits, HEADROOM)
    found = search_policy(cfg, limits, prompt_len=64, gen_len=8, **shape)
    assert fits(found.prediction.footprint, limits, HEADROOM)
    assert found.prediction.throughput_tok_s >= hand.throughput_tok_s


def test_a_large_tied_table_on_disk_takes_one_read_buffer_and_the_search_finds_room():
    """BLOOM's tied 250k-row table outweighs any layer. All on disk, it took both read buffers
    (twice its size) until the buffers were sized apart: now one of the table and two of the
    largest layer, so all-disk needs no more memory than the table on the cpu tier, and a limit
    just above all-disk's footprint still finds a policy. Where the block has fewer rows than
    the hidden size the head reads the table a slice at a time: no buffer of its size at all."""
    cfg = flexlab.get_preset("bloom-560m")
    table = cfg.vocab_size * cfg.hidden_size * 2

    def footprint(w_cpu: float, bs: int, batches: int):
        policy = Policy.from_percent([0, w_cpu, 0, 0, 100, 0], gpu_batch_size=bs, num_gpu_batches=batches)
        return CostModel(cfg, policy, CPU_ONLY, prompt_len=32, gen_len=8, checkpoint_itemsize=2).footprint()

    front = CostModel(cfg, Policy(), CPU_ONLY, prompt_len=32, gen_len=8).tied_front()
    assert front is not None and 40 < front < 50  # the table is 46% of bloom-560m's weights
    for bs, batches in ((8, 1), (8, 2), (32, 32)):  # the last: a block of as many rows as the hidden size
        all_disk, table_in_memory = footprint(0, bs, batches), footprint(front, bs, batches)
        if bs * batches < cfg.hidden_size:  # streamed: the slices' buffers, and the two of the largest layer
            assert all_disk.tracked["gpu"] < table / 2
            assert all_disk.host < table_in_memory.host - table / 2
        else:
            assert all_disk.host <= 1.01 * table_in_memory.host  # (the same but for alignment)
            assert table <= all_disk.tracked["gpu"] < 1.2 * table  # one buffer of the table, not two
        ram = all_disk.host * 1.06 / (1 - HEADROOM)  # the LP keeps 3% more free than the check
        limits = CPU_ONLY.replace(gpu_memory=ram / 2, cpu_memory=ram / 2)
        grid = dict(batch_sizes=(bs,), num_batches=(batches,), act_tiers=("gpu",), checkpoint_itemsize=2)
        found = search_policy(cfg, limits, prompt_len=32, gen_len=8, **grid)
        assert fits(found.prediction.footprint, limits, HEADROOM)


def test_bad_input_is_refused_clearly():
    cfg = flexlab.get_preset("opt-1.3b")
    with pytest.raises(flexlab.FlexlabError, match="no policy fits opt-1.3b"):
        search_policy(
            cfg,
            get_hardware("colab-t4").replace(disk_space=1e6, cpu_memory=1e6, gpu_memory=1e6),
            prompt_len=64,
            gen_len=8,
            batch_sizes=(1,),
            num_batches=(1,),
        )
    with pytest.raises(flexlab.FlexlabError, match="exceeds opt-1.3b's 2048 positions"):
        CostModel(cfg, Policy(), get_hardware("h100"), prompt_len=2040, gen_len=32)
    with pytest.raises(flexlab.FlexlabError, match="unknown hardware 'tpu'"):
        get_hardware("tpu")
    with pytest.raises(flexlab.FlexlabError, match="gpu_memory=-1 is invalid"):
        get_hardware("h100").replace(gpu_memory=-1)
    with pytest.raises(flexlab.FlexlabError, match="gpu_memory=0 is invalid"):
        get_hardware("h100").replace(gpu_memory=0)


def test_hardware_profiles_round_trip_and_refuse_an_old_one(tmp_path):
    """(A measured profile's values and round trip: tests/integration/test_cli.py, which calibrates.)"""
    hw = get_hardware("colab-t4")
    hw.save(tmp_path / "hw.json")
    assert get_hardware(tmp_path / "hw.json") == hw
    old = json.loads((tmp_path / "hw.json").read_text())
    del old["cache_transfer_overhead_s"]  # a profile saved by an earlier version
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(flexlab.FlexlabError, match=r"missing: \['cache_transfer_overhead_s'\].*calibrate"):
        get_hardware(tmp_path / "old.json")


def test_refresh_makes_its_probe_directory_and_refuses_one_it_cannot_make(tmp_path):
    from flexlab.cost import refresh

    hw = refresh(CPU_ONLY, device="cpu", offload_dir=tmp_path / "not" / "yet")
    assert hw.disk_read_bw > 1e6 and (tmp_path / "not" / "yet").is_dir()
    # the compute rates are re-probed too (a 2-core CPU: between 1 GFLOP/s and 10 TFLOP/s)
    assert hw.matmul_flops != CPU_ONLY.matmul_flops and 1e9 < hw.matmul_flops < 1e13
    assert hw.weight_read_bw != CPU_ONLY.weight_read_bw and 1e8 < hw.weight_read_bw < 1e12
    assert CPU_ONLY.llc_weight_read_bw == 0 and 1e8 < hw.llc_weight_read_bw < 1e12
    (tmp_path / "file").write_text("")
    with pytest.raises(flexlab.FlexlabError, match="cannot make the offload directory .*file/sub"):
        refresh(CPU_ONLY, device="cpu", offload_dir=tmp_path / "file" / "sub")


def test_refresh_times_the_disk_on_an_engines_own_weight_reads(tmp_path):
    """``Engine.weight_reads`` lists the reads one token's weights take (what a block then reads
    per token, byte for byte, besides the rows the embedding reads of the token table);
    ``refresh(reads=...)`` probes the disk on them."""
    from flexlab.cost import refresh

    model = flexlab.Model.from_config("opt-tiny", seed=0)
    with flexlab.Engine(model, offload_dir=tmp_path / "resident") as engine:
        assert engine.weight_reads() == []
    disk = Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=len(PROMPTS))  # one block
    with flexlab.Engine(model, disk, offload_dir=tmp_path / "disk") as engine:
        reads = engine.weight_reads()
        assert len(reads) >= 2 + 2 * model.config.num_layers and all(path.is_file() for path, _, _ in reads)
        before = engine.files.read_bytes
        result = engine.generate(PROMPTS, max_new_tokens=3, stop_token_ids=None)
        rows = result.timeline.summary()["bytes[read_rows]"]
        assert engine.files.read_bytes - before - rows == 3 * sum(size for _, _, size in reads)  # a load per token
        hw = refresh(CPU_ONLY, device="cpu", offload_dir=tmp_path / "probe", reads=reads)
    assert 1e6 < hw.disk_read_bw < 1e12
    with pytest.raises(flexlab.FlexlabError, match="closed"):
        engine.weight_reads()


def test_calibrate_warns_instead_of_dividing_by_noise(tmp_path):
    """Rates derived from the difference of two timings: a difference within noise is no rate."""
    from flexlab.cost.probes import cache_move_cpu_seconds, codec_rates, difference_rate, difference_seconds

    assert difference_rate(1e9, slow=2.0, fast=1.0, what="x") == pytest.approx(1e9)
    with pytest.warns(UserWarning, match="the codec could not be measured: .*within noise"):
        assert difference_rate(1e9, slow=1.01, fast=1.0, what="the codec") is None
    assert difference_seconds(10, slow=2.0, fast=1.0, what="x") == pytest.approx(0.1)
    with pytest.warns(UserWarning, match="a lane transfer's cost could not be measured"):
        assert difference_seconds(10, slow=0.99, fast=1.0, what="a lane transfer's cost") == 0.0
    rate, call = codec_rates(torch.device("cpu"), torch.float32, 64, rounds=3)
    assert 1e6 < rate < 1e12 and 0 <= call < 0.1
    move = cache_move_cpu_seconds(tmp_path / "probe", 8, 40, 768, torch.float32)
    assert 0 <= move < 0.05 and not list((tmp_path / "probe").iterdir())  # its file is gone


def test_disk_stalls_are_the_compute_busy_time_they_add(tmp_path, monkeypatch):
    """On a CPU a disk-cache move costs what it adds to the compute lane's busy time, and a GB of
    disk weights what it adds per GB read (resident, cache-on-disk and weights-on-disk runs in
    alternation, medians); within noise, the cores' own time of a move is the floor and the
    weights' stall 0 (not measured), as it is beyond any reader's cost."""
    cal = importlib.import_module("flexlab.cost.calibrate")  # the module (the package exports its function)
    model = flexlab.Model.from_config("opt-tiny", seed=0)
    prompts, new, nb = [[2, 5, 6]] * 4, 4, 2
    moves = nb * model.config.num_layers * (2 * new - 1)
    # per policy (cache, weights on the gpu tier): one run each, in turn
    busy = {(100, 100): [0.30, 0.10, 0.11], (0, 100): [0.15, 0.21, 0.50], (100, 50): [0.2, 0.9, 0.16]}
    weights_read = [2e9]
    order = []

    def fake(model_, policy, prompts_, new_, offload_dir):
        key = (policy.cache_gpu_percent, policy.w_gpu_percent)
        order.append(key)
        return busy[key][order.count(key) - 1], weights_read[0] if key == (100, 50) else 0.0

    monkeypatch.setattr(cal, "_compute_busy", fake)
    monkeypatch.setattr(cal, "cache_move_cpu_seconds", lambda *a: 1e-6)
    move, stall = cal._compute_stalls(model, prompts, new, nb, tmp_path)
    assert move == pytest.approx((0.21 - 0.11) / moves)
    assert stall == pytest.approx((0.2 - 0.11) / 2)  # seconds per GB of weights read
    assert order == [(100, 100), (0, 100), (100, 50)] * 3  # alternated, so a slow minute falls on all
    busy.update({key: [0.2] * 3 for key in busy})
    order.clear()
    with pytest.warns(UserWarning, match="a disk-cache transfer's cost could not be measured"):
        with pytest.warns(UserWarning, match="the stall of disk weights could not be measured"):
            assert cal._compute_stalls(model, prompts, new, nb, tmp_path) == (1e-6, 0.0)
    busy.update({(100, 100): [0.1] * 3, (0, 100): [0.2] * 3, (100, 50): [0.3] * 3})
    weights_read[0] = 4e6  # 0.2 s more for 4 MB: 50 s per GB is no reader's cost
    order.clear()
    with pytest.warns(UserWarning, match="the stall of disk weights measured 50.0 s per GB, beyond"):
        assert cal._compute_stalls(model, prompts, new, nb, tmp_path)[1] == 0.0
    monkeypatch.undo()
    move, stall = cal._compute_stalls(model, prompts, new, nb, tmp_path / "real")
    # opt-tiny's weights are a few hundred KB: the stall is within noise or beyond a rate (0), or small
    assert 0 < move < 0.05 and 0 <= stall <= cal.MAX_DISK_STALL_S_PER_GB
    assert not list((tmp_path / "real").iterdir())  # the engines' files are gone


def test_disk_weights_read_in_place_are_counted_in_the_checkpoints_dtype(tmp_path):
    """A float16 checkpoint computed in float32: its disk weights are read as stored (2 bytes an
    element), the memory tiers hold float32 copies; the model must count both as the engine does."""
    from flexlab.cost import checkpoint_itemsize
    from flexlab.models.convert import save_checkpoint

    save_checkpoint(
        flexlab.Model.from_config("opt-tiny", seed=0), tmp_path / "ckpt", dtype=torch.float16, progress=False
    )
    model = flexlab.Model.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert checkpoint_itemsize(model) == 2 and checkpoint_itemsize(flexlab.Model.from_config("opt-tiny")) is None

    def cm_of(model, policy):
        return CostModel(
            model.config,
            policy,
            CPU_ONLY,
            prompt_len=len(PROMPTS[0]),
            gen_len=NEW,
            itemsize=4,
            num_prompts=len(PROMPTS),
            checkpoint_itemsize=2,
        )

    for percent in ([0, 0, 100, 0, 100, 0], [30, 30, 0, 100, 100, 0]):
        policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2)
        with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
            result = engine.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=None)
        measured = result.timeline.to_pandas().groupby("kind").bytes.sum().to_dict()
        pred = cm_of(model, policy).predict()
        assert pred.bytes_per_kind["load_weight"] == measured["load_weight"] > 0
        for tier in ("cpu", "disk"):
            assert pred.peak_bytes[tier] == result.metrics[f"peak_bytes_{tier}"], (percent, tier)
        # The converted copies: whether the next stage's load overlaps this stage's compute
        # depends on timing. The model counts the overlap (the worst case); the run holds at
        # least one stage's copies fewer.
        largest = max(s.copies[1] for s in cm_of(model, policy)._stage)
        assert pred.peak_bytes["gpu"] - largest <= result.metrics["peak_bytes_gpu"] <= pred.peak_bytes["gpu"]


def test_the_head_projects_the_last_position_and_small_stages_are_read_from_memory_once_per_token():
    cfg, policy = flexlab.get_preset("opt-125m"), Policy(gpu_batch_size=8, num_gpu_batches=4)

    def stage_s(hw, name: str, prompt_len: int) -> float:
        pred = CostModel(cfg, policy, hw, prompt_len=prompt_len, gen_len=1, itemsize=4).predict()
        return next(s["compute_s"] for s in pred.stages if s["stage"] == name)

    cpu = CPU_ONLY.replace(matmul_flops=1e11, weight_read_bw=4e9)
    # generation needs the last position's logits only: the head's time does not grow with the prompt
    assert stage_s(cpu, "head", 512) == pytest.approx(stage_s(cpu, "head", 16))
    assert stage_s(cpu, "mlp.0", 512) > 10 * stage_s(cpu, "mlp.0", 16)
    # an MLP's 19 MB in float32 fits a 32 MiB cache: only the first of 4 batches reads memory
    mlp_bytes = 2 * cfg.hidden_size * cfg.ffn_dim * 4
    cached, uncached = cpu.replace(llc_bytes=32 * 2**20), cpu.replace(llc_bytes=2**20)
    read, flops = mlp_bytes / cpu.weight_read_bw, 2 * (mlp_bytes / 4) * 8 / cpu.matmul_flops  # a batch of 8
    saved = stage_s(cpu, "mlp.0", 1) - stage_s(cached, "mlp.0", 1)
    assert saved == pytest.approx(3 * (read - flops), rel=0.05)  # the later batches are bound by their maths
    assert stage_s(uncached, "mlp.0", 1) == stage_s(cpu, "mlp.0", 1)  # larger than the cache: 4 reads
    # measured, the cache's own read rate for a few rows bounds the later batches instead
    llc_read = mlp_bytes / (3 * flops)  # their reads take 3x their maths
    slow = cached.replace(llc_weight_read_bw=llc_read)
    assert stage_s(cpu, "mlp.0", 1) - stage_s(slow, "mlp.0", 1) == pytest.approx(3 * (read - 3 * flops), rel=0.05)
    fast = cached.replace(llc_weight_read_bw=1e15)  # faster than the maths: the maths again
    assert stage_s(fast, "mlp.0", 1) == pytest.approx(stage_s(cached, "mlp.0", 1))


def test_matrices_held_packed_are_read_at_the_packed_rate_and_only_those():
    """A CPU computing in bfloat16 holds its memory tiers' uncompressed matrices packed: the model
    reads those at ``packed_weight_read_bw``, disk weights and the looked-up token table at the
    plain rate; a float32 run or an unmeasured packed rate leaves every prediction as it was."""
    cfg = flexlab.get_preset("llama-tiny")  # an untied head: its lm_head is packed too
    cpu = CPU_ONLY.replace(matmul_flops=1e15, weight_read_bw=4e9, llc_bytes=0)

    def stages(hw, policy, itemsize=2) -> dict[str, float]:
        pred = CostModel(cfg, policy, hw, prompt_len=4, gen_len=2, itemsize=itemsize).predict()
        return {s["stage"]: s["compute_s"] for s in pred.stages}

    resident, on_disk = Policy(gpu_batch_size=1), Policy(gpu_batch_size=1, w_gpu_percent=0, w_cpu_percent=0)
    packed = cpu.replace(packed_weight_read_bw=8e9)
    assert {"mlp.0", "head"} <= set(stages(cpu, resident))
    for name, plain_s in stages(cpu, resident).items():
        params = {"mlp.0": 3 * cfg.hidden_size * cfg.ffn_dim, "head": cfg.vocab_size * cfg.hidden_size}.get(name)
        if params:  # the prefill and the decode each read it in half the time; the rest is the same
            saved = plain_s - stages(packed, resident)[name]
            assert saved == pytest.approx(2 * params * 2 / 8e9, rel=1e-6)
    assert stages(packed, on_disk) == stages(cpu, on_disk)  # read from disk into buffers: plain
    assert stages(packed, resident, itemsize=4) == stages(cpu, resident, itemsize=4)  # float32: never packed
    assert stages(packed, resident)["embed"] == stages(cpu, resident)["embed"]  # a lookup, no matmul
