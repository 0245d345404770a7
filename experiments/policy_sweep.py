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

from _common import parse_config, policy_from, write_results

# name -> FlexGen's six percentages (weights gpu/cpu, cache gpu/cpu, activations gpu/cpu),
# optionally with other Policy fields
POLICIES = {
    "all on gpu": [100, 0, 100, 0, 100, 0],
    "weights 50% cpu": [50, 50, 100, 0, 100, 0],
    "weights on cpu": [0, 100, 100, 0, 100, 0],
    "weights on cpu, cache on cpu": [0, 100, 0, 100, 100, 0],
    "weights 50% disk": [0, 50, 100, 0, 100, 0],
    "weights and cache on cpu, attention on cpu": ([0, 100, 0, 100, 100, 0], {"cpu_cache_compute": True}),
    "weights on disk": [0, 0, 100, 0, 100, 0],
    "cache on disk": [100, 0, 0, 0, 100, 0],
    "weights 4-bit on disk": ([0, 0, 100, 0, 100, 0], {"compress_weight": {"bits": 4, "group_size": 64}}),
}


@dataclass
class Config:
    preset: str = "opt-125m"
    prompt_len: int = 64
    gen_len: int = 8
    gpu_batch_size: int = 8
    num_gpu_batches: int = 2
    overlap: bool = True
    repeats: int = 1  # runs per policy: the table keeps the median and the fastest/slowest
    out_dir: str = "experiments/results"


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two generations agree (float16/bfloat16 batches of other shapes
    round differently and may flip near-ties; in float32 the engine is exact, see the tests)."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def main(cfg: Config) -> pd.DataFrame:
    import flexlab
    from flexlab.eval import policy_sweep
    from flexlab.viz import plot_memory, plot_throughput

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = flexlab.Model.from_config(cfg.preset, seed=0, device=device)
    n = cfg.gpu_batch_size * cfg.num_gpu_batches
    prompts = [[2] + [10 + (i * 7 + j) % 5000 for j in range(cfg.prompt_len - 1)] for i in range(n)]
    kw = dict(max_new_tokens=cfg.gen_len, stop_token_ids=None)
    model.generate(prompts[:2], **kw)  # warm-up
    t0 = time.perf_counter()
    ref = model.generate(prompts, **kw)
    reference = dict(
        policy="reference path", throughput_tok_s=ref.metrics["throughput_tok_s"], total_s=time.perf_counter() - t0
    )
    policies = {}
    for name, spec in POLICIES.items():
        percent, extra = spec if isinstance(spec, tuple) else (spec, {})
        policies[name] = policy_from(
            percent, extra, gpu_batch_size=cfg.gpu_batch_size, num_gpu_batches=cfg.num_gpu_batches, overlap=cfg.overlap
        )
    with tempfile.TemporaryDirectory(prefix="flexlab-sweep-") as offload:
        df = policy_sweep(
            model, policies, prompts, max_new_tokens=cfg.gen_len, repeats=cfg.repeats, offload_dir=offload
        )
    df = pd.concat([pd.DataFrame([reference]), df], ignore_index=True)
    print(
        f"{cfg.preset} ({model.dtype}, {device}), {n} prompts of {cfg.prompt_len} tokens, {cfg.gen_len} new, "
        f"batch {cfg.gpu_batch_size}x{cfg.num_gpu_batches}, overlap={cfg.overlap}"
    )
    cols = [
        "policy",
        "throughput_tok_s",
        "total_s",
        "io_hidden_fraction",
        "compute_idle_fraction",
        "peak_bytes_gpu",
        "peak_bytes_cpu",
        "peak_bytes_disk",
    ]
    if cfg.repeats > 1:  # the spread of each policy's runs beside its median
        cols[2:2] = ["throughput_tok_s_min", "throughput_tok_s_max"]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    stem = f"policy_sweep_{cfg.preset}_{device.type}"
    out = write_results(
        df, cfg, stem, dtype=str(model.dtype), note="disk reads use O_DIRECT where the file system allows it"
    )
    title = f"{cfg.preset} ({model.dtype}, {device.type}), batch {cfg.gpu_batch_size}x{cfg.num_gpu_batches}"
    plot_throughput(df.fillna({"peak_bytes_gpu": 0, "peak_bytes_cpu": 0, "peak_bytes_disk": 0}), title=title).savefig(
        out / f"{stem}.png", dpi=110
    )
    plot_memory(df.iloc[1:].reset_index(drop=True), title=title).savefig(out / f"{stem}_memory.png", dpi=110)
    return df


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
