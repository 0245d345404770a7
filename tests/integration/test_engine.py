"""The offloading engine equals transformers for every policy (float32, CPU), and cleans up."""

from __future__ import annotations

import os
import random
import re
import shutil

import pytest
import torch

import flexlab
from flexlab import Policy
from flexlab.models.registry import weight_bytes
from tests.conftest import write_bin_checkpoint
from tests.integration.test_exactness import hf_greedy, hf_logits

random.seed(0)
PROMPTS = [[2] + [random.randrange(4, 500) for _ in range(n)] for n in (5, 1, 8, 3, 6, 2, 7)]  # 7: short last block
NEW = 8

GRID = {
    "all on gpu (reference)": Policy(),
    "weights gpu/cpu/disk": Policy.from_percent([20, 30, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2),
    "weights all on disk": Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=4),
    "cache on cpu": Policy.from_percent([100, 0, 0, 100, 100, 0], gpu_batch_size=2, num_gpu_batches=2),
    "cache on disk": Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=3, num_gpu_batches=1),
    "cache split three ways": Policy.from_percent([100, 0, 30, 30, 100, 0], gpu_batch_size=2, num_gpu_batches=3),
    "activations on cpu": Policy.from_percent([100, 0, 100, 0, 0, 100], gpu_batch_size=2, num_gpu_batches=2),
    "activations on disk": Policy.from_percent([100, 0, 100, 0, 0, 0], gpu_batch_size=1, num_gpu_batches=4),
    "everything offloaded, overlap off": Policy.from_percent(
        [10, 40, 20, 40, 0, 0], gpu_batch_size=2, num_gpu_batches=2, overlap=False
    ),
    "everything offloaded, joint layers": Policy.from_percent(
        [10, 40, 20, 40, 0, 100], gpu_batch_size=3, num_gpu_batches=2, sep_layer=False
    ),
    "1 batch per block": Policy.from_percent([50, 50, 50, 50, 100, 0], gpu_batch_size=2, num_gpu_batches=1),
    "4 batches per block": Policy.from_percent([50, 0, 50, 0, 0, 100], gpu_batch_size=1, num_gpu_batches=4),
    "cache on cpu, attention on cpu": Policy.from_percent(
        [100, 0, 0, 100, 100, 0], gpu_batch_size=2, num_gpu_batches=2, cpu_cache_compute=True
    ),
    "cache split, attention on cpu": Policy.from_percent(
        [30, 30, 25, 50, 0, 100], gpu_batch_size=4, num_gpu_batches=2, cpu_cache_compute=True
    ),
}


@pytest.fixture(scope="module")
def expected(tiny_hf):
    greedy = hf_greedy(tiny_hf, PROMPTS, NEW)
    assert len({t for row in greedy for t in row}) > 10  # not a degenerate model
    return greedy, hf_logits(tiny_hf, PROMPTS)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("name", list(GRID))
def test_tokens_and_scores_equal_transformers(name, model, expected, tmp_path):
    greedy, logits = expected
    with flexlab.Engine(model, GRID[name], offload_dir=tmp_path) as engine:
        result = engine.generate(PROMPTS, max_new_tokens=NEW)
        assert result.token_ids == greedy
        for lp, lg, seq in zip(engine.score(PROMPTS), logits, PROMPTS):
            ref = torch.log_softmax(lg[:-1], -1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
            torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
    assert list(tmp_path.iterdir()) == []  # every file the engine made is gone


def test_scores_in_chunks_of_positions_equal_transformers(model, expected, monkeypatch):
    # a few positions' log-probabilities at a time (as for a long window over a large vocabulary)
    monkeypatch.setattr("flexlab.engine.projection.LOGIT_BYTES", 3 * 4 * model.config.vocab_size)
    with flexlab.Engine(model, Policy(gpu_batch_size=2, num_gpu_batches=2)) as engine:
        scored = engine.score(PROMPTS, greedy=True)
    for (lp, top), lg, seq in zip(scored, expected[1], PROMPTS):
        target = torch.tensor(seq[1:])
        ref = torch.log_softmax(lg[:-1], -1).gather(-1, target[:, None]).squeeze(-1)
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
        assert top.tolist() == (lg[:-1].argmax(-1) == target).tolist()


def test_weights_from_a_bin_checkpoint_are_converted_once(tiny_hf, tmp_path, expected):
    write_bin_checkpoint(tiny_hf, tmp_path / "ckpt")
    model = flexlab.Model.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, device="cpu")
    with flexlab.Engine(model, Policy.from_percent([0, 0, 100, 0, 100, 0]), offload_dir=tmp_path / "off") as engine:
        converted = sorted(p.name for p in (engine.offload_dir / "weights").iterdir())
        # one packed file per stage; the token table in one of its own (the embedding reads rows of it)
        assert converted == sorted([f"stage{s.index}.bin" for s in engine.stages] + ["stage0_token_table.bin"])
        assert all(w.tier == "disk" for w in engine.weights.placed.values())
        assert engine.generate(PROMPTS, max_new_tokens=NEW).token_ids == expected[0]


