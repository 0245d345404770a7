"""Why one memory row cannot be predicted within 10%: glibc's retained heap, mode by mode.

``validate_memory.py``'s long-prompt row (opt-125m, prompt 1024, batch 16, weights on disk) peaks
at very different resident sizes from one fresh process to the next with glibc's default
allocator. This runs one row ``repeats`` times per allocator mode, each in a fresh process, and
reports per run its peak resident memory (VmHWM), what malloc had handed out at its largest
(``mallinfo2``: heap blocks in use plus mmapped blocks, polled every half millisecond), the free
heap glibc held at that moment, and the run's time:

* ``default``: glibc as it comes (the mmap threshold rises to 32 MiB as large blocks are freed);
* ``fixed16``: ``M_MMAP_THRESHOLD`` fixed at 16 MiB (and ``M_TRIM_THRESHOLD`` at 32 MiB), so blocks
  above it always go back to the system when freed;
* ``lean``: :func:`flexlab.engine.footprint.lean_allocator` (1 MiB), which the engine switches to
  when memory is tight;
* a mode with ``+thp`` (``default+thp``, ``lean+thp``): the same, with torch's large CPU tensors on
  transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, which torch reads before its first
  allocation, so only a process's environment can set it): a fresh 2 MiB page per fault instead of
  a 4 KiB one, where the kernel allows it (``/sys/kernel/mm/transparent_hugepage/enabled``).

    python experiments/allocator_modes.py                          # ~6 min here
    python experiments/allocator_modes.py --row "prompt 512" --repeats 2
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch

MODES = ("default", "fixed16", "lean")  # each also with "+thp"


@dataclass
class Config:
    row: str = "prompt 1024, batch 16"  # a row of validate_memory.ROWS
    repeats: int = 4
    modes: str = ",".join(MODES)
    gen_len: int = 8
    out_dir: str = "experiments/results"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def worker(job: dict) -> dict:
    """One run in this fresh process: set the mode, run the row, report peaks and time."""
    from validate_memory import ROWS, _policy, _shape

    import flexlab
    from flexlab.devices import resident_bytes
    from flexlab.engine.footprint import lean_allocator

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    mode = job["mode"].removesuffix("+thp")  # the parent set THP_MEM_ALLOC_ENABLE for "+thp"
    if mode == "lean":
        lean_allocator()
    elif mode == "fixed16":
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the trim threshold's rise)
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    preset, layers, percent, extra, prompt, batch, _ = ROWS[job["row"]]
    model = flexlab.Model.from_config(_shape(preset, layers), seed=0, dtype=torch.bfloat16)
    policy = _policy(percent, extra, batch)
    vocab = model.config.vocab_size
    prompts = [
        [2] + [4 + (i * 7919 + j * 31) % (vocab - 4) for j in range(prompt - 1)] for i in range(batch[0] * batch[1])
    ]
    peak = dict(handed_out=0, heap_free=0)
    done = threading.Event()

    def poll() -> None:  # the GIL is free while torch computes, so this samples inside the maths
        while not done.wait(0.0005):
            m = libc.mallinfo2()
            if m.uordblks + m.hblkhd > peak["handed_out"]:
                peak.update(handed_out=m.uordblks + m.hblkhd, heap_free=m.fordblks)

    with flexlab.Engine(model, policy) as engine:
        before = resident_bytes()
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        start = time.perf_counter()
        result = engine.generate(prompts, max_new_tokens=job["gen"], stop_token_ids=None)
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
    tracked = result.metrics["peak_bytes_gpu"] + result.metrics["peak_bytes_cpu"]
    return dict(vmhwm=resident_bytes(peak=True), before=before, tracked=tracked, seconds=seconds, **peak)


def main(cfg: Config):
    import pandas as pd

    from flexlab import hugepages

    from _common import write_results

    rows = []
    modes = [m for m in cfg.modes.split(",") if m]
    unknown = [m for m in modes if m.removesuffix("+thp") not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}, each optionally with +thp")
    for repeat in range(cfg.repeats):
        for mode in modes:  # alternated, so that the machine's drift falls on every mode alike
            job = dict(row=cfg.row, mode=mode, gen=cfg.gen_len)
            env = {k: v for k, v in os.environ.items() if k != hugepages.VARIABLE}
            if mode.endswith("+thp"):
                env[hugepages.VARIABLE] = "1"
            out = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(job)],
                capture_output=True,
                text=True,
                timeout=900,
                env=env,
            )
            if out.returncode != 0:
                raise RuntimeError(f"{mode} failed:\n{out.stderr[-2000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            mib = {k: v / 2**20 for k, v in got.items() if k != "seconds"}
            rows.append(
                dict(
                    mode=mode,
                    repeat=repeat,
                    peak_resident_MiB=mib["vmhwm"],
                    malloc_handed_out_MiB=mib["handed_out"],
                    free_heap_at_that_MiB=mib["heap_free"],
                    tracked_MiB=mib["tracked"],
                    seconds=got["seconds"],
                )
            )
            free, took = mib["heap_free"], got["seconds"]
            print(f"{mode} #{repeat}: peak {mib['vmhwm']:.0f} MiB, free heap {free:.0f}, {took:.1f} s")
    df = pd.DataFrame(rows)
    table = df.groupby("mode", sort=False).agg(
        runs=("seconds", "size"),
        peak_min_MiB=("peak_resident_MiB", "min"),
        peak_max_MiB=("peak_resident_MiB", "max"),
        free_heap_max_MiB=("free_heap_at_that_MiB", "max"),
        median_s=("seconds", "median"),
    )
    table["time_vs_default"] = table.median_s / table.median_s.get("default", float("nan"))
    print(f"\n{cfg.row}:\n{table.to_string(float_format=lambda x: f'{x:.2f}' if x < 10 else f'{x:.0f}')}")
    slug = re.sub(r"[^a-z0-9]+", "-", cfg.row.lower()).strip("-")
    write_results(df, cfg, f"allocator_modes_{slug}", row=cfg.row, summary=table.reset_index().to_dict("records"))
    return df


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        from _common import parse_config

        main(parse_config(Config, __doc__))
