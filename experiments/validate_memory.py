"""Is the memory prediction right? The whole process's peak resident memory, predicted and measured.

Each row runs one policy in a fresh process (so that its peak is its own: the kernel's VmHWM
never goes down) and compares that peak with :class:`flexlab.engine.footprint.Footprint`'s host
prediction: the engine's tracked bytes, the largest step's workspace times the allocator's slack,
and the runtime base measured the way ``calibrate()`` measures it (a fresh process that ran a
tiny engine). Rows cover every tier of weights, cache and activations, compressed weights and
cache, long prompts (whose attention scores dominate), the lean allocator, and LLaMA- and
BLOOM-shaped models (grouped-query attention, per-head ALiBi biases), all with random weights on
the CPU. Target: every row within 10%. Writes CSV + JSON to experiments/results/.

    python experiments/validate_memory.py                 # ~3 min here
    python experiments/validate_memory.py --smoke true    # three rows (CI)
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import torch

# The worker imports only torch and flexlab (pandas alone is ~65 MiB of resident memory, which
# would be charged to the row): the table's imports are inside main().

Q4 = dict(bits=4, group_size=64)
# name -> (preset, layers or None for all, six shares, other Policy fields, prompt, batch size x batches, lean)
ROWS = {
    "all resident": ("opt-125m", None, [100, 0, 100, 0, 100, 0], {}, 64, (8, 2), False),
    "weights on disk": ("opt-125m", None, [0, 0, 100, 0, 100, 0], {}, 64, (8, 2), False),
    "cache on disk": ("opt-125m", None, [100, 0, 0, 0, 100, 0], {}, 64, (8, 2), False),
    "everything on disk": ("opt-125m", None, [0, 0, 0, 0, 0, 0], {}, 64, (8, 2), False),
    "weights 4-bit": ("opt-125m", None, [100, 0, 100, 0, 100, 0], {"compress_weight": Q4}, 64, (8, 2), False),
    "cache 4-bit on cpu": ("opt-125m", None, [100, 0, 0, 100, 100, 0], {"compress_cache": Q4}, 256, (8, 2), False),
    "prompt 512": ("opt-125m", None, [100, 0, 100, 0, 100, 0], {}, 512, (8, 2), False),
    "prompt 512, lean allocator": ("opt-125m", None, [100, 0, 100, 0, 100, 0], {}, 512, (8, 2), True),
    "prompt 512, all on disk, 16x4": ("opt-125m", None, [0, 0, 0, 0, 100, 0], {}, 512, (16, 4), False),
    "prompt 1024, batch 16": ("opt-125m", None, [0, 0, 100, 0, 100, 0], {}, 1024, (16, 1), False),
    "qwen2.5-0.5b (4 layers)": ("qwen2.5-0.5b", 4, [100, 0, 100, 0, 100, 0], {}, 256, (8, 2), False),
    # a 136M-element token table quantized whole held ~11 bytes per element at once; in slices, the draw's 8
    "qwen2.5-0.5b (2 layers), weights 4-bit": (
        "qwen2.5-0.5b",
        2,
        [100, 0, 100, 0, 100, 0],
        {"compress_weight": Q4},
        64,
        (8, 1),
        False,
    ),
    "bloom-560m (2 layers), prompt 512": ("bloom-560m", 2, [0, 0, 100, 0, 100, 0], {}, 512, (8, 1), False),
}
SMOKE = ("all resident", "weights on disk", "prompt 512")


@dataclass
class Config:
    dtype: str = "auto"  # on a CPU: bfloat16 where it is native, else float32
    gen_len: int = 8
    smoke: bool = False
    out_dir: str = "experiments/results"


def _shape(preset: str, layers: int | None):
    import flexlab

    config = flexlab.get_preset(preset)
    return config if layers is None else config.replace(name=f"{preset}-{layers}layers", num_layers=layers)


def _policy(percent: list[float], extra: dict, batch: tuple[int, int]):
    import flexlab

    extra = {k: flexlab.QuantConfig.from_dict(v) if k.startswith("compress") else v for k, v in extra.items()}
    return flexlab.Policy.from_percent(percent, gpu_batch_size=batch[0], num_gpu_batches=batch[1], **extra)


def worker(job: dict) -> dict:
    """One row, in this (fresh) process: run the policy, report the peak and the tracked bytes."""
    import flexlab
    from flexlab.devices import resident_bytes
    from flexlab.engine.footprint import lean_allocator

    if job["lean"]:
        lean_allocator()
    dtype = getattr(torch, job["dtype"])
    model = flexlab.Model.from_config(_shape(job["preset"], job["layers"]), seed=0, dtype=dtype)
    bs, nb = job["batch"]
    policy = _policy(job["percent"], job["extra"], job["batch"])
    vocab = model.config.vocab_size
    prompts = [[2] + [4 + (i * 7919 + j * 31) % (vocab - 4) for j in range(job["prompt"] - 1)] for i in range(bs * nb)]
    with flexlab.Engine(model, policy) as engine:
        result = engine.generate(prompts, max_new_tokens=job["gen"], stop_token_ids=None)
    return dict(peak=resident_bytes(peak=True), **{t: result.metrics[f"peak_bytes_{t}"] for t in ("gpu", "cpu")})


def main(cfg: Config):
    import pandas as pd

    from flexlab.cost.calibrate import _runtime_base
    from flexlab.engine.footprint import LEAN_SLACK, footprint
    from flexlab.models.layers import packs

    from _common import cpu_dtype, write_results

    dtype = cpu_dtype(cfg.dtype)
    base = _runtime_base(torch.device("cpu"), dtype)
    rows = []
    for name, (preset, layers, percent, extra, prompt, batch, lean) in ROWS.items():
        if cfg.smoke and name not in SMOKE:
            continue
        job = dict(
            preset=preset, layers=layers, percent=percent, extra=extra, prompt=prompt, batch=batch, lean=lean,
            gen=cfg.gen_len, dtype=str(dtype).removeprefix("torch."),
        )  # fmt: skip
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, timeout=900
        )
        if out.returncode != 0:
            raise RuntimeError(f"row {name!r} failed:\n{out.stderr[-2000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        policy = _policy(percent, extra, batch)
        fp = footprint(
            _shape(preset, layers),
            policy,
            on_cuda=False,
            itemsize=dtype.itemsize,
            prompt_len=prompt,
            gen_len=cfg.gen_len,
            runtime_base=base,
            random_weights=True,
            packs=packs(torch.device("cpu"), dtype),  # as the worker's engine does by default
        )
        fp = fp.with_slack(LEAN_SLACK) if lean else fp
        rows.append(
            dict(
                row=name,
                policy=policy.describe(),
                measured_peak_MiB=measured["peak"] / 2**20,
                predicted_peak_MiB=fp.host / 2**20,
                relative_error=fp.host / measured["peak"] - 1,
                tracked_MiB=(measured["gpu"] + measured["cpu"]) / 2**20,
                predicted_tracked_MiB=(fp.tracked["gpu"] + fp.tracked["cpu"]) / 2**20,
                workspace_MiB=fp.workspace / 2**20,
                placing_MiB=fp.placing / 2**20,
                runtime_base_MiB=base / 2**20,
            )
        )
        print(
            f"{name}: measured {rows[-1]['measured_peak_MiB']:.0f} MiB, predicted {rows[-1]['predicted_peak_MiB']:.0f}"
        )
    df = pd.DataFrame(rows)
    summary = dict(
        worst_abs_error=float(df.relative_error.abs().max()), median_abs_error=float(df.relative_error.abs().median())
    )
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}" if abs(x) < 1 else f"{x:.0f}"))
    print({k: round(v, 3) for k, v in summary.items()})
    write_results(df, cfg, "validate_memory" + ("_smoke" if cfg.smoke else ""), dtype=str(dtype), **summary)
    return df


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        from _common import parse_config

        main(parse_config(Config, __doc__))