def test_safetensors_weights_are_read_in_place(model, tmp_path):
    with flexlab.Engine(model, Policy.from_percent([0, 0, 100, 0, 100, 0]), offload_dir=tmp_path) as engine:
        assert list((engine.offload_dir / "weights").iterdir()) == []
        assert engine.weights.tier_bytes()["disk"] == weight_bytes(model.config, 4)


@pytest.mark.parametrize("packed", [False, True], ids=["read in place", "packed file"])
def test_a_stage_loaded_into_the_same_buffer_again_reuses_its_views_over_fresh_bytes(model, tmp_path, packed):
    quant = flexlab.QuantConfig(bits=8, group_size=32) if packed else None
    policy = Policy.from_percent([0, 0, 100, 0, 100, 0], compress_weight=quant)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        store, (a, b) = engine.weights, [s.index for s in engine.stages[1:4:2]]  # two of one kind
        first, _ = store.load(a)
        expect = {k: v.clone() for k, v in store.dequantized(first).items()}
        store.release(first)
        held, _ = store.load(b)  # the other buffer, so that the next load takes the first one
        other, _ = store.load(b)  # another stage's bytes in the same buffer in between
        assert other.buffer.data_ptr() == first.buffer.data_ptr() != held.buffer.data_ptr()
        store.release(other)
        again, _ = store.load(a)
        assert again.buffer.data_ptr() == first.buffer.data_ptr()
        assert all(again.tensors[k] is t for k, t in first.tensors.items())  # no view made twice
        assert all(torch.equal(store.dequantized(again)[k], v) for k, v in expect.items())
        store.release(again)
        store.release(held)


def test_early_stop_and_sampling_in_blocks(model):
    policy = Policy.from_percent([30, 30, 30, 30, 0, 100], gpu_batch_size=2, num_gpu_batches=2)
    with flexlab.Engine(model, policy) as engine:
        free = engine.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=None).token_ids
        stop_id = free[0][2]
        cut = engine.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=[[stop_id]] + [[]] * 6).token_ids
        assert cut[0] == free[0][: free[0].index(stop_id) + 1] and cut[1:] == free[1:]
        kw = dict(max_new_tokens=NEW, do_sample=True, top_k=20, seed=3, stop_token_ids=None)
        a, b = engine.generate(PROMPTS, **kw).token_ids, engine.generate(PROMPTS, **kw).token_ids
        assert a == b and a != free


def test_timeline_has_an_event_for_every_compute_and_transfer(model):
    policy = Policy.from_percent([0, 0, 0, 50, 0, 0], gpu_batch_size=2, num_gpu_batches=2)
    with flexlab.Engine(model, policy) as engine:
        result = engine.generate(PROMPTS[:4], max_new_tokens=3, stop_token_ids=None)
    df = result.timeline.to_pandas()
    n_stages = len(engine.stages)
    computes = df[df.kind == "compute"]
    assert len(computes) == 3 * n_stages * 2
    assert set(zip(computes.token, computes.stage, computes.batch)) == {
        (t, j, k) for t in range(3) for j in range(n_stages) for k in range(2)
    }
    disk_loads = df[df.kind == "load_weight"]
    assert len(disk_loads) == 3 * n_stages and (disk_loads.bytes > 0).all()
    rows = df[df.kind == "read_rows"]  # the embedding's rows of the token table, read by its compute
    assert set(zip(rows.lane, rows.token, rows.stage, rows.batch)) == {
        ("compute", t, 0, k) for t in range(3) for k in range(2)
    }
    assert set(df.lane) == {"compute", "load weight", "load cache", "store cache", "load act", "store act"}
    assert (df.end >= df.start).all()


def overlap_model():
    cfg = flexlab.get_preset("opt-tiny").replace(
        name="opt-small", hidden_size=256, num_heads=4, ffn_dim=1024, num_layers=4
    )
    return flexlab.Model.from_config(cfg, seed=0, dtype=torch.float32, device="cpu")


