"""Pipeline scaling on one machine: one process with every core against N stages sharing the cores.

On an OPT-1.3B-shaped model with its weights on disk (a float16 safetensors checkpoint read in
place with O_DIRECT, so the page cache cannot make the disk look fast; ``--checkpoint-dtype auto``
stores it in the compute's dtype, so that reads need no conversion), the same block runs

* in one process with ``threads`` torch threads, and
* on a pipeline of ``stages`` processes, with the batches in one group (each rank reads its
  weights once per token; the ranks take turns, so each has every thread) and in ``stages``
  groups (the ranks work at once, ``threads / stages`` threads each; each reads its weights once
  per group),

side by side in one run, ``rounds`` times each (median). Reported per row: throughput and its
ratio to one process, the bubble (the share of the run each rank's compute lane stood idle, mean
over ranks), the bytes read from disk per decode token and the bound they set at the bandwidth
``dd iflag=direct`` measures on the same disk, and the compute time; beside each, the cost
model's prediction (``CostModel`` for one process, ``predict_pipeline`` for the stages) from
``calibrate()`` run here with each row's threads; the ranks share this machine's disk
(``predict_pipeline(shared_disk=True)``: ranks reading at once, each at its share of the bandwidth).

    python experiments/pipeline_scaling.py                # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from _common import dd_direct_bandwidth, parse_config, write_results


@dataclass
class Config:
    preset: str = "opt-1.3b"
    stages: int = 2
    threads: int = 2  # the machine's cores: one process gets them all, each stage its share of the ranks at work
    percent: str = "0 0 100 0 100 0"  # FlexGen's six shares: weights on disk, cache and activations in memory
    checkpoint_dtype: str = "float16"  # "auto": the compute's dtype (its weights read from disk without a conversion)
    gpu_batch_size: int = 8
    num_gpu_batches: int = 4
    prompt_len: int = 32
    gen_len: int = 4
    rounds: int = 2
    dd_mb: int = 512
    work_dir: str = ""  # the checkpoint and offload files (default: the temp directory's disk)
    hardware: str = ""  # a saved profile for every row instead of calibrating with each row's threads
    out_dir: str = "experiments/results"


def run_row(cfg: Config, model, policy, prompts, stages: int, groups: int, offload: Path) -> dict:
    import torch

    import flexlab
    from flexlab import distributed
    from flexlab.distributed import threads_per_rank  # the library's default, passed so that the row says it

    kw = dict(max_new_tokens=cfg.gen_len, stop_token_ids=None)
    start = time.perf_counter()
    if stages == 1:
        torch.set_num_threads(cfg.threads)
        with flexlab.Engine(model, policy, offload_dir=offload) as engine:
            result = engine.generate(prompts, **kw)
    else:
        result = distributed.generate(
            model,
            prompts,
            stages=stages,
            policy=policy,
            groups=groups,
            threads=threads_per_rank(cfg.threads, stages, groups),
            offload_dir=offload,
            **kw,
        )
    wall = time.perf_counter() - start
    tl = result.timeline
    df = tl.to_pandas()
    decode = df[df.token >= 1]
    tokens = max(1, cfg.gen_len - 1)
    return {
        "stages": stages,
        "groups": groups,
        "threads_each": threads_per_rank(cfg.threads, stages, groups),
        "throughput_tok_s": result.metrics["throughput_tok_s"],
        "total_s": result.metrics["total_s"],
        "wall_with_start_s": wall,
        "bubble": 1 - statistics.mean(busy_fraction(df, r) for r in tl.ranks),
        "compute_s": df[df.lane == "compute"].duration.sum(),
        "disk_GB_per_token": decode[decode.kind == "load_weight"].bytes.sum() / tokens / 1e9,
    }


def predictions(cfg: Config, model, policy, scratch: Path) -> dict[tuple[int, int], dict]:
    """Per (stages, groups): the predicted throughput and bubble, on profiles measured here."""
    import torch

    from flexlab.cost import CostModel, calibrate, checkpoint_itemsize, get_hardware, predict_pipeline
    from flexlab.distributed import threads_per_rank
    from flexlab.engine.pipeline import make_plan

    kw = dict(
        prompt_len=cfg.prompt_len,
        gen_len=cfg.gen_len,
        itemsize=model.dtype.itemsize,
        checkpoint_itemsize=checkpoint_itemsize(model),  # its disk weights are read in place, as stored
    )
    out, before = {}, torch.get_num_threads()
    profiles = {}  # per thread count: the rates calibrated with that many threads
    for threads in {threads_per_rank(cfg.threads, cfg.stages, g) for g in (1, cfg.stages)} | {cfg.threads}:
        if cfg.hardware:  # the stages' rates are then the whole machine's
            profiles[threads] = get_hardware(cfg.hardware)
            continue
        try:
            torch.set_num_threads(threads)
            profiles[threads] = calibrate(dtype=model.dtype, quick=True, offload_dir=scratch)
        finally:
            torch.set_num_threads(before)
    one = CostModel(model.config, policy, profiles[cfg.threads], **kw).predict()
    out[(1, 1)] = {"predicted_tok_s": one.throughput_tok_s, "predicted_bubble": float("nan")}
    for groups in (1, cfg.stages):
        plan = make_plan(model.config, cfg.stages, policy, groups=groups)
        share = profiles[threads_per_rank(cfg.threads, cfg.stages, groups)]
        p = predict_pipeline(model.config, plan, share, shared_disk=True, **kw)
        out[(cfg.stages, groups)] = {"predicted_tok_s": p.throughput_tok_s, "predicted_bubble": p.bubble}
    return out


def busy_fraction(df: pd.DataFrame, rank: int) -> float:
    """Share of the run a rank had compute or its own I/O going (waits for its neighbours excluded)."""
    mine = df[(df["rank"] == rank) & ~df.lane.isin(["recv", "send"])].sort_values("start")
    busy, end = 0.0, float("-inf")
    for a, b in zip(mine.start, mine.end):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / (df.end.max() - df.start.min())


def main(cfg: Config) -> pd.DataFrame:
    import torch

    import flexlab
    from flexlab.files import owned_dir, remove
    from flexlab.models.convert import save_checkpoint

    base = Path(cfg.work_dir or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)  # a --work-dir that does not exist yet is made
    scratch = owned_dir(base, "flexlab-pipeline-bench-")
    try:
        checkpoint = scratch / "checkpoint"
        compute = flexlab.Model.from_config(cfg.preset, seed=0)  # in the CPU's fast dtype
        stored = compute.dtype if cfg.checkpoint_dtype == "auto" else getattr(torch, cfg.checkpoint_dtype)
        print(f"writing a random {cfg.preset} checkpoint ({stored}) to {checkpoint} ...", flush=True)
        save_checkpoint(compute, checkpoint, dtype=stored)
        model = flexlab.Model.from_pretrained(checkpoint, dtype=compute.dtype)
        del compute  # its random weights: the run reads the checkpoint
        policy = flexlab.Policy.from_percent(
            [float(x) for x in cfg.percent.split()],
            gpu_batch_size=cfg.gpu_batch_size,
            num_gpu_batches=cfg.num_gpu_batches,
        )
        prompts = [[2] + list(range(10, 10 + cfg.prompt_len - 1))] * policy.block_size
        plans = [(1, 1), (cfg.stages, 1), (cfg.stages, cfg.stages)]
        predicted = predictions(cfg, model, policy, scratch)
        rows = []
        for r in range(cfg.rounds):
            for stages, groups in plans:  # interleaved, so a slow minute of the shared disk hits all rows
                dd_before = dd_direct_bandwidth(scratch, cfg.dd_mb)
                row = run_row(cfg, model, policy, prompts, stages, groups, scratch)
                row.update(round=r + 1, dd_GB_s=(dd_before + dd_direct_bandwidth(scratch, cfg.dd_mb)) / 2)
                row.update(predicted[(stages, groups)])
                rows.append(row)
                print(
                    f"  round {r + 1}: {stages} stage(s), {groups} group(s): {row['throughput_tok_s']:.2f} tok/s",
                    flush=True,
                )
    finally:
        remove(scratch)
    df = pd.DataFrame(rows)
    df["disk_bound_tok_s"] = policy.block_size / (df.disk_GB_per_token / df.dd_GB_s)
    table = df.groupby(["stages", "groups", "threads_each"], sort=False).median(numeric_only=True).reset_index()
    one = table.throughput_tok_s[(table.stages == 1)].iloc[0]
    table["vs_one_process"] = table.throughput_tok_s / one
    cols = ["stages", "groups", "threads_each", "throughput_tok_s", "predicted_tok_s", "vs_one_process", "bubble"]
    cols += ["predicted_bubble", "compute_s"]
    cols += ["disk_GB_per_token", "dd_GB_s", "disk_bound_tok_s"]
    print(
        f"\n{cfg.preset}, shares {cfg.percent} ({stored} checkpoint, O_DIRECT), compute {model.dtype}, batch "
        f"{cfg.gpu_batch_size}x{cfg.num_gpu_batches}, prompt {cfg.prompt_len}, {cfg.gen_len} new tokens; "
        f"median of {cfg.rounds} rounds"
    )
    print(table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    write_results(
        df,
        cfg,
        f"pipeline_scaling_{cfg.preset}_{cfg.stages}stages",
        dtype=str(model.dtype),
        table=table.to_dict("records"),
    )
    return table


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
