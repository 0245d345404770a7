"""A head whose vocabulary matrix lies on disk, run with one GPU batch on a CPU, reads it a slice
of rows at a time inside its compute (:func:`flexlab.engine.placement.streams_rows`) instead of
loading it whole into a read buffer of its size: the same tokens and scores as transformers, for
tied tables and untied heads (with a bias: CodeGen), the bytes and peaks the cost model predicts,
and no buffer of the matrix's size."""

from __future__ import annotations

import pytest
import torch

import flexlab
from flexlab import Policy
from flexlab.cost import CostModel, checkpoint_itemsize, get_hardware
from flexlab.engine.placement import HEAD_BUFFERS, HEAD_SLICE
from flexlab.models.convert import save_checkpoint
from tests.integration.test_exactness import hf_greedy
from tests.integration.test_families import _bloom, _codegen, _glm, randomised
from tests.integration.test_llama import NEW, PROMPTS, hf_model, hf_scores

CPU_ONLY = get_hardware("h100").replace(link_pinned_bw=float("inf"), link_pageable_bw=float("inf"))
ALL_ON_DISK = [0, 0, 100, 0, 100, 0]
SAME_LENGTH = [[1, 17, 40, 99, 5], [1, 7, 8, 9, 10]]  # the cost model's prompts are of one length