def test_overlap_hides_io_under_compute_and_no_overlap_hides_none():
    model = overlap_model()
    prompts = [[2] + list(range(10, 60))] * 8
    summaries = {}
    for overlap in (True, False):
        policy = Policy.from_percent([0, 0, 0, 0, 0, 0], gpu_batch_size=2, num_gpu_batches=4, overlap=overlap)
        with flexlab.Engine(model, policy) as engine:
            summaries[overlap] = engine.generate(prompts, max_new_tokens=4, stop_token_ids=None).timeline.summary()
    assert summaries[True]["io_hidden_s"] > 0
    assert summaries[False]["io_hidden_s"] == 0


def test_peak_bytes_per_tier_match_the_placement(model):
    policy = Policy.from_percent([20, 30, 20, 30, 0, 100], gpu_batch_size=2, num_gpu_batches=2)
    cfg, itemsize = model.config, 4
    with flexlab.Engine(model, policy) as engine:
        result = engine.generate(PROMPTS[:4], max_new_tokens=NEW, stop_token_ids=None)
        placed = engine.weights.tier_bytes()
        buffers = engine.weights.buffer_bytes
        largest_stage = max(sum(w.nbytes for w in ws) for ws in engine.weights.stage_weights.values())
    width = max(map(len, PROMPTS[:4]))
    cache_row = 2 * cfg.num_layers * (width + NEW - 1) * cfg.hidden_size * itemsize  # one sequence's K and V
    seq_tiers = {"gpu": 1, "cpu": 1, "disk": 2}  # 4 sequences at 20/30/50
    act_slot = 2 * width * cfg.hidden_size * itemsize
    m = result.metrics
    assert m["peak_bytes_disk"] == placed["disk"] + seq_tiers["disk"] * cache_row
    assert m["peak_bytes_cpu"] == placed["cpu"] + seq_tiers["cpu"] * cache_row + 2 * act_slot
    # gpu: its weights and cache, the two stage-sized disk read buffers, and at most two stages'
    # weights brought in from other tiers (the stage computing and the one prefetched)
    floor = placed["gpu"] + cache_row + buffers
    assert floor <= m["peak_bytes_gpu"] <= floor + 2 * largest_stage


def test_files_are_removed_after_an_exception(model, tmp_path):
    policy = Policy.from_percent([0, 0, 0, 0, 0, 0])
    with pytest.raises(RuntimeError, match="boom"):
        with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
            engine.generate(PROMPTS[:2], max_new_tokens=2)
            assert any(tmp_path.iterdir())
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(flexlab.FlexlabError, match="this Engine is closed"):
        engine.generate(PROMPTS[:2], max_new_tokens=2)


