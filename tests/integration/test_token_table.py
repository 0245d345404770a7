"""The embedding reads only the rows it looks up of a token table that is not in the compute's
memory: on disk (and, with a GPU, in host memory), instead of loading the whole table each token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flexlab
from flexlab import Policy
from flexlab.cost import CostModel, get_hardware
from flexlab.engine import placement, store
from flexlab.engine.placement import ROW_GAP, row_spans
from flexlab.models.convert import save_checkpoint

PROMPTS = [[2, 7, 9, 11, 7], [2, 300, 301, 302, 400], [2, 5, 6, 90, 91], [2, 50, 60, 70, 80]]  # of 512 ids


def test_row_spans_read_close_rows_together_within_the_buffer(monkeypatch):
    assert row_spans([3], 8) == [(3, 1)]
    assert row_spans([1, 2, 2 + ROW_GAP + 1], 8) == [(1, 2 + ROW_GAP + 1)]  # a gap of ROW_GAP rows: one read
    assert row_spans([1, 2, 2 + ROW_GAP + 2], 8) == [(1, 2), (2 + ROW_GAP + 2, 1)]  # one more: two
    monkeypatch.setattr(placement, "ROW_BUFFER", 2 * placement.ALIGN + 4 * 100)  # room for 4 rows of 100 bytes
    assert row_spans(list(range(10)), 100) == [(0, 4), (4, 4), (8, 2)]


@pytest.mark.parametrize("name", ["opt-tiny", "codegen-tiny"])  # a tied table (the head reads it too), an untied one
def test_the_embedding_reads_only_the_rows_it_looks_up(name, tmp_path):
    model = flexlab.Model.from_config(name, seed=0, dtype=torch.float32)
    expected = model.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None).token_ids
    table_bytes = model.config.vocab_size * model.config.hidden_size * 4
    policy = Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        result = engine.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None)
        assert engine.weights.row_buffer is not None and engine.weights.row_buffer.free == 1  # given back
        others = sum(w.nbytes for w in engine.weights.stage_weights[0] if w.tier == "disk") - table_bytes
    assert result.token_ids == expected
    events = result.timeline.to_pandas()
    embed = events[events.stage == 0]
    # the embedding's load brings its other weights (OPT: its positions), never the table
    assert (embed[embed.kind == "load_weight"].bytes == others).all()
    rows = embed[embed.kind == "read_rows"]
    assert len(rows) == 4 * 2  # every token, every batch
    row_bytes = model.config.hidden_size * 4
    for _, event in rows.iterrows():
        batch = int(event.batch)
        ids = {i for p in PROMPTS[2 * batch : 2 * batch + 2] for i in p} if event.token == 0 else None
        least = len(ids) * row_bytes if ids else row_bytes  # a decode token's batch: one or two rows
        assert least <= event.bytes <= table_bytes
    decode = rows[rows.token > 0]
    assert (decode.bytes <= 2 * (ROW_GAP + 1) * row_bytes).all()  # two sequences' rows, not the table


def test_rows_of_a_checkpoint_read_in_place_are_converted_and_the_buffer_bounds_each_read(tmp_path, monkeypatch):
    """A float16 safetensors table read in place, rows converted to float32; with a row buffer of
    a few rows, each read stays within it and the rows still come back right."""
    save_checkpoint(
        flexlab.Model.from_config("opt-tiny", seed=0), tmp_path / "ckpt", dtype=torch.float16, progress=False
    )
    model = flexlab.Model.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    row_bytes = model.config.hidden_size * 2  # float16 on disk
    small = 2 * placement.ALIGN + 3 * row_bytes
    monkeypatch.setattr(placement, "ROW_BUFFER", small)
    monkeypatch.setattr(store, "ROW_BUFFER", small)
    with flexlab.Engine(model, Policy.from_percent([0, 0, 100, 0, 100, 0]), offload_dir=tmp_path / "off") as engine:
        assert list((engine.offload_dir / "weights").iterdir()) == []  # nothing converted: read in place
        stage = next(iter(engine.weights.looked_up))
        ids = torch.tensor([0, 1, 2, 3, 4, 40, 41, model.config.vocab_size - 1])
        rows, moved = engine.weights.rows(stage, ids)
        table = model.weights.get("decoder.embed_tokens.weight", torch.float32)
        assert torch.equal(rows, table[ids])
        spans = row_spans(ids.tolist(), row_bytes)
        assert max(n for _, n in spans) == 3 and moved == sum(n for _, n in spans) * row_bytes == 8 * row_bytes
        assert (
            engine.generate(PROMPTS, max_new_tokens=3).token_ids == model.generate(PROMPTS, max_new_tokens=3).token_ids
        )


def test_a_compressed_table_is_read_by_rows_too_where_its_rows_are_apart(tmp_path):
    """A table compressed in groups along its rows (each row's codes and scales its own) is read
    by rows as well, and dequantized only there: the same tokens as with the same compression
    in memory. Grouped along the vocabulary, or in a CPU's own memory, it is loaded as before."""
    model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    q4 = flexlab.QuantConfig(bits=4, group_size=32)
    resident = Policy.from_percent([100, 0, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2, compress_weight=q4)
    with flexlab.Engine(model, resident, offload_dir=tmp_path) as engine:
        expected = engine.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None).token_ids
    with flexlab.Engine(model, resident.replace(w_gpu_percent=0, w_cpu_percent=0), offload_dir=tmp_path) as engine:
        assert 0 in engine.weights.looked_up
        result = engine.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None)
    assert result.token_ids == expected
    events = result.timeline.to_pandas()
    decode_rows = events[(events.kind == "read_rows") & (events.token > 0)]
    table_bytes = sum(q4.part_nbytes((model.config.vocab_size, model.config.hidden_size)))
    assert len(decode_rows) == 3 * 2 and (decode_rows.bytes < table_bytes / 8).all()
    for policy in (
        Policy.from_percent(
            [0, 0, 100, 0, 100, 0], compress_weight=flexlab.QuantConfig(bits=4, group_size=32, group_dim=0)
        ),
        Policy.from_percent([0, 100, 100, 0, 100, 0]),
    ):
        with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
            assert engine.weights.looked_up == {} and engine.weights.row_buffer is None


