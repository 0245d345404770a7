"""Which checkpoints the engine reads in place and which it converts once when placing (see
:func:`flexlab.engine.placement.reads_in_place`), and that either way it computes the same."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

import flexlab
from flexlab import Policy
from flexlab.cost import CostModel, checkpoint_itemsize, get_hardware
from flexlab.models.convert import save_checkpoint

PROMPTS = [[2, 11, 12, 13, 14, 15], [2, 40, 41, 42, 43, 44]] * 4  # one length: the cost model assumes equal prompts


def test_a_cpu_converts_a_checkpoint_of_another_dtype_of_one_size_once(tmp_path, monkeypatch):
    """A float16 or float32 checkpoint computed in bfloat16 on a CPU: its disk weights are
    converted when placed, into the engine's files, not on every read beside the maths. It
    computes exactly what a bfloat16 checkpoint of the same values read in place does, and the
    cost model prices what the engine does. Into float32 (a wider dtype) the weights are still
    read in place, and converted on each read into buffers of their own."""
    random = flexlab.Model.from_config("opt-tiny", seed=0)
    save_checkpoint(random, tmp_path / "f16", dtype=torch.float16)
    save_checkpoint(random, tmp_path / "f32", dtype=torch.float32)
    as_bf16 = flexlab.Model.from_pretrained(tmp_path / "f16", dtype=torch.bfloat16, device="cpu")
    save_checkpoint(as_bf16, tmp_path / "bf16", dtype=torch.bfloat16)  # the same values, stored as computed
    policy = Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2)
    cpu_only = get_hardware("h100").replace(link_pinned_bw=float("inf"), link_pageable_bw=float("inf"))
    runs = {}
    stored = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
    for ckpt, dtype in (
        ("f16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("f32", torch.bfloat16),
        ("f16", torch.float32),
    ):
        model = flexlab.Model.from_pretrained(tmp_path / ckpt, dtype=dtype, device="cpu")
        with flexlab.Engine(model, policy, offload_dir=tmp_path / f"off-{ckpt}-{dtype}") as engine:
            own = list((engine.offload_dir / "weights").iterdir())
            in_place = any(path.is_relative_to(tmp_path / ckpt) for path, _, _ in engine.weights.disk_reads())
            result = engine.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None)
            runs[ckpt, dtype] = result.token_ids, engine.score(PROMPTS)
        converted = stored[ckpt] != dtype and stored[ckpt].itemsize >= dtype.itemsize  # same size, or narrower
        assert (bool(own), in_place) == (converted, not converted), (ckpt, dtype)
        assert (checkpoint_itemsize(model) is None) == converted
        assert result.token_ids == model.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None).token_ids
        kw = dict(prompt_len=6, gen_len=4, itemsize=dtype.itemsize, num_prompts=len(PROMPTS))
        pred = CostModel(model.config, policy, cpu_only, checkpoint_itemsize=checkpoint_itemsize(model), **kw).predict()
        for tier in ("gpu", "cpu", "disk"):  # into float32: converted on each read, into conversion buffers
            assert pred.peak_bytes[tier] == result.metrics[f"peak_bytes_{tier}"], (ckpt, dtype, tier)
    (tokens, scores), (same_tokens, same_scores) = runs["f16", torch.bfloat16], runs["bf16", torch.bfloat16]
    assert tokens == same_tokens
    assert all(torch.equal(a, b) for a, b in zip(scores, same_scores))
    # the copy needs disk space; without it the refusal says what the space is for, and the way out
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10**9, 0, 1000))
    with pytest.raises(
        flexlab.OffloadError, match=r"converted once from the checkpoint's float16 to bfloat16.*--dtype"
    ):
        flexlab.Engine(as_bf16, policy, offload_dir=tmp_path / "full")


def test_the_cost_model_charges_the_lane_each_element_a_cpu_converts(tmp_path, monkeypatch):
    """A float16 checkpoint computed in float32 on a CPU is converted on every read, after it, on
    the weight lane (its loads, and a streamed head's slices): the model charges that lane the
    elements the engine converts, at the
    profile's rate (a fifth of opt-1.3b's lane time here, 2026-12-07), and nothing where the
    checkpoint is read as stored."""
    from flexlab.engine.store import WeightStore
    from flexlab.engine.table_rows import HeadStream

    random = flexlab.Model.from_config("opt-tiny", seed=0)
    save_checkpoint(random, tmp_path / "f16", dtype=torch.float16)
    policy = Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2)
    cpu_only = get_hardware("h100").replace(link_pinned_bw=float("inf"), link_pageable_bw=float("inf"))
    as_weight, converted = WeightStore._as_weight, [0]

    def counting(self, raw, loc, dtype, into=None):
        converted[0] += 0 if into is None else into.numel()
        return as_weight(self, raw, loc, dtype, into)

    def counting_slices(self, rows, slot):  # the head's matrix, streamed: converted slice by slice
        out = read(self, rows, slot)
        converted[0] += out[0].numel() if self.loc.dtype != self.dtype else 0
        return out

    read = HeadStream.read
    monkeypatch.setattr(WeightStore, "_as_weight", counting)
    monkeypatch.setattr(HeadStream, "read", counting_slices)
    for dtype in (torch.float32, torch.bfloat16):
        model = flexlab.Model.from_pretrained(tmp_path / "f16", dtype=dtype, device="cpu")
        with flexlab.Engine(model, policy, offload_dir=tmp_path / f"off-{dtype}") as engine:
            converted[0] = 0
            engine.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None)
        kw = dict(prompt_len=6, gen_len=4, itemsize=dtype.itemsize, num_prompts=len(PROMPTS))
        disk_s = [
            sum(row["disk_s"] for row in pred.stages)
            for rate in (2e9, float("inf"))
            for pred in [
                CostModel(
                    model.config,
                    policy,
                    cpu_only.replace(convert_elems=rate),
                    checkpoint_itemsize=checkpoint_itemsize(model),
                    **kw,
                ).predict()
            ]
        ]
        assert (converted[0] > 0) == (dtype == torch.float32)  # bfloat16: converted once, into its own files
        assert disk_s[0] - disk_s[1] == pytest.approx(converted[0] / 2e9, rel=1e-9)
