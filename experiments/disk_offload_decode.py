"""Disk-offloaded decode of an OPT-1.3B-shaped model: is the disk read hidden, and at what bandwidth?

All weights live on disk (random weights, converted once into the offload directory) and are
read with O_DIRECT, so the page cache cannot make the disk look fast. From the timeline of the
decode tokens (prefill excluded) it reports decode time against max(total disk-read time, total
compute time) — overlap at its best makes the two equal — and the achieved disk read bandwidth
against what ``dd iflag=direct`` reads from the same disk in the same run. The same policy with
``overlap=False`` runs beside it for the ratio.

A shared virtual disk's speed swings by 2x within minutes, so one ``dd`` at the start says little
about a run a minute later: ``dd`` runs right before and right after every engine run and the run
is compared with their mean, over ``rounds`` rounds; the table ends with the median round.

    python experiments/disk_offload_decode.py                      # ~3 min on 2 CPU cores
    python experiments/disk_offload_decode.py --gpu-batch-size 32  # more compute per weight byte
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from _common import cpu_dtype, dd_direct_bandwidth, parse_config, write_results


@dataclass
class Config:
    preset: str = "opt-1.3b"
    gpu_batch_size: int = 16
    num_gpu_batches: int = 4
    prompt_len: int = 16
    gen_len: int = 4  # tokens 1..gen_len-1 are decode steps
    dtype: str = "auto"  # on a CPU: bfloat16 where it is native, else float32; float16 on a GPU
    offload_dir: str = ""  # default: a temporary directory on the same disk as /tmp
    dd_mb: int = 1024  # size of the file dd reads
    rounds: int = 3  # overlapped runs, each between two dd probes (the overlap-off run: once)
    out_dir: str = "experiments/results"


def decode_stats(engine, result) -> dict:
    df = result.timeline.to_pandas()
    dec = df[df.token >= 1]
    return {
        "decode_s": dec.end.max() - dec.start.min(),
        "compute_s": dec[dec.lane == "compute"].duration.sum(),
        "weight_load_s": dec[dec.kind == "load_weight"].duration.sum(),
        "disk_bytes": dec[dec.kind == "load_weight"].bytes.sum(),
        "io_hidden_fraction": result.timeline.summary()["io_hidden_fraction"],
        "throughput_tok_s": result.metrics["throughput_tok_s"],
    }


def main(cfg: Config) -> pd.DataFrame:
    import flexlab

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cpu_dtype(cfg.dtype) if device.type == "cpu" else torch.float16
    model = flexlab.Model.from_config(cfg.preset, seed=0, dtype=dtype, device=device)
    base = Path(cfg.offload_dir or tempfile.gettempdir())
    prompts = [[2] + list(range(10, 10 + cfg.prompt_len - 1))] * (cfg.gpu_batch_size * cfg.num_gpu_batches)
    rows = []
    dd_before = dd_direct_bandwidth(base, cfg.dd_mb)
    for run, overlap in enumerate([True] * cfg.rounds + [False]):
        policy = flexlab.Policy.from_percent(
            [0, 0, 100, 0, 100, 0],
            gpu_batch_size=cfg.gpu_batch_size,
            num_gpu_batches=cfg.num_gpu_batches,
            overlap=overlap,
        )
        t0 = time.perf_counter()
        with flexlab.Engine(model, policy, offload_dir=base) as engine:
            place_s = time.perf_counter() - t0
            before = (engine.files.read_bytes, engine.files.read_seconds)
            result = engine.generate(prompts, max_new_tokens=cfg.gen_len, stop_token_ids=None)
            read_bytes = engine.files.read_bytes - before[0]
            read_s = engine.files.read_seconds - before[1]
            direct = engine.files.direct
        dd_after = dd_direct_bandwidth(base, cfg.dd_mb)
        dd = (dd_before + dd_after) / 2
        stats = decode_stats(engine, result)
        stats.update(
            round=run + 1,
            overlap=overlap,
            place_s=place_s,
            o_direct=direct,
            disk_read_GB_s=read_bytes / read_s / 1e9 if read_s else float("nan"),
            dd_before_GB_s=dd_before,
            dd_after_GB_s=dd_after,
            dd_direct_GB_s=dd,
        )
        stats["decode_vs_bound"] = stats["decode_s"] / max(stats["weight_load_s"], stats["compute_s"])
        stats["read_vs_dd"] = stats["disk_read_GB_s"] / dd
        rows.append(stats)
        dd_before = dd_after
        if run == 0 or not overlap:
            name = f"disk_offload_decode_timeline_{device.type}_overlap{int(overlap)}.json"
            result.timeline.save(Path(cfg.out_dir) / name)

    df = pd.DataFrame(rows)
    cols = [
        "round",
        "overlap",
        "decode_s",
        "weight_load_s",
        "compute_s",
        "decode_vs_bound",
        "io_hidden_fraction",
        "disk_read_GB_s",
        "dd_before_GB_s",
        "dd_after_GB_s",
        "read_vs_dd",
        "o_direct",
        "throughput_tok_s",
    ]
    print(
        f"{cfg.preset}, weights all on disk (O_DIRECT), batch {cfg.gpu_batch_size}x{cfg.num_gpu_batches}, "
        f"prompt {cfg.prompt_len}, {cfg.gen_len - 1} decode tokens, {dtype}, {device}"
    )
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    on = df[df.overlap]
    print(
        f"overlap on, median of {len(on)} rounds: decode / max(read, compute) = "
        f"{on.decode_vs_bound.median():.2f}x (target <= 1.15), disk read / dd = {on.read_vs_dd.median():.0%} "
        f"(target >= 80%; rounds: {', '.join(f'{r:.0%}' for r in on.read_vs_dd)})"
    )
    write_results(
        df,
        cfg,
        f"disk_offload_decode_{cfg.preset}_{device.type}",
        dtype=str(dtype),
        honest_disk="O_DIRECT reads (page cache bypassed)"
        if rows[0]["o_direct"]
        else "buffered reads: O_DIRECT was refused by the file system; numbers may include page-cache hits",
    )
    return df


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
