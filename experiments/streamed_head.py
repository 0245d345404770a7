"""What streaming the head's matrix costs and saves: every weight on disk, the same sequences as
one GPU batch and as two of half the size, each with the head streaming its vocabulary matrix a
slice at a time (``flexlab.engine.placement.streams_rows``; with two batches one pass over the
slices answers both), and as two batches with the head loading the matrix whole (streaming turned
off in that process by patching ``flexlab.engine.store.head_streams``: there is no option for it).

The preset's random weights are saved as a safetensors checkpoint in the compute dtype (read in
place, so that placing the weights does not decide the peak), then each case runs in a fresh
process, alternating, ``rounds`` times: throughput, the engine's tracked peak and the process's
peak resident memory (VmHWM). Prints a table, writes CSV + JSON.

    python experiments/streamed_head.py                     # bloom-1b7-shaped (a 1 GB tied table): ~6 min
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from _common import cpu_dtype, parse_config, write_results

RUN = """
import json, sys, time, torch, flexlab
from flexlab.devices import resident_bytes
ckpt, dtype, batches, seqs, prompt, new, stream = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
if not stream:  # the head loads its matrix whole
    import flexlab.engine.store
    flexlab.engine.store.head_streams = lambda *args: False
model = flexlab.Model.from_pretrained(ckpt, dtype=getattr(torch, dtype))
policy = flexlab.Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=seqs // batches, num_gpu_batches=batches)
prompts = [[2] + list(range(10, 9 + prompt))] * seqs
with flexlab.Engine(model, policy, offload_dir=ckpt + "-offload") as engine:
    engine.generate(prompts[: seqs // batches], max_new_tokens=2, stop_token_ids=None)  # warm-up
    start = time.perf_counter()
    result = engine.generate(prompts, max_new_tokens=new, stop_token_ids=None)
    wall = time.perf_counter() - start
    streamed = bool(engine.weights.streamed)
tracked = sum(result.metrics[f"peak_bytes_{t}"] for t in ("gpu", "cpu"))
print(json.dumps(dict(streamed=streamed, tok_s=seqs * new / wall, tracked_GiB=tracked / 2**30,
                      peak_rss_GiB=resident_bytes(peak=True) / 2**30)))
"""


@dataclass
class Config:
    preset: str = "bloom-1b7"
    dtype: str = "auto"  # on a CPU: bfloat16 where it is native, else float32
    sequences: int = 8
    prompt_len: int = 32
    gen_len: int = 8
    rounds: int = 3
    out_dir: str = "experiments/results"


def main(cfg: Config) -> pd.DataFrame:
    import flexlab
    from flexlab.models.convert import save_checkpoint

    dtype = cpu_dtype(cfg.dtype)
    name = str(dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="flexlab-streamed-head-") as scratch:
        ckpt = Path(scratch) / "checkpoint"
        save_checkpoint(flexlab.Model.from_config(cfg.preset, seed=0, dtype=dtype), ckpt, dtype=dtype)
        rows = []
        for r in range(cfg.rounds):
            for batches, stream in ((1, 1), (2, 1), (2, 0)):  # alternating: a slow minute of the disk falls on all
                shape = (batches, cfg.sequences, cfg.prompt_len, cfg.gen_len, stream)
                args = [str(ckpt), name, *map(str, shape)]
                out = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, check=True)
                row = dict(round=r + 1, gpu_batches=batches, **json.loads(out.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(row, flush=True)
    df = pd.DataFrame(rows)
    table = df.groupby(["gpu_batches", "streamed"]).median(numeric_only=True).drop(columns="round").reset_index()
    print(
        f"\n{cfg.preset} ({name}), every weight on disk, {cfg.sequences} sequences, prompt {cfg.prompt_len}, "
        f"{cfg.gen_len} new; medians of {cfg.rounds} rounds"
    )
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    write_results(df, cfg, f"streamed_head_{cfg.preset}_{name}", table=table.to_dict("records"))
    return table


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
