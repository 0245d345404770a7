"""The README's main job (``make demo``, ``flexlab demo``): offloaded generation on the small model
trained on Python's docs, its throughput beside the reference path's, and the timeline plotted."""

from __future__ import annotations

import argparse
import statistics

from flexlab.cli_checks import out_dir

DEMO_PROMPTS = ["The for statement", "Exceptions are raised when", "A class definition"]


def run_demo(args: argparse.Namespace) -> int:
    """Generate with an offloading policy on a small model; print throughput; write the timeline."""
    import torch

    import flexlab
    from flexlab.files import atomic_path
    from flexlab.models.pydoc_model import pydoc_model_path
    from flexlab.viz import plot_timeline

    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: run each path at least once (1 or more)")
    out = out_dir(args.out, "--out")
    path = args.model or pydoc_model_path()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    model = flexlab.Model.from_pretrained(path, dtype=dtype)
    print(model)
    # Weights partly on disk, KV cache on the cpu tier, two GPU batches per block.
    policy = flexlab.Policy.from_percent([30, 30, 0, 100, 100, 0], gpu_batch_size=len(DEMO_PROMPTS), num_gpu_batches=2)
    prompts = DEMO_PROMPTS * 2
    # Both paths run `repeats` times, interleaved, and are compared by their medians: one run on
    # a shared machine can be 2x off, enough to show offloading "faster" than none.
    runs: dict[str, list] = {"offloaded": [], "reference": []}
    with flexlab.Engine(model, policy, offload_dir=args.offload_dir, progress=True) as engine:
        print(engine)
        for _ in range(args.repeats):
            runs["offloaded"].append(engine.generate(prompts, max_new_tokens=args.max_new_tokens))
            runs["reference"].append(model.generate(prompts, max_new_tokens=args.max_new_tokens))
    result = runs["offloaded"][-1]
    for prompt, text in zip(DEMO_PROMPTS, result.texts or []):
        print(f"\n>>> {prompt}{text}")

    rates = {k: sorted(r.metrics["throughput_tok_s"] for r in v) for k, v in runs.items()}
    median = {k: statistics.median(v) for k, v in rates.items()}
    m = result.metrics
    spread = {k: f" (runs {v[0]:.1f}-{v[-1]:.1f})" if len(v) > 1 else "" for k, v in rates.items()}
    print(
        f"\noffloaded ({policy.describe()}): {int(m['new_tokens'])} tokens a run, median of {args.repeats} runs "
        f"{median['offloaded']:.1f} tokens/s{spread['offloaded']}"
    )
    same = all(a.token_ids == b.token_ids for a, b in zip(runs["offloaded"], runs["reference"]))
    print(
        f"reference path (no offloading): median {median['reference']:.1f} tokens/s{spread['reference']}; "
        f"offloaded / reference {median['offloaded'] / median['reference']:.2f}; "
        f"same tokens: {'yes' if same else 'NO'}"
    )
    print(
        "(runs interleaved on one shared machine: compare medians; on a model this small the "
        "per-step overhead, not the offloading, sets the pace)"
    )
    print(
        "peak bytes per tier: "
        + ", ".join(f"{t} {m[f'peak_bytes_{t}'] / 2**20:.2f} MiB" for t in ("gpu", "cpu", "disk"))
    )
    s = result.timeline.summary()
    print(
        f"timeline: {len(result.timeline)} events; I/O hidden under compute {s['io_hidden_fraction']:.0%}, "
        f"compute idle {s['compute_idle_fraction']:.0%}"
    )

    with atomic_path(out / "timeline.png") as tmp:
        plot_timeline(result.timeline, tokens=(0, 2)).savefig(tmp, dpi=120)
    result.timeline.to_chrome_trace(out / "trace.json")
    result.timeline.save(out / "timeline.json")
    print(
        f"wrote {out / 'timeline.png'} (first tokens), {out / 'trace.json'} (open in ui.perfetto.dev), "
        f"{out / 'timeline.json'} (Timeline.load)"
    )
    return 0