@pytest.mark.parametrize("overlap", [True, False])
def test_a_table_that_outweighs_the_layers_takes_one_read_buffer_not_two(tmp_path, overlap):
    """All on disk, a tied table of 4096 rows (16x a layer) is read into one buffer of its size,
    the layers into two of theirs; tokens stay exact, every buffer comes back, and the cost model
    predicts the peaks to the byte."""
    cfg = dataclasses.replace(flexlab.get_preset("bloom-tiny"), vocab_size=4096)
    model = flexlab.Model.from_config(cfg, seed=0, dtype=torch.float32)
    expected = model.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None).token_ids
    # a block of as many rows as the hidden size: the head loads the table whole (placement.head_streams)
    shape = dict(gpu_batch_size=cfg.hidden_size // 2, num_gpu_batches=2, overlap=overlap)
    policy = Policy.from_percent([0, 0, 0, 0, 100, 0], **shape)
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        assert not engine.weights.streamed
        result = engine.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None)
        largest, *rest = sorted(engine.weights.stage_disk_bytes.values(), reverse=True)
        buffers, pool = engine.weights.buffer_bytes, engine.weights.pool
        assert pool.free == pool.count == 3
    assert result.token_ids == expected
    assert largest >= cfg.vocab_size * cfg.hidden_size * 4 > 4 * rest[0]
    assert buffers == largest + 2 * rest[0]
    cpu_only = get_hardware("h100").replace(link_pinned_bw=float("inf"), link_pageable_bw=float("inf"))
    pred = CostModel(
        cfg, policy, cpu_only, prompt_len=len(PROMPTS[0]), gen_len=4, itemsize=4, num_prompts=len(PROMPTS)
    ).predict()
    for tier in ("gpu", "cpu", "disk"):
        assert pred.peak_bytes[tier] == result.metrics[f"peak_bytes_{tier}"], tier
