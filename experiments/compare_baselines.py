"""flexlab against what its users would run instead, on the same weights and prompts, in one run.

Systems: (1) `transformers` `generate` with the model in memory and no limit (run first and
again last: ratios are to the faster of the two, as a shared machine's speed drifts); (2) Hugging Face
Accelerate big-model inference (`device_map="auto"`, `max_memory`, layers beyond it offloaded to
`offload_folder` on disk) under the memory limit, at each batch size given; (3) flexlab under the
same limit with each of its policies, with and without compression. For flexlab it also reports
the bytes the run read from disk, their average rate, and the throughput those reads alone would
allow at the speed ``dd iflag=direct`` measured right before and after the run
(``disk_bound_tok_s``), and the share of the run its compute lane was busy
(``compute_busy_share``: near 1, the run was bound by compute, not the disk). Each system runs in its own
process; as root with a cgroup memory controller, that process runs in a cgroup limited to
`memory_limit_gb` (the page cache is charged to it) after the page cache is dropped, so no system
can keep a model the limit says does not fit in RAM. Without that, the table says so.

    python experiments/compare_baselines.py                 # opt-1.3b-shaped, 2 GB limit: ~15 min here
    python experiments/compare_baselines.py --memory-limit-gb 1.2
    python experiments/compare_baselines.py --preset opt-125m --memory-limit-gb 0 --accelerate-batches "" \
        --flexlab-policies "gpu-w gpu-cache 64x1"         # in memory, the same batch as transformers
    python experiments/compare_baselines.py --quick true    # opt-tiny, seconds (CI)
    python experiments/compare_baselines.py --device cuda --preset opt-13b --dtype float16 --prompt-len 512 \
        --memory-limit-gb 0 --transformers-batch 0 --accelerate-batches "1,8" --flexlab-policies "search;search4bit" \
        --work-dir /data/bench                             # the GPU scenario: 16 GB of the GPU, as on a T4

On a GPU every limited system gets ``gpu_limit_gb`` of the GPU, enforced with
``torch.cuda.set_per_process_memory_fraction`` (Accelerate is also told 85% of it in
``max_memory``); flexlab's ``search`` specs ask the cost model for the best policy under the same
limits. The checkpoint is random weights written in the dtype, one tensor at a time, and kept in
``work_dir`` for the next run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# A worker imports torch and flexlab only (pandas alone holds ~65 MiB, which would count against the
# memory limit and the runtime base the engine measures at its start): the parent imports the rest.
if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Config:
    preset: str = "opt-1.3b"
    dtype: str = "auto"  # on a CPU: bfloat16 where it is native, else float32
    prompt_len: int = 32
    gen_len: int = 32
    memory_limit_gb: float = 2.0
    transformers_batch: int = 64  # 0: no transformers row (e.g. a model that fits nowhere in full)
    accelerate_batches: str = "16,64"
    flexlab_policies: str = "disk-w cpu-cache 48x2;disk-w disk-cache 64x4;disk-w disk-cache 64x8"
    device: str = "cpu"  # "cuda": the GPU scenario (the model on the GPU, offloading to the host and disk)
    gpu_limit_gb: float = 16.0  # on cuda: GPU memory for the limited systems (a T4's 16 GB), enforced
    reserve_gb: float = 0.7  # of the memory limit, kept for Accelerate's interpreter, torch and activations
    hardware: str = ""  # for "search" specs: a profile JSON or preset (default: calibrate here, quick)
    work_dir: str = ""  # where the checkpoint (kept for the next run) and offload files go (default: a temp dir)
    quick: bool = False  # opt-tiny, tiny batches: for CI
    out_dir: str = "experiments/results"


def flexlab_policy(spec: str):
    """``"disk-w cpu-cache 64x2"``: weights on disk, cache on the cpu tier, gpu batch 64, 2 batches
    per block. Weights: ``gpu-w``, ``cpu-w``, ``disk-w``, ``half-w`` (half cpu, half disk) or
    ``cpuN-w`` (N% on the cpu tier, the rest on disk). Caches: ``cpu-cache``, ``disk-cache``,
    ``half-cache`` (half on each), and each with a ``4bit`` suffix for a 4-bit group-64 cache.
    (``"search"`` specs are resolved by :func:`searched_policy`.)"""
    import flexlab

    weights, cache, shape = spec.split()
    bs, nb = (int(x) for x in shape.split("x"))
    named = {"disk-w": [0, 0], "cpu-w": [0, 100], "half-w": [0, 50], "gpu-w": [100, 0]}
    w = named[weights] if weights in named else [0, float(weights.removeprefix("cpu").removesuffix("-w"))]
    caches = {"cpu-cache": [0, 100], "disk-cache": [0, 0], "half-cache": [0, 50], "gpu-cache": [100, 0]}
    c = caches[cache.removesuffix("4bit")]
    extra = {"compress_cache": flexlab.QuantConfig(bits=4, group_size=64)} if cache.endswith("4bit") else {}
    return flexlab.Policy.from_percent(w + c + [100, 0], gpu_batch_size=bs, num_gpu_batches=nb, **extra)


def searched_policy(spec: str, cfg: Config, hw) -> dict:
    """``"search"`` or ``"search4bit"`` (4-bit weights and cache allowed): the cost model's pick
    for the limits, as ``Policy.to_dict``. On a GPU it gets ``gpu_limit_gb`` of GPU memory and the
    memory limit for the whole process on the host; on a CPU the two tiers share that (the search
    counts the process against it). Raises FlexlabError when nothing fits."""
    import torch

    import flexlab
    from flexlab.cost import search_policy

    # the whole process's host RAM: the cost model counts the runtime, workspace and slack itself
    host = cfg.memory_limit_gb * 1e9 if cfg.memory_limit_gb > 0 else hw.cpu_memory - 4 * 2**30
    if cfg.device == "cuda":
        hw = hw.replace(gpu_memory=cfg.gpu_limit_gb * 2**30, cpu_memory=host)
    else:
        hw = hw.replace(gpu_memory=host / 2, cpu_memory=host / 2)
    compress = (None, flexlab.QuantConfig(bits=4, group_size=64)) if spec == "search4bit" else (None,)
    found = search_policy(
        flexlab.get_preset(cfg.preset),
        hw,
        prompt_len=cfg.prompt_len,
        gen_len=cfg.gen_len,
        itemsize=getattr(torch, cfg.dtype).itemsize,
        checkpoint_itemsize=getattr(torch, cfg.dtype).itemsize,  # written in the dtype, read in place
        compress=compress,
    )
    return found.policy.to_dict()


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    return [[2] + [4 + (i * 7919 + j * 31) % (vocab - 4) for j in range(length - 1)] for i in range(n)]


# ---- workers: one system, one process ------------------------------------------------------
def worker(job: dict) -> dict:
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, job["dtype"])
    ckpt = job["checkpoint"]
    cfg = json.loads(Path(ckpt, "config.json").read_text())
    batch = job["batch"]
    ids = prompts(batch, job["prompt_len"], cfg["vocab_size"])
    device = torch.device(job["device"])
    if device.type == "cuda" and job["system"] != "transformers":  # enforced, not only planned for
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, job["gpu_limit_gb"] * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        )
    start = time.perf_counter()
    extra = {}
    if job["system"] in ("transformers", "accelerate"):
        from transformers import AutoModelForCausalLM

        kw = {"device_map": {"": 0}} if device.type == "cuda" else {}
        if job["system"] == "accelerate":
            # Room for activations and the interpreter under the limits; the rest of the layers go to disk.
            limits = {"cpu": f"{job['accelerate_cpu_gb']:.2f}GiB"}
            if device.type == "cuda":  # room for activations and the CUDA context in the GPU's share
                limits[0] = f"{job['gpu_limit_gb'] * 0.85:.2f}GiB"
            kw = dict(device_map="auto", max_memory=limits, offload_folder=job["offload_dir"], offload_state_dict=True)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, **kw)
        x = torch.tensor(ids, device=device)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=job["gen_len"],
                min_new_tokens=job["gen_len"],
                do_sample=False,
                pad_token_id=1,
            )
        tokens = (out.shape[1] - x.shape[1]) * batch
        policy = (
            "in memory"
            if job["system"] == "transformers"
            else f"device_map auto, cpu {job['accelerate_cpu_gb']:.2f} GiB + disk"
        )
    else:
        import flexlab

        model = flexlab.Model.from_pretrained(ckpt, dtype=dtype, device=device)
        policy = flexlab.Policy.from_dict(job["policy_dict"]) if "policy_dict" in job else flexlab_policy(job["policy"])
        with flexlab.Engine(model, policy, offload_dir=job["offload_dir"]) as engine:
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            before = engine.files.read_bytes
            result = engine.generate(ids, max_new_tokens=job["gen_len"], stop_token_ids=None)
            extra["disk_read_GB"] = (engine.files.read_bytes - before) / 1e9
            # Share of the run the compute lane was busy: near 1, the run is bound by compute (the
            # disk kept up); well below, by the disk (or by waiting on something else).
            summary = result.timeline.summary()
            extra["compute_busy_share"] = summary["compute_busy_s"] / summary["wall_s"]
        tokens = sum(map(len, result.token_ids))
        policy = policy.describe()
    seconds = time.perf_counter() - start
    return dict(
        system=job["system"],
        batch=batch,
        policy=policy,
        throughput_tok_s=tokens / seconds,
        seconds=seconds,
        load_s=load_s,
        tokens=tokens,
        **extra,
    )


# ---- the parent: memory limits and the table ----------------------------------------------
def run_job(job: dict, limit_bytes: int | None) -> dict:
    from _common import cgroup_for, drop_page_cache

    cgroup, note = cgroup_for(limit_bytes)
    dropped = drop_page_cache()
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    # A full run takes half an hour: say what is running now.
    print(
        f"[{time.strftime('%H:%M:%S')}] {job['system']} batch {job['batch']} {job.get('policy', '')}",
        file=sys.stderr,
        flush=True,
    )
    if cgroup is not None:
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    peak = float("nan")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    finally:
        if cgroup is not None:
            for name in ("memory.max_usage_in_bytes", "memory.peak"):  # v1, v2: page cache included
                if (cgroup / name).exists():
                    peak = int((cgroup / name).read_text()) / 1e9
            time.sleep(0.2)
            try:
                cgroup.rmdir()
            except OSError:
                pass
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["killed"]
        oom = done.returncode in (-9, 137)
        return dict(
            system=job["system"],
            batch=job["batch"],
            policy=job.get("policy", ""),
            throughput_tok_s=float("nan"),
            error="out of memory under the limit" if oom else tail[0],
            memory=note,
            page_cache_dropped=dropped,
            peak_memory_gb=peak,
        )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(memory=note, page_cache_dropped=dropped, peak_memory_gb=peak)
    return row


def plot_baselines(df: pd.DataFrame, title: str):
    """Bars per system and batch (flexlab: its policy spec), from the results table."""
    import pandas as pd

    from flexlab.viz import plot_throughput

    def label(row) -> str:
        if row.system == "transformers":
            where = "in memory, again" if "again" in str(row.policy) else "in memory"
        else:
            where = "limit"
        if isinstance(row.get("error"), str):  # a bar of 0 that says why
            where += ", failed: " + row.error[:40]
        spec = row.spec if isinstance(row.get("spec"), str) else ""
        return " ".join(x for x in (row.system, f"b{row.batch}", spec, f"({where})") if x)

    return plot_throughput(
        pd.DataFrame(
            {"policy": [label(r) for _, r in df.iterrows()], "throughput_tok_s": df.throughput_tok_s.fillna(0)}
        ),
        title=title,
    )


def make_checkpoint(cfg: Config, directory: Path) -> Path:
    """Random weights (seed 0) in ``cfg.dtype``, written one tensor at a time as safetensors that
    every system loads (no float32 copy of the model is ever built, so any size fits)."""
    import torch

    import flexlab
    from flexlab.models.convert import save_checkpoint

    path = directory / f"{cfg.preset}-{cfg.dtype}"
    if not (path / "config.json").exists():
        save_checkpoint(flexlab.Model.from_config(cfg.preset, seed=0), path, dtype=getattr(torch, cfg.dtype))
    return path


def main(cfg: Config) -> pd.DataFrame:
    import pandas as pd

    from flexlab import Policy
    from flexlab.cost import calibrate, get_hardware
    from flexlab.errors import FlexlabError

    from _common import cpu_dtype, dd_direct_bandwidth, write_results

    cfg.dtype = str(cpu_dtype(cfg.dtype)).removeprefix("torch.")  # named once: the jobs and the results say it
    if cfg.quick:
        cfg.preset, cfg.prompt_len, cfg.gen_len, cfg.transformers_batch = "opt-tiny", 8, 4, 4
        cfg.accelerate_batches, cfg.memory_limit_gb = "4", 0.0
        cfg.flexlab_policies = "disk-w cpu-cache 2x2;disk-w cpu-cache4bit 2x2;search"
    Path(cfg.work_dir or ".").mkdir(parents=True, exist_ok=True)  # made if missing: it keeps the checkpoint
    with tempfile.TemporaryDirectory(prefix="flexlab-baselines-", dir=cfg.work_dir or None) as work:
        work = Path(work)
        ckpt = make_checkpoint(cfg, Path(cfg.work_dir) if cfg.work_dir else work)  # kept there for the next run
        limit = int(cfg.memory_limit_gb * 1e9) if cfg.memory_limit_gb > 0 else None
        base = dict(
            checkpoint=str(ckpt),
            dtype=cfg.dtype,
            prompt_len=cfg.prompt_len,
            gen_len=cfg.gen_len,
            offload_dir=str(work),
            device=cfg.device,
            gpu_limit_gb=cfg.gpu_limit_gb,
        )
        rows = [
            run_job({**base, "system": "transformers", "batch": cfg.transformers_batch}, None)
            for _ in range(cfg.transformers_batch > 0)
        ]  # 0: no transformers row
        # Accelerate gets the limit less the reserve; without a limit, its host share is most of the RAM.
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        acc_gb = max(0.1, cfg.memory_limit_gb - cfg.reserve_gb) / 1.074 if cfg.memory_limit_gb > 0 else 0.8 * ram_gib
        for b in (int(x) for x in cfg.accelerate_batches.split(",") if x.strip()):  # "": no Accelerate runs
            rows.append(run_job({**base, "system": "accelerate", "batch": b, "accelerate_cpu_gb": acc_gb}, limit))
        probe_mb = 16 if cfg.quick else 1024
        dd_before = dd_direct_bandwidth(work, probe_mb)
        hw = None
        for spec in cfg.flexlab_policies.split(";"):
            job = {**base, "system": "flexlab", "policy": spec}
            if spec.startswith("search"):
                hw = hw or (get_hardware(cfg.hardware) if cfg.hardware else calibrate(quick=True, offload_dir=work))
                try:
                    job["policy_dict"] = searched_policy(spec, cfg, hw)
                except FlexlabError as e:  # nothing fits: a row that says so, and on to the next system
                    rows.append(
                        dict(
                            system="flexlab",
                            batch=0,
                            policy="",
                            throughput_tok_s=float("nan"),
                            error=f"search: {e}",
                            spec=spec,
                        )
                    )
                    continue
                job["batch"] = job["policy_dict"]["gpu_batch_size"] * job["policy_dict"]["num_gpu_batches"]
            else:
                job["batch"] = flexlab_policy(spec).block_size
            row = run_job(job, limit)
            if "policy_dict" in job and "error" in row:  # say which policy the search chose
                row["policy"] = Policy.from_dict(job["policy_dict"]).describe()
            dd_after = dd_direct_bandwidth(work, probe_mb)  # the disk's speed swings: probe on both sides
            rows.append({**row, "spec": spec, "dd_before_GB_s": dd_before, "dd_after_GB_s": dd_after})
            dd_before = dd_after
        if cfg.transformers_batch and not cfg.quick:  # again at the end: the machine's speed drifts too
            again = run_job({**base, "system": "transformers", "batch": cfg.transformers_batch}, None)
            rows.append({**again, "policy": "in memory, again after the others"})
    df = pd.DataFrame(rows)
    best_accelerate = df[df.system == "accelerate"].throughput_tok_s.max()
    in_memory = df[df.system == "transformers"].throughput_tok_s.max()  # the faster of its runs: no flattery
    df["vs_accelerate"] = df.throughput_tok_s / best_accelerate
    df["vs_transformers_in_memory"] = df.throughput_tok_s / in_memory
    if "disk_read_GB" in df:  # the most a run that reads these bytes can reach at dd's speed
        df["disk_read_GB_s"] = df.disk_read_GB / df.seconds  # averaged over the whole run
        bound = df.tokens / (df.disk_read_GB / ((df.dd_before_GB_s + df.dd_after_GB_s) / 2))
        df["disk_bound_tok_s"] = bound.where(df.disk_read_GB > 0)  # nothing read: no bound
    # How the limited systems were held (the in-memory transformers rows have no limit).
    memory = next((r["memory"] for r in rows if r["system"] != "transformers"), "no limit")
    print(
        f"{cfg.preset} ({cfg.dtype}), prompt {cfg.prompt_len}, gen {cfg.gen_len}, limit "
        f"{cfg.memory_limit_gb or 'none'} GB: {memory}"
    )
    cols = [
        c
        for c in (
            "system",
            "batch",
            "policy",
            "throughput_tok_s",
            "vs_accelerate",
            "vs_transformers_in_memory",
            "disk_read_GB",
            "disk_read_GB_s",
            "dd_before_GB_s",
            "dd_after_GB_s",
            "disk_bound_tok_s",
            "compute_busy_share",
            "peak_memory_gb",
            "error",
        )
        if c in df
    ]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    stem = f"compare_baselines_{cfg.preset}_{cfg.memory_limit_gb:g}GB" + ("_quick" if cfg.quick else "")
    out = write_results(df, cfg, stem, memory=memory)
    plot_baselines(df, f"{cfg.preset}, memory limit {cfg.memory_limit_gb:g} GB ({memory})").savefig(
        out / f"{stem}.png", dpi=110
    )
    return df


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        from _common import parse_config

        main(parse_config(Config, __doc__))
