"""Is the cost model right on this machine? Calibrate, predict, measure, compare.

Calibrates the machine (``flexlab.cost.calibrate``), then runs a list of policies through the
engine (all on the gpu tier, cpu and disk offload, compressed weights, compressed cache, CPU
attention, activations off the device, overlap off) and compares measured throughput and peak
memory per tier with the cost model's prediction. Finally it searches for the best policy under
memory limits below the model's size and checks the searched policy against the best of the
tried policies that fit the same limits. The disk and dequantization rates swing by 2x within
minutes on a shared machine, so they are re-probed (``flexlab.cost.refresh``, ~1 s) right before
each run; the other rates come from the one calibration. Each policy is measured ``repeats``
times, round-robin over the policies (each run in a fresh engine, after its own probe), and
compared by the medians, so that one slow minute of the machine does not decide a row; the CSV
keeps the slowest and fastest run. Writes CSV + JSON (with the hardware profile) and a
predicted-vs-measured plot to experiments/results/.

    python experiments/validate_cost_model.py                    # opt-125m, the CPU's fast dtype: ~2 min
    python experiments/validate_cost_model.py --preset opt-1.3b --prompt-len 512 --gen-len 32 \\
        --gpu-batch-size 32 --num-gpu-batches 4                  # a GPU
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from flexlab.models.registry import weight_bytes

from _common import cpu_dtype, parse_config, policy_from, write_results

Q4 = dict(bits=4, group_size=64)
# name -> FlexGen's six shares, plus other Policy fields
POLICIES = {
    "all on gpu": ([100, 0, 100, 0, 100, 0], {}),
    "weights 50% cpu": ([50, 50, 100, 0, 100, 0], {}),
    "weights 50% disk": ([50, 0, 100, 0, 100, 0], {}),
    "weights on disk": ([0, 0, 100, 0, 100, 0], {}),
    "weights on disk, overlap off": ([0, 0, 100, 0, 100, 0], {"overlap": False}),
    "cache on cpu": ([100, 0, 0, 100, 100, 0], {}),
    "cache on disk": ([100, 0, 0, 0, 100, 0], {}),
    "activations on disk": ([100, 0, 100, 0, 0, 0], {}),
    "weights 4-bit": ([100, 0, 100, 0, 100, 0], {"compress_weight": Q4}),
    "weights 4-bit on disk": ([0, 0, 100, 0, 100, 0], {"compress_weight": Q4}),
    "cache 4-bit on disk": ([100, 0, 0, 0, 100, 0], {"compress_cache": Q4}),
    "cache on cpu, cpu attention": ([100, 0, 0, 100, 100, 0], {"cpu_cache_compute": True}),
    "cache 4-bit on cpu, cpu attention": ([100, 0, 0, 100, 100, 0], {"cpu_cache_compute": True, "compress_cache": Q4}),
    "three-way split": ([30, 30, 30, 30, 100, 0], {}),
    "sparse attention 0.25, cache on disk": ([100, 0, 0, 0, 100, 0], {"attn_sparsity": 0.25}),
    "sparse attention 0.25, cache on cpu": ([100, 0, 0, 100, 100, 0], {"attn_sparsity": 0.25}),
}


@dataclass
class Config:
    preset: str = "opt-125m"
    dtype: str = "auto"  # on a CPU: bfloat16 where it is native, else float32; float16 on a GPU
    prompt_len: int = 64
    gen_len: int = 8
    gpu_batch_size: int = 8
    num_gpu_batches: int = 2
    limit_fraction: float = 0.5  # the search's gpu and cpu limits, as fractions of the weights' bytes (without a
    # GPU the two tiers are one RAM and only their sum counts: the weights' bytes plus 64 MiB for both, over the
    # runtime base). At 0.3 nothing fits opt-125m's bfloat16 run: all on disk it needs 0.45 GiB (the runtime base,
    # a read buffer of its tied table, the workspace; 0.53 all resident): 0.5 lies between.
    hardware: str = ""  # a saved profile (JSON) instead of calibrating now
    repeats: int = 3  # runs per policy (medians are compared)
    smoke: bool = False  # three policies, no search: for CI
    policies: str = ""  # only these of POLICIES, separated by ";" (default: all)
    # read the weights from a safetensors checkpoint of the random weights in this dtype (e.g. float16 with
    # --dtype float32: the engine reads it in place and converts every disk read on its lane)
    checkpoint: str = ""
    out_dir: str = "experiments/results"


def main(cfg: Config) -> pd.DataFrame:
    import flexlab
    from flexlab.cost import CostModel, calibrate, checkpoint_itemsize, fits, get_hardware, refresh, search_policy
    from flexlab.cost.search import HEADROOM
    from flexlab.models.convert import save_checkpoint
    from flexlab.viz import plot_predicted_vs_measured

    policies = dict(list(POLICIES.items())[:3]) if cfg.smoke else dict(POLICIES)
    if cfg.policies:
        chosen = [name.strip() for name in cfg.policies.split(";")]
        unknown = [name for name in chosen if name not in POLICIES]
        if unknown:
            raise SystemExit(f"--policies: unknown {unknown}; choose from {list(POLICIES)}")
        policies = {name: POLICIES[name] for name in chosen}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cpu_dtype(cfg.dtype) if device.type == "cpu" else torch.float16
    hw = get_hardware(cfg.hardware) if cfg.hardware else calibrate(device=device, dtype=dtype, quick=cfg.smoke)
    model = flexlab.Model.from_config(cfg.preset, seed=0, dtype=dtype, device=device)
    scratch = tempfile.TemporaryDirectory(prefix="flexlab-validate-checkpoint-")
    if cfg.checkpoint:
        save_checkpoint(model, Path(scratch.name), dtype=getattr(torch, cfg.checkpoint))
        model = flexlab.Model.from_pretrained(scratch.name, dtype=dtype, device=device)
    stored_itemsize = checkpoint_itemsize(model)
    n = cfg.gpu_batch_size * cfg.num_gpu_batches
    prompts = [[2] + [10 + (i * 7 + j) % 5000 for j in range(cfg.prompt_len - 1)] for i in range(n)]
    itemsize = dtype.itemsize

    def policy_of(percent, extra) -> flexlab.Policy:
        return policy_from(percent, extra, gpu_batch_size=cfg.gpu_batch_size, num_gpu_batches=cfg.num_gpu_batches)

    def predict(policy: flexlab.Policy, profile):
        return CostModel(
            model.config,
            policy,
            profile,
            prompt_len=cfg.prompt_len,
            gen_len=cfg.gen_len,
            itemsize=itemsize,
            num_prompts=n,
            checkpoint_itemsize=stored_itemsize,
        ).predict()

    def run_once(policy: flexlab.Policy, offload: str) -> tuple:
        """One measured run of ``policy`` in a fresh engine: (tok/s, prediction, probed profile, metrics).
        The metrics gain the disk rate the engine's own reads saw (NaN when it read nothing)."""
        with flexlab.Engine(model, policy, offload_dir=offload) as engine:
            engine.generate(prompts[: cfg.gpu_batch_size], max_new_tokens=2, stop_token_ids=None)  # warm-up
            # the disk timed on the engine's own weight reads where it has any (a fresh file reads faster here)
            now = refresh(hw, device=device, dtype=dtype, offload_dir=offload, reads=engine.weight_reads())
            before = engine.files.read_bytes, engine.files.read_seconds
            result = engine.generate(prompts, max_new_tokens=cfg.gen_len, stop_token_ids=None)
            read_bytes = engine.files.read_bytes - before[0]
            read_s = engine.files.read_seconds - before[1]
        metrics = dict(result.metrics, engine_disk_read_bw=read_bytes / read_s if read_s else math.nan)
        return result.metrics["throughput_tok_s"], predict(policy, now), now, metrics

    def measure_all(chosen: dict[str, flexlab.Policy], offload: str) -> list[dict]:
        """Every policy ``repeats`` times, round-robin: a slow minute of a shared machine then
        falls on one run of every policy, not on all runs of one."""
        runs: dict[str, list] = {name: [] for name in chosen}
        for r in range(max(1, cfg.repeats)):
            for name, policy in chosen.items():
                runs[name].append(run_once(policy, offload))
                print(f"round {r + 1}, {name}: {runs[name][-1][0]:.1f} tok/s", flush=True)
        return [row_of(name, chosen[name], runs[name]) for name in chosen]

    def row_of(name: str, policy: flexlab.Policy, runs: list) -> dict:
        measured = sorted(r[0] for r in runs)
        median_prediction = sorted(runs, key=lambda r: r[1].throughput_tok_s)[len(runs) // 2]
        _, pred, now, metrics = median_prediction
        row = dict(
            policy=name,
            describe=policy.describe(),
            measured_tok_s=measured[len(runs) // 2],
            measured_min_tok_s=measured[0],
            measured_max_tok_s=measured[-1],
            predicted_tok_s=pred.throughput_tok_s,
            bottleneck=pred.bottleneck,
            probed_disk_read_GB_s=now.disk_read_bw / 1e9,
            probed_dequant_G_s=now.dequant_elems / 1e9,
            probed_small_dequant_G_s=now.small_dequant_elems / 1e9,
            probed_convert_G_s=now.convert_elems / 1e9,
        )
        row["throughput_error"] = row["predicted_tok_s"] / row["measured_tok_s"] - 1
        # The probe reads the engine's weight files before the run (a fresh file without them); this host's
        # virtual disk serves recently touched data faster, so rates move between probe and run. The same
        # prediction at the rate the engine's reads saw during the run tells a wrong disk rate apart from a
        # wrong model. (Reads in flight together are summed, so that rate is a lower bound where lanes overlap.)
        engine_bw = metrics["engine_disk_read_bw"]
        row["engine_disk_read_GB_s"] = engine_bw / 1e9
        at_engine_rate = predict(policy, now.replace(disk_read_bw=engine_bw)) if engine_bw > 0 else pred
        row["predicted_at_engine_disk_rate_tok_s"] = at_engine_rate.throughput_tok_s
        row["error_at_engine_disk_rate"] = at_engine_rate.throughput_tok_s / row["measured_tok_s"] - 1
        print(f"{name}: {row['measured_tok_s']:.1f} tok/s measured, {row['predicted_tok_s']:.1f} predicted", flush=True)
        for tier in ("gpu", "cpu", "disk"):
            row[f"measured_peak_{tier}"] = metrics[f"peak_bytes_{tier}"]
            row[f"predicted_peak_{tier}"] = pred.peak_bytes[tier]
        worst = max(
            (
                abs(row[f"predicted_peak_{t}"] / row[f"measured_peak_{t}"] - 1)
                for t in ("gpu", "cpu", "disk")
                if row[f"measured_peak_{t}"]
            ),
            default=0.0,
        )
        row["peak_memory_error"] = worst
        # the process's footprint with the bytes the engine measured, for the search's comparison
        measured_peaks[name] = dataclasses.replace(
            pred.footprint, tracked={t: row[f"measured_peak_{t}"] for t in ("gpu", "cpu", "disk")}
        )
        return row

    measured_peaks: dict = {}  # filled by row_of: each row's footprint with the bytes the engine measured
    with tempfile.TemporaryDirectory(prefix="flexlab-validate-") as offload:
        rows = measure_all({name: policy_of(*spec) for name, spec in policies.items()}, offload)
        search_note, found = "not run (smoke)", None
        if not cfg.smoke:
            weights = weight_bytes(model.config, itemsize)
            # the host limit is over the process's runtime base: the search counts the whole process
            limited = hw.replace(
                gpu_memory=cfg.limit_fraction * weights + 64 * 2**20,
                cpu_memory=cfg.limit_fraction * weights + hw.runtime_base_bytes,
            )
            try:
                found = search_policy(
                    model.config,
                    limited,
                    prompt_len=cfg.prompt_len,
                    gen_len=cfg.gen_len,
                    itemsize=itemsize,
                    checkpoint_itemsize=stored_itemsize,
                    batch_sizes=(cfg.gpu_batch_size,),
                    num_batches=(cfg.num_gpu_batches,),
                    compress=(None,),
                    act_tiers=("gpu",),
                )
            except flexlab.FlexlabError as e:  # the policy table above still counts; say why the search did not
                found, search_note = None, f"search found nothing: {e}"
        if found is not None:
            rows += measure_all({"searched (limits)": found.policy}, offload)
            searched = rows[-1]["measured_tok_s"]

            def best_within(headroom: float) -> str:
                """The fastest tried policy whose measured peaks fit the limits less ``headroom``."""
                room = limited.replace(disk_space=math.inf)
                within = [r for r in rows[:-1] if fits(measured_peaks[r["policy"]], room, headroom)]
                if not within:
                    return "none fits"
                best = max(within, key=lambda r: r["measured_tok_s"])
                return (
                    f"{best['policy']} at {best['measured_tok_s']:.1f} tok/s ({searched / best['measured_tok_s']:.2f}x)"
                )

            # the search keeps HEADROOM of each limit free for the prediction's error; the hand-picked
            # policies are compared both ways: within the whole limits, and keeping the same room free
            search_note = (
                f"searched {found.policy.describe()}: {searched:.1f} tok/s measured; best tried policy within the "
                f"same limits: {best_within(0.0)}; keeping the search's {HEADROOM:.0%} free: {best_within(HEADROOM)}"
            )
    scratch.cleanup()
    df = pd.DataFrame(rows)
    errors = df.throughput_error.abs()
    summary = dict(
        median_abs_throughput_error=float(errors.median()),
        worst_abs_throughput_error=float(errors.max()),
        worst_peak_memory_error=float(df.peak_memory_error.max()),
        median_abs_error_at_engine_disk_rate=float(df.error_at_engine_disk_rate.abs().median()),
        worst_abs_error_at_engine_disk_rate=float(df.error_at_engine_disk_rate.abs().max()),
        search=search_note,
    )
    print(
        f"{cfg.preset} ({dtype}, {device}), {n} prompts of {cfg.prompt_len}, {cfg.gen_len} new, "
        f"batch {cfg.gpu_batch_size}x{cfg.num_gpu_batches}"
        + (f", a {cfg.checkpoint} checkpoint" if cfg.checkpoint else "")
        + f"; hardware: {hw.name} ({hw.source})"
    )
    cols = ["policy", "measured_tok_s", "predicted_tok_s", "throughput_error", "error_at_engine_disk_rate"]
    cols += ["peak_memory_error", "bottleneck"]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()})
    stem = f"validate_cost_model_{cfg.preset}_{device.type}" + ("_smoke" if cfg.smoke else "")
    stem += f"_{cfg.checkpoint}_checkpoint" if cfg.checkpoint else ""
    out = write_results(df, cfg, stem, dtype=str(dtype), hardware=hw.__dict__, **summary)
    hw.save(Path(out) / f"{stem}_hardware.json")
    plot_predicted_vs_measured(df, title=f"cost model vs measurement: {cfg.preset} on {hw.name}").savefig(
        Path(out) / f"{stem}.png", dpi=110
    )
    return df


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