def test_an_offload_dir_that_is_a_file_is_refused(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(flexlab.OffloadError, match="is not usable.*pass a writable directory"):
        flexlab.Engine(model, Policy.from_percent([0, 0, 0, 0, 0, 0]), offload_dir=blocker / "sub")


def test_a_full_disk_is_refused_before_any_file_is_written(model, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with flexlab.Engine(model, Policy.from_percent([100, 0, 0, 0, 100, 0]), offload_dir=tmp_path) as engine:
        with pytest.raises(flexlab.OffloadError, match="KV cache needs .* GiB; free space"):
            engine.generate(PROMPTS, max_new_tokens=NEW)
        assert not list(engine.offload_dir.rglob("*.bin"))  # refused before any cache file existed
    random_model = flexlab.Model.from_config("opt-tiny", dtype=torch.float32, device="cpu")  # must be converted
    with pytest.raises(flexlab.OffloadError, match="disk share of the weights needs"):
        flexlab.Engine(random_model, Policy.from_percent([0, 0, 100, 0, 100, 0]), offload_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_prompts_longer_than_the_model_allows(model):
    with flexlab.Engine(model, Policy()) as engine:
        with pytest.raises(flexlab.PromptError, match="exceeds the model's 256 positions"):
            engine.generate([[2] * 250], max_new_tokens=10)


def test_cpu_attention_splits_rows_and_equals_full_attention():
    from flexlab.models.attention import attend, attention_bias, decode_attention

    gen = torch.Generator().manual_seed(0)
    b, heads, length, d = 5, 2, 7, 4
    q, k_new, v_new = (torch.randn(b, heads, 1, d, generator=gen) for _ in range(3))
    k_old, v_old = torch.randn(b, heads, length, d, generator=gen), torch.randn(b, heads, length, d, generator=gen)
    bias = attention_bias(torch.ones(b, length + 1, dtype=torch.bool), 1)
    full = attend(q, torch.cat([k_old, k_new], 2), torch.cat([v_old, v_new], 2), bias)
    rows = [0, 3, 4]  # rows 1..2 stay on the host
    host = (1, 2, k_old[1:3], v_old[1:3])
    torch.testing.assert_close(decode_attention(q, k_new, v_new, k_old[rows], v_old[rows], bias, host), full)


def test_a_prefills_per_head_bias_stays_apart_from_its_mask_and_attends_exactly_as_their_sum():
    from flexlab.models import bloom
    from flexlab.models.attention import SplitBias, attend, attention_bias
    from flexlab.models.config import get_preset

    cfg = get_preset("bloom-560m")
    gen = torch.Generator().manual_seed(0)
    b, heads, s, d = 3, cfg.num_heads, 9, 8
    q, k, v = (torch.randn(b, heads, s, d, generator=gen) for _ in range(3))
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, :3] = valid[2, :5] = False  # left padding: each sequence's own positions
    split = attention_bias(valid, s, None, lambda positions: bloom.position_bias(cfg, positions))
    assert isinstance(split, SplitBias) and split.mask.shape == (b, 1, s, s) and split.keys.shape == (b, heads, 1, s)
    summed = split.mask + split.keys  # what a prefill held before: [b, heads, s, s]
    whole = attend(q, k, v, summed)
    assert torch.equal(attend(q, k, v, split), whole)
    two_queries = 4 * b * heads * s * 2  # score bytes for two queries at a time
    chunked = attend(q, k, v, split, score_bytes=two_queries)
    assert torch.equal(chunked, attend(q, k, v, summed, score_bytes=two_queries))
    torch.testing.assert_close(chunked, whole)  # smaller matmuls round their own way
    decode = attention_bias(valid, 1, None, lambda positions: bloom.position_bias(cfg, positions))
    assert torch.equal(decode, summed[:, :, -1:])  # one query: summed, as the decode paths take it


def test_cpu_cache_compute_leaves_cpu_rows_on_the_host(model, monkeypatch):
    from flexlab.engine.cache import CacheStore

    spans = []
    original = CacheStore.load

    def spy(self, *args, **kwargs):
        loaded, moved = original(self, *args, **kwargs)
        spans.append(loaded.host_span)
        return loaded, moved

    monkeypatch.setattr(CacheStore, "load", spy)
    policy = Policy.from_percent([100, 0, 25, 50, 100, 0], gpu_batch_size=4, cpu_cache_compute=True)
    with flexlab.Engine(model, policy) as engine:
        engine.generate(PROMPTS[:4], max_new_tokens=3)
    assert spans and all(span == (1, 2) for span in spans)  # of 4 sequences: 1 gpu, 2 cpu, 1 disk


@pytest.mark.parametrize(
    "policy",
    [
        Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=3),
        Policy.from_percent([100, 0, 25, 50, 100, 0], gpu_batch_size=4, cpu_cache_compute=True),
        Policy.from_percent([100, 0, 30, 30, 100, 0], gpu_batch_size=3, num_gpu_batches=2, overlap=False),
        Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2, attn_sparsity=0.5),
        Policy.from_percent(
            [0, 0, 25, 50, 100, 0], gpu_batch_size=4, num_gpu_batches=2, attn_sparsity=0.5, cpu_cache_compute=True
        ),
        Policy.from_percent(
            [100, 0, 0, 0, 100, 0],
            gpu_batch_size=2,
            num_gpu_batches=2,
            compress_cache=flexlab.QuantConfig(bits=4, group_size=4),
        ),
    ],
    ids=["disk", "split, cpu attention", "split, overlap off", "sparse", "sparse, split, cpu attention", "4-bit"],
)
def test_every_cache_read_buffer_comes_back(model, monkeypatch, policy):
    """On a CPU, attention reads disk rows in the read buffers; each must be handed back once the
    compute is done with it (a lost one would stall a later read for ever)."""
    from flexlab.engine.cache import CacheStore
    from flexlab.engine.tiers import BufferPool

    # A lost buffer would make a later read wait for ever: fail instead.
    monkeypatch.setattr(BufferPool, "timeout", 30)
    free_at_close = []
    original = CacheStore.close

    def close(self):
        if self.pool is not None:
            free_at_close.append((self.pool.free, self.pool.count))
        original(self)

    monkeypatch.setattr(CacheStore, "close", close)
    with flexlab.Engine(model, policy) as engine:
        engine.generate(PROMPTS, max_new_tokens=4)
    assert free_at_close and all(free == count for free, count in free_at_close)


