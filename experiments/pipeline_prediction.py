"""FlexGen's scaling claim put to the cost model: the searched plan on 1, 2, 4 machines.

FlexGen reports super-linear scaling with pipeline parallelism: with N GPUs a model needs N times
less memory per GPU, so less of it is offloaded. For each number of stages this searches the
fastest plan (``flexlab.cost.search_pipeline``: every stage its own machine of the given
hardware, every stage's placement searched over its share; with ``--one-machine true`` the
stages are the GPUs of one such machine, sharing its RAM, disk space, disk bandwidth and CPU) and
prints the predicted throughput and its ratio to one GPU (or why no plan fits). Predictions
only: nothing runs a model (the measured pipeline on this machine's CPU is ``pipeline_scaling.py``).

    python experiments/pipeline_prediction.py --preset opt-30b --hardware colab-t4
    python experiments/pipeline_prediction.py --preset opt-30b --hardware colab-t4 --one-machine true
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

import flexlab
from flexlab.cost import get_hardware, search_pipeline, search_policy

from _common import parse_config, write_results


@dataclass
class Config:
    preset: str = "opt-30b"
    hardware: str = "colab-t4"
    stages: str = "1,2,4"
    prompt_len: int = 512
    gen_len: int = 32
    compress: bool = False
    one_machine: bool = False  # the stages are the GPUs of one machine (else each its own machine)
    out_dir: str = "experiments/results"


def main(cfg: Config) -> None:
    config, hw = flexlab.get_preset(cfg.preset), get_hardware(cfg.hardware)
    compress = (None, flexlab.QuantConfig(bits=4, group_size=64)) if cfg.compress else (None,)
    shape = dict(prompt_len=cfg.prompt_len, gen_len=cfg.gen_len, compress=compress)
    rows, base = [], None
    for n in (int(s) for s in cfg.stages.split(",")):
        start = time.perf_counter()
        if n == 1:
            one = search_policy(config, hw, **shape)
            tok_s, bubble, what = one.prediction.throughput_tok_s, 0.0, one.policy.describe()
        else:
            try:
                found = search_pipeline(config, hw, n, one_machine=cfg.one_machine, **shape)
                tok_s, bubble, what = found.prediction.throughput_tok_s, found.prediction.bubble, found.plan.describe()
            except flexlab.FlexlabError as e:  # nothing fits a stage: a row that says why
                tok_s, bubble, what = float("nan"), float("nan"), f"nothing fits: {e}"
        base = base or tok_s
        rows.append(
            dict(
                stages=n,
                throughput_tok_s=round(tok_s, 4),
                per_stage_tok_s=round(tok_s / n, 4),
                over_one=round(tok_s / base, 2),
                bubble=round(bubble, 3),
                search_s=round(time.perf_counter() - start, 1),
                plan=what,
            )
        )
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_colwidth", 120):
        print(df.to_string(index=False))
    stem = f"pipeline_prediction_{cfg.preset}_{cfg.hardware}" + ("_compressed" if cfg.compress else "")
    stem += "_one_machine" if cfg.one_machine else ""
    out = write_results(df, cfg, stem, hardware=hw.__dict__)
    print(f"wrote {out}/{stem}.csv and .json")


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
