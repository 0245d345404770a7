"""Throughput of one model under several placement policies, with the reference path beside them.

Each policy runs the same prompts (greedy, no early stop) after one warm-up run; the table
gives generation throughput (FlexGen's definition: new tokens over prefill + decode), peak
bytes per tier and how much of the I/O the overlap hid. CSV + JSON go to experiments/results/.

    python experiments/policy_sweep.py                                  # CPU: opt-125m, small batch
    python experiments/policy_sweep.py --preset opt-1.3b --prompt-len 512 --gen-len 32 \\
        --gpu-batch-size 32 --num-gpu-batches 4                         # a GPU
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import pandas as pd
import torch
from _common import parse_config, write_results

# name -> FlexGen's six percentages (weights gpu/cpu, cache gpu/cpu, activations gpu/cpu),
# optionally with other Policy fields
POLICIES = {
    "all on gpu": [100, 0, 100, 0, 100, 0],
    "weights 50% cpu": [50, 50, 100, 0, 100, 0],
    "weights on cpu": [0, 100, 100, 0, 100, 0],
    "weights on cpu, cache on cpu": [0, 100, 0, 100, 100, 0],
    "weights 50% disk": [0, 50, 100, 0, 100, 0],
    "weights and cache on cpu, attention on cpu": ([0, 100, 0, 100, 100, 0], {"cpu_cache_compute": True}),
}


@dataclass
class Config:
    preset: str = "opt-125m"
    prompt_len: int = 64
    gen_len: int = 8
    gpu_batch_size: int = 8
    num_gpu_batches: int = 2
    overlap: bool = True
    out_dir: str = "experiments/results"


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two generations agree (float16/bfloat16 batches of other shapes
    round differently and may flip near-ties; in float32 the engine is exact, see the tests)."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def main(cfg: Config) -> pd.DataFrame:
    import flexlab

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = flexlab.Model.from_config(cfg.preset, seed=0, device=device)
    n = cfg.gpu_batch_size * cfg.num_gpu_batches
    prompts = [[2] + [10 + (i * 7 + j) % 5000 for j in range(cfg.prompt_len - 1)] for i in range(n)]
    kw = dict(max_new_tokens=cfg.gen_len, stop_token_ids=None)
    model.generate(prompts[:2], **kw)  # warm-up
    rows = []
    t0 = time.perf_counter()
    ref = model.generate(prompts, **kw)
    rows.append(dict(policy="reference path", throughput_tok_s=ref.metrics["throughput_tok_s"],
                     seconds=time.perf_counter() - t0, token_agreement=1.0))
    with tempfile.TemporaryDirectory(prefix="flexlab-sweep-") as offload:
        for name, spec in POLICIES.items():
            percent, extra = spec if isinstance(spec, tuple) else (spec, {})
            policy = flexlab.Policy.from_percent(percent, gpu_batch_size=cfg.gpu_batch_size,
                                                 num_gpu_batches=cfg.num_gpu_batches, overlap=cfg.overlap, **extra)
            with flexlab.Engine(model, policy, offload_dir=offload) as engine:
                engine.generate(prompts[:cfg.gpu_batch_size], max_new_tokens=2, stop_token_ids=None)  # warm-up
                result = engine.generate(prompts, **kw)
            s = result.timeline.summary()
            rows.append(dict(policy=name, percent=" ".join(map(str, percent)),
                             throughput_tok_s=result.metrics["throughput_tok_s"],
                             seconds=result.metrics["total_s"],
                             io_hidden_fraction=s.get("io_hidden_fraction", 0.0),
                             compute_idle_fraction=s.get("compute_idle_fraction", 0.0),
                             token_agreement=agreement(result.token_ids, ref.token_ids),
                             **{f"peak_GiB_{t}": result.metrics[f"peak_bytes_{t}"] / 2**30
                                for t in ("gpu", "cpu", "disk")}))
    df = pd.DataFrame(rows)
    print(f"{cfg.preset} ({model.dtype}, {device}), {n} prompts of {cfg.prompt_len} tokens, {cfg.gen_len} new, "
          f"batch {cfg.gpu_batch_size}x{cfg.num_gpu_batches}, overlap={cfg.overlap}")
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    write_results(df, cfg, f"policy_sweep_{cfg.preset}_{device.type}", dtype=str(model.dtype),
                  note="disk reads use O_DIRECT where the file system allows it")
    return df


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