def test_a_failing_transfer_surfaces_and_leaves_nothing_behind(model, tmp_path, monkeypatch):
    from flexlab.engine.store import WeightStore

    def broken(self, stage):
        raise OSError("disk went away")

    policy = Policy.from_percent([0, 0, 0, 0, 0, 0], gpu_batch_size=2, num_gpu_batches=2)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        monkeypatch.setattr(WeightStore, "load", broken)
        with pytest.raises(OSError, match="disk went away"):
            engine.generate(PROMPTS, max_new_tokens=3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_memory_tier_weights_are_copies_and_the_checkpoint_is_never_mapped(tiny_dir, tmp_path):
    """A tensor mapped from the checkpoint is page cache: under a memory limit the kernel may drop
    it and read it back by page faults in the middle of a compute, or squeeze everything else
    to keep it, and while a copy is taken the map's pages count beside the copy. Weights are read
    from a safetensors checkpoint into tensors of their own: the file is never mapped."""
    # A private copy of the checkpoint: models of other tests, built from the shared directory,
    # must not be what the maps are checked against.
    own = shutil.copytree(tiny_dir, tmp_path / "checkpoint")
    model = flexlab.Model.from_pretrained(own, dtype=torch.float32)
    assert model.weights.get("decoder.embed_tokens.weight").shape[0] == model.config.vocab_size
    assert not [line for line in open("/proc/self/maps") if str(own) in line]
    with flexlab.Engine(model, Policy.from_percent([30, 70, 100, 0, 100, 0], gpu_batch_size=2)) as engine:
        assert [w for w in engine.weights.placed.values() if w.tier != "disk"]
        assert not [line for line in open("/proc/self/maps") if str(own) in line]
        assert (
            engine.generate([[2, 5, 6]], max_new_tokens=2).token_ids
            == model.generate([[2, 5, 6]], max_new_tokens=2).token_ids
        )


@pytest.mark.parametrize(
    "policy",
    [Policy(gpu_batch_size=6), Policy.from_percent([0, 50, 0, 100, 0, 100], gpu_batch_size=3, num_gpu_batches=2)],
    ids=["resident", "offloaded"],
)
def test_every_layer_gets_the_positions_the_embedding_got(tiny_dir, policy):
    """The family seam: ``attention_qkv`` receives each token's position (rotary embeddings need
    them in every layer), the same the embedding got, left padding included."""
    import dataclasses

    model = flexlab.Model.from_pretrained(tiny_dir, dtype=torch.float32)
    calls = []  # in order: ("embed" | "qkv", positions)
    family = model.family

    def embed(w, cfg, ids, positions):
        calls.append(("embed", positions.tolist()))
        return family.embed(w, cfg, ids, positions)

    def attention_qkv(w, cfg, h, positions, length):
        calls.append(("qkv", positions.tolist()))
        return family.attention_qkv(w, cfg, h, positions, length)

    model.family = dataclasses.replace(family, embed=embed, attention_qkv=attention_qkv)
    with flexlab.Engine(model, policy) as engine:
        engine.generate(PROMPTS[:6], max_new_tokens=3, stop_token_ids=None)
    # Per block and token, every batch embeds, then each layer computes the batches in turn.
    groups, checked = [], 0
    for kind, positions in calls:
        if kind == "embed" and (not groups or groups[-1][1]):
            groups.append(([], []))
        groups[-1][0 if kind == "embed" else 1].append(positions)
    for embedded, layers in groups:
        assert len(layers) == model.config.num_layers * len(embedded)
        for i, positions in enumerate(layers):
            assert positions == embedded[i % len(embedded)]
            checked += len(positions)  # sequences in the batch
    assert checked == model.config.num_layers * 6 * 3  # every sequence, layer and token
    assert any(-1 in row for _, p in calls for row in p)  # left padding was there to get right


def test_generate_shows_progress_over_the_new_tokens(capsys):
    model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    with flexlab.Engine(model, flexlab.Policy(gpu_batch_size=2, num_gpu_batches=2)) as engine:
        out = engine.generate([[2, 5]] * 6, max_new_tokens=4, stop_token_ids=None, progress=True)
        assert re.findall(r"(\d+)/24", capsys.readouterr().err)[-1] == "24"
        stopped = engine.generate(
            [[2, 5], [2, 6, 7]], max_new_tokens=6, stop_token_ids=[out.token_ids[0][1]], progress=True
        )
    counted = int(re.findall(r"(\d+)/12", capsys.readouterr().err)[-1])
    assert counted == sum(map(len, stopped.token_ids)) < 12  # tokens made, not steps run
    from flexlab import distributed

    with pytest.raises(TypeError, match="no progress bar"):  # refused before any process starts
        distributed.generate(model, [[2, 5]], stages=2, progress=True)