VARIANTS = {  # a tied table, an untied head, an untied head with a bias
    "llama untied": lambda: hf_model("llama", dict(num_key_value_heads=2)),
    "llama tied": lambda: hf_model("llama", dict(tie_word_embeddings=True)),
    "bloom tied": lambda: randomised(_bloom()),
    "codegen untied with a bias": lambda: randomised(_codegen()),
    "glm untied": lambda: randomised(_glm()),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = VARIANTS[request.param]()
    d = tmp_path_factory.mktemp("streamed-head")
    hf.save_pretrained(d)
    return hf, flexlab.Model.from_pretrained(d, dtype=torch.float32)


def _predicted(model, policy, prompts, new):
    return CostModel(
        model.config,
        policy,
        CPU_ONLY,
        prompt_len=len(prompts[0]),
        gen_len=new,
        itemsize=model.dtype.itemsize,
        num_prompts=len(prompts),
        checkpoint_itemsize=checkpoint_itemsize(model),
    ).predict()


def test_a_streamed_head_equals_transformers_and_the_model(pair, tmp_path):
    hf, model = pair
    policy = Policy.from_percent(ALL_ON_DISK, gpu_batch_size=len(PROMPTS))
    with flexlab.Engine(model, policy, offload_dir=tmp_path / "one") as engine:
        ((stage, head),) = engine.weights.streamed.items()
        assert head.spec.shape[0] == model.config.vocab_size
        matrix = head.nbytes
        assert engine.weights.stage_disk_bytes[stage] < matrix  # the head's load leaves the matrix out
        result = engine.generate(PROMPTS, max_new_tokens=NEW)
        assert result.token_ids == hf_greedy(hf, PROMPTS, NEW)
        stream, read, plain = engine.weights.streams[stage], [], engine.weights.streams[stage].read

        def counted(rows, slot):
            out = plain(rows, slot)
            read.append(out[1])
            return out

        stream.read = counted
        for ours, theirs in zip(engine.score(PROMPTS), hf_scores(hf, PROMPTS)):
            assert torch.allclose(ours, theirs, atol=1e-4)
        assert sum(read) == matrix  # one pass over the matrix scores the whole batch
        del stream.read
        for ours, theirs in zip(engine.score(PROMPTS, teacher_forced=True), hf_scores(hf, PROMPTS)):
            assert torch.allclose(ours, theirs, atol=1e-4)
        # the head's reads: the whole matrix once per token (one batch), a timed event of its compute
        events = result.timeline.to_pandas()
        reads = events[events.kind == "read_head"]
        assert (reads.lane == "load weight").all()
        assert (reads.groupby("token").bytes.sum() == matrix).all() and reads.token.nunique() == NEW
        measured = events.groupby("kind").bytes.sum().to_dict()
        result = engine.generate(SAME_LENGTH, max_new_tokens=3, stop_token_ids=None)
    pred = _predicted(model, policy, SAME_LENGTH, 3)
    measured = result.timeline.to_pandas().groupby("kind").bytes.sum().to_dict()
    assert pred.bytes_per_kind["read_head"] == measured["read_head"] == 3 * matrix
    for kind, value in pred.bytes_per_kind.items():
        assert value == measured.get(kind, 0), kind
    for tier in ("gpu", "cpu", "disk"):
        assert pred.peak_bytes[tier] == result.metrics[f"peak_bytes_{tier}"], tier


def test_several_batches_share_one_pass_over_a_streamed_head(pair, tmp_path):
    """With two GPU batches the head answers both in one pass over its matrix, with the second
    batch's compute: the matrix read once per token, the tokens and scores transformers'."""
    hf, model = pair
    two = Policy.from_percent(ALL_ON_DISK, gpu_batch_size=1, num_gpu_batches=2)
    with flexlab.Engine(model, two, offload_dir=tmp_path / "two") as engine:
        ((stage, head),) = engine.weights.streamed.items()
        result = engine.generate(PROMPTS[:2], max_new_tokens=NEW)
        assert result.token_ids == hf_greedy(hf, PROMPTS[:2], NEW)
        reads = result.timeline.to_pandas().query("kind == 'read_head'")
        assert (reads.groupby("token").bytes.sum() == head.nbytes).all() and (reads.batch == 1).all()
        for ours, theirs in zip(engine.score(PROMPTS[:2]), hf_scores(hf, PROMPTS[:2])):
            assert torch.allclose(ours, theirs, atol=1e-4)
        for ours, theirs in zip(engine.score(PROMPTS[:2], teacher_forced=True), hf_scores(hf, PROMPTS[:2])):
            assert torch.allclose(ours, theirs, atol=1e-4)
        result = engine.generate(SAME_LENGTH, max_new_tokens=3, stop_token_ids=None)
    pred = _predicted(model, two, SAME_LENGTH, 3)
    measured = result.timeline.to_pandas().groupby("kind").bytes.sum().to_dict()
    for kind, value in pred.bytes_per_kind.items():
        assert value == measured.get(kind, 0), kind
    for tier in ("gpu", "cpu", "disk"):
        assert pred.peak_bytes[tier] == result.metrics[f"peak_bytes_{tier}"], tier


def test_a_large_streamed_table_is_read_in_slices_and_converted_from_a_narrower_checkpoint(tmp_path):
    """opt-125m-wide (50k rows of 768: 150 MB in float32) from a float16 checkpoint, computed in
    float32: the head reads 64 MiB slices and converts each into a buffer of its own; the
    tokens are the reference path's, the peaks the model's, and the buffers a slice's."""
    shape = flexlab.get_preset("opt-125m").replace(name="opt-125m-1layer", num_layers=1)
    random = flexlab.Model.from_config(shape, seed=0, dtype=torch.float32)
    save_checkpoint(random, tmp_path / "f16", dtype=torch.float16)
    model = flexlab.Model.from_pretrained(tmp_path / "f16", dtype=torch.float32)
    policy = Policy.from_percent(ALL_ON_DISK, gpu_batch_size=2)
    with flexlab.Engine(model, policy, offload_dir=tmp_path / "off") as engine:
        (stream,) = engine.weights.streams.values()
        assert len(stream.buffers) == len(stream.converted) == HEAD_BUFFERS
        assert all(HEAD_SLICE <= b.numel() < HEAD_SLICE + 2**16 for b in stream.buffers)
        assert all(b.numel() <= 2 * HEAD_SLICE for b in stream.converted)
        result = engine.generate(SAME_LENGTH, max_new_tokens=3, stop_token_ids=None)
        scored = engine.score(SAME_LENGTH, greedy=True)
    assert result.token_ids == model.generate(SAME_LENGTH, max_new_tokens=3, stop_token_ids=None).token_ids
    for (ours, top), (lp, greedy) in zip(scored, _whole_scores(model, SAME_LENGTH)):  # over two slices
        torch.testing.assert_close(ours, lp, atol=1e-4, rtol=0)
        assert top.tolist() == greedy.tolist()
    reads = result.timeline.to_pandas().query("kind == 'read_head'")
    table = shape.vocab_size * shape.hidden_size * 2
    assert len(reads) == 3 * -(-table // HEAD_SLICE) and reads.bytes.sum() == 3 * table
    pred = _predicted(model, policy, SAME_LENGTH, 3)
    for tier in ("gpu", "cpu", "disk"):
        assert pred.peak_bytes[tier] == result.metrics[f"peak_bytes_{tier}"], tier
    # its slices are read on the weight lane, beside the compute that projects onto them
    reading = 3 * table / CPU_ONLY.disk_read_bw
    assert pred.stages[-1]["disk_s"] >= reading > pred.stages[-1]["compute_s"]


def _whole_scores(model, seqs):
    """Per sequence the log-probabilities of its tokens from the resident engine's whole head,
    and whether each is the most likely."""
    with flexlab.Engine(model, Policy(gpu_batch_size=len(seqs))) as engine:
        return engine.score(seqs, greedy=True)


def test_the_heads_wait_for_a_slice_is_an_event_of_the_compute_lane(pair, tmp_path, monkeypatch):
    """A slice not read yet when the projection needs it holds the compute up: the timeline shows
    that wait (``wait_head``, inside the head's compute), as long as the read it waited for."""
    import time

    from flexlab.engine.table_rows import HeadStream

    read = HeadStream.read

    def slow(self, rows, slot):
        time.sleep(0.02)
        return read(self, rows, slot)

    monkeypatch.setattr(HeadStream, "read", slow)
    hf, model = pair
    with flexlab.Engine(model, Policy.from_percent(ALL_ON_DISK, gpu_batch_size=2), offload_dir=tmp_path) as engine:
        result = engine.generate(PROMPTS[:2], max_new_tokens=2)
    assert result.token_ids == hf_greedy(hf, PROMPTS[:2], 2)
    events = result.timeline.to_pandas()
    waits, heads = events[events.kind == "wait_head"], events[(events.kind == "compute")]
    assert len(waits) >= 2 and (waits.duration > 0.015).all()  # each token's first slice at least
    for _, w in waits.iterrows():  # inside the head's compute of that token
        head = heads[(heads.token == w.token) & (heads.stage == w.stage)]
        assert ((head.start <= w.start) & (w.end <= head.end)).any()
    assert result.timeline.summary()["busy_s[wait_head]"] >= waits.duration.sum() * 0.99
