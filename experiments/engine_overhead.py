"""The engine's host overhead per step: what the loop costs when the maths costs nothing.

On a model too small for its maths to matter (``opt-tiny``: 2 layers of width 64), the wall time
of a generation divided by its (stage, batch) steps is the engine's own cost per step: the
schedule, the executor's hand-offs and timing, the handlers' Python. For each block shape and
placement this prints, as medians of ``repeats`` runs:

- wall time per step, and the compute handler's own time per step (the compute lane of the
  timeline: its Python and the tiny kernels);
- ``maths``: the same maths without the engine, per step: flexlab's reference path (the family's
  functions, every weight in place) on one GPU batch of prompts, times the number of batches;
- ``waits``: the compute's waits on transfers (the timeline's ``waited_s[kind]``) and on reads
  inside a compute (the embedding's rows of a table on disk, ``read_rows``; a streamed head's
  next slice, ``wait_head``);
- ``overhead = wall - maths - waits``: the host time the engine adds per step (the issue's measure);
- with weights on disk, ``beside_reads``: the same maths while a thread reads the engine's weight
  files back to back, as its load lane does. On this 2-core virtual machine work on one core slows
  tiny kernels on the other (a 512-wide matmul beside them doubled a layer norm's time), so this
  separates what the host's reads cost the maths from the engine's own ``wall - beside_reads - waits``.

``threads`` (default 1) fixes torch's threads: on a shared machine one thread's runs repeat
within a few percent, two threads' within tens. ``--profile true`` adds the torch profiler's
table of the operators' self time for the first row.

    python experiments/engine_overhead.py
    python experiments/engine_overhead.py --preset opt-125m --dtype auto    # with real maths
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import pandas as pd
import torch

import flexlab
from flexlab.engine.tiers import DiskFiles, aligned_empty

from _common import cpu_dtype, parse_config, write_results

PLACEMENTS = {
    "resident": [100, 0, 100, 0, 100, 0],
    "weights on disk": [0, 0, 100, 0, 100, 0],
    "cache on disk": [100, 0, 0, 0, 100, 0],
}
SHAPES = [(1, 1), (4, 1), (2, 4), (8, 2)]  # gpu batch size x batches


@dataclass
class Config:
    preset: str = "opt-tiny"
    dtype: str = "float32"
    prompt_len: int = 8
    gen_len: int = 32
    repeats: int = 5
    threads: int = 1
    profile: bool = False
    out_dir: str = "experiments/results"


def _maths_s(model, prompts: list[list[int]], gen_len: int, repeats: int) -> float:
    """Median seconds of the reference path over ``prompts`` (the maths alone, no engine)."""
    model.generate(prompts, max_new_tokens=2, stop_token_ids=None)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompts, max_new_tokens=gen_len, stop_token_ids=None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _maths_beside_reads_s(model, prompts: list[list[int]], gen_len: int, repeats: int, reads) -> float:
    """:func:`_maths_s` while another thread reads ``reads`` (``(file, offset, bytes)``) with
    O_DIRECT, over and over, as the engine's weight lane does."""
    stop = threading.Event()
    files, buf = DiskFiles(direct=True, io_threads=1), aligned_empty(max(n for _, _, n in reads) + 2 * 4096)

    def read_on() -> None:
        while not stop.is_set():
            for path, offset, size in reads:
                files.read(path, offset, size, buf)

    reader = threading.Thread(target=read_on, daemon=True)
    reader.start()
    try:
        return _maths_s(model, prompts, gen_len, repeats)
    finally:
        stop.set()
        reader.join()
        files.close()


def main(cfg: Config) -> None:
    torch.set_num_threads(cfg.threads)
    model = flexlab.Model.from_config(cfg.preset, seed=0, dtype=cpu_dtype(cfg.dtype))
    maths: dict[int, float] = {}  # per GPU batch size: one batch's reference seconds
    rows = []
    for (bs, nb), (where, percent) in ((s, p) for p in PLACEMENTS.items() for s in SHAPES):
        policy = flexlab.Policy.from_percent(percent, gpu_batch_size=bs, num_gpu_batches=nb)
        prompts = [[2] + [10 + (i + j) % 50 for j in range(cfg.prompt_len - 1)] for i in range(bs * nb)]
        with flexlab.Engine(model, policy) as engine:
            engine.generate(prompts, max_new_tokens=2, stop_token_ids=None)  # warm-up
            walls, computes, waits = [], [], []
            for _ in range(cfg.repeats):
                start = time.perf_counter()
                result = engine.generate(prompts, max_new_tokens=cfg.gen_len, stop_token_ids=None)
                walls.append(time.perf_counter() - start)
                events = result.timeline.events
                computes.append(sum(e.duration for e in events if e.kind == "compute"))
                summary = result.timeline.summary()
                stalls = sum(v for k, v in summary.items() if k.startswith("waited_s[") and k != "waited_s[host]")
                inside = sum(e.duration for e in events if e.lane == "compute" and e.kind in ("read_rows", "wait_head"))
                waits.append(stalls + inside)
            steps = sum(1 for e in result.timeline.events if e.kind == "compute")
            if cfg.profile and not rows:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    engine.generate(prompts, max_new_tokens=cfg.gen_len, stop_token_ids=None)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            reads = engine.weight_reads()  # while its files exist
            beside = _maths_beside_reads_s(model, prompts[:bs], cfg.gen_len, cfg.repeats, reads) if reads else None
        wall, compute = statistics.median(walls) / steps * 1e6, statistics.median(computes) / steps * 1e6
        if bs not in maths:
            maths[bs] = _maths_s(model, prompts[:bs], cfg.gen_len, cfg.repeats)
        ref, wait = nb * maths[bs] / steps * 1e6, statistics.median(waits) / steps * 1e6
        rows.append(
            dict(
                placement=where,
                block=f"{bs}x{nb}",
                steps=steps,
                wall_us_per_step=round(wall, 1),
                compute_us_per_step=round(compute, 1),
                rest_us_per_step=round(wall - compute, 1),
                maths_us_per_step=round(ref, 1),
                waits_us_per_step=round(wait, 1),
                overhead_us_per_step=round(wall - ref - wait, 1),
                beside_reads_us_per_step=round(nb * beside / steps * 1e6, 1) if beside else None,
                own_us_per_step=round(wall - nb * beside / steps * 1e6 - wait, 1) if beside else None,
                slowest_run_us_per_step=round(max(walls) / steps * 1e6, 1),
            )
        )
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    print(
        f"median wall per step: {df.wall_us_per_step.median():.0f} µs; median overhead (wall - maths - waits): "
        f"{df.overhead_us_per_step.median():.0f} µs ({cfg.threads} thread(s))"
    )
    stem = f"engine_overhead_{cfg.preset}"
    out = write_results(df, cfg, stem, torch_threads=torch.get_num_threads())
    print(f"wrote {out}/{stem}.csv and .json")


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
