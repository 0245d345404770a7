"""A checkpoint stored in another dtype than the compute's, its weights on disk: what it costs.

Hugging Face checkpoints come in float16 (OPT), bfloat16 (Llama 3, Qwen, Mistral) or float32; a
CPU with native bfloat16 computes in bfloat16, one without in float32. The same random weights are
written as a safetensors checkpoint in each of those dtypes, and an engine with every weight on
disk generates from each, alternating, ``rounds`` times (median). The engine reads a checkpoint
in the compute dtype in place, and one in a narrower dtype (converting every read); one of the
same size or wider it converts once, when placing, into its own files (on a CPU:
:func:`flexlab.engine.placement.reads_in_place`). Run with an older flexlab on the path to see
what converting on every read cost. Prints a table, writes CSV + JSON.

    python experiments/checkpoint_dtype.py                      # bfloat16 here: ~4 min
    python experiments/checkpoint_dtype.py --dtype float32      # a CPU without bfloat16
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from _common import cpu_dtype, parse_config, write_results


@dataclass
class Config:
    preset: str = "opt-1.3b"
    dtype: str = "auto"  # the compute's: on a CPU bfloat16 where it is native, else float32
    stored: str = "float16,bfloat16,float32"  # the checkpoints' dtypes
    gpu_batch_size: int = 8
    num_gpu_batches: int = 4
    prompt_len: int = 32
    gen_len: int = 4
    rounds: int = 3
    work_dir: str = ""  # the checkpoints and offload files (default: the temp directory's disk)
    out_dir: str = "experiments/results"


def main(cfg: Config) -> pd.DataFrame:
    import flexlab
    from flexlab.files import owned_dir, remove
    from flexlab.models.convert import save_checkpoint

    scratch = owned_dir(Path(cfg.work_dir or tempfile.gettempdir()), "flexlab-checkpoint-dtype-")
    try:
        random = flexlab.Model.from_config(cfg.preset, seed=0, dtype=cpu_dtype(cfg.dtype))
        compute = random.dtype
        stored = [getattr(torch, name) for name in cfg.stored.split(",")]
        for dtype in stored:
            save_checkpoint(random, scratch / str(dtype), dtype=dtype)
        del random
        policy = flexlab.Policy.from_percent(
            [0, 0, 100, 0, 100, 0], gpu_batch_size=cfg.gpu_batch_size, num_gpu_batches=cfg.num_gpu_batches
        )
        prompts = [[2] + list(range(10, 10 + cfg.prompt_len - 1))] * policy.block_size
        engines = {}
        for dtype in stored:
            model = flexlab.Model.from_pretrained(scratch / str(dtype), dtype=compute)
            engines[dtype] = flexlab.Engine(model, policy, offload_dir=scratch / f"offload-{dtype}")
        rows = []
        for r in range(cfg.rounds):
            for dtype, engine in engines.items():  # alternating: a slow minute of the disk hits both
                start = time.perf_counter()
                result = engine.generate(prompts, max_new_tokens=cfg.gen_len, stop_token_ids=None)
                wall = time.perf_counter() - start
                df = result.timeline.to_pandas()
                rows.append(
                    dict(
                        checkpoint=str(dtype).removeprefix("torch."),
                        round=r + 1,
                        tok_s=policy.block_size * cfg.gen_len / wall,
                        decode_s=result.metrics["decode_s"],
                        compute_s=df[df.lane == "compute"].duration.sum(),
                        load_weight_lane_s=df[df.kind == "load_weight"].duration.sum(),
                        own_files=any((engine.offload_dir / "weights").iterdir()),
                    )
                )
                print(
                    f"  round {r + 1}: {rows[-1]['checkpoint']} checkpoint: {rows[-1]['tok_s']:.2f} tok/s", flush=True
                )
        for engine in engines.values():
            engine.close()
    finally:
        remove(scratch)
    df = pd.DataFrame(rows)
    table = df.groupby("checkpoint", sort=False).median(numeric_only=True).drop(columns="round").reset_index()
    table["own_files"] = df.groupby("checkpoint", sort=False).own_files.all().values
    print(
        f"\n{cfg.preset}, every weight on disk, compute {compute}, batch {cfg.gpu_batch_size}x{cfg.num_gpu_batches}, "
        f"prompt {cfg.prompt_len}, {cfg.gen_len} new tokens; median of {cfg.rounds} rounds "
        f"(own_files: the engine converted the checkpoint into files of its own)"
    )
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    stem = f"checkpoint_dtype_{cfg.preset}_{str(compute).removeprefix('torch.')}"
    write_results(df, cfg, stem, compute_dtype=str(compute), table=table.to_dict("records"))
    return table


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
