"""Throughput per policy: run one model under several policies and tabulate what each did.

>>> import flexlab, torch
>>> model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
>>> df = policy_sweep(model, {"all on gpu": flexlab.Policy(gpu_batch_size=2),
...                           "weights on disk": flexlab.Policy.from_percent([0, 0, 100, 0, 100, 0],
...                                                                          gpu_batch_size=2)},
...                   [[2, 5, 6, 7]] * 4, max_new_tokens=3, progress=False)
>>> list(df.policy)
['all on gpu', 'weights on disk']
"""

from __future__ import annotations

from flexlab.engine import Engine, Policy
from flexlab.engine.placement import TIERS


def policy_sweep(
    model,
    policies: dict[str, Policy],
    prompts,
    *,
    max_new_tokens: int = 16,
    repeats: int = 1,
    warmup: bool = True,
    offload_dir=None,
    progress: bool = True,
):
    """One row per policy: throughput, time split, overlap, peak bytes per tier and what filled
    each tier at its peak (``mem_<tier>_<category>`` columns), and the policy's own fields
    (``gpu_batch_size``, ``w_disk_percent``, ...) to plot against. Greedy, no early stop, so every
    policy generates the same number of tokens. A warm-up run on one GPU batch comes first.

    ``repeats``: runs per policy in one engine; the row is the median run's (the lower middle
    one for an even count), with
    ``throughput_tok_s_min`` / ``_max`` / ``_std`` over the runs (error bars for a paper)."""
    import statistics

    import pandas as pd
    from tqdm.auto import tqdm

    if not policies:
        raise ValueError("policy_sweep needs at least one policy")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    rows = []
    for name, policy in tqdm(policies.items(), desc="policies", disable=not progress):
        with Engine(model, policy, offload_dir=offload_dir) as engine:
            if warmup:
                engine.generate(prompts[: policy.gpu_batch_size], max_new_tokens=2, stop_token_ids=None)
            runs = [
                engine.generate(prompts, max_new_tokens=max_new_tokens, stop_token_ids=None) for _ in range(repeats)
            ]
        speeds = [r.metrics["throughput_tok_s"] for r in runs]
        result = sorted(runs, key=lambda r: r.metrics["throughput_tok_s"])[(repeats - 1) // 2]  # the median run
        summary = result.timeline.summary()
        row = {
            "policy": name,
            "describe": policy.describe(),
            **result.metrics,
            "throughput_tok_s_min": min(speeds),
            "throughput_tok_s_max": max(speeds),
            "throughput_tok_s_std": statistics.stdev(speeds) if repeats > 1 else 0.0,
            "repeats": repeats,
            "io_hidden_fraction": summary.get("io_hidden_fraction", 0.0),
            "compute_idle_fraction": summary.get("compute_idle_fraction", 0.0),
            **{k: v for k, v in policy.to_dict().items() if isinstance(v, (int, float))},  # bools too
            **{f"{what}_disk_percent": getattr(policy, f"{what}_disk_percent") for what in ("w", "cache")},
        }
        for tier in TIERS:
            for category, value in result.memory.get(tier, {}).items():
                row[f"mem_{tier}_{category.replace(' ', '_')}"] = value
        rows.append(row)
    return pd.DataFrame(rows).fillna({c: 0 for c in {k for r in rows for k in r if k.startswith("mem_")}})
