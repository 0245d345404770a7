"""The README's main job (``make demo``, ``flexlab demo``): offloaded generation on the small model
trained on Python's docs, its throughput beside the reference path's, and the timeline plotted."""

from __future__ import annotations

import argparse

from flexlab.cli_checks import out_dir

DEMO_PROMPTS = ["The for statement", "Exceptions are raised when", "A class definition"]


def run_demo(args: argparse.Namespace) -> int:
    """Generate with an offloading policy on a small model; print throughput; write the timeline."""
    import torch

    import flexlab
    from flexlab.files import atomic_path
    from flexlab.models.pydoc_model import pydoc_model_path
    from flexlab.viz import plot_timeline

    out = out_dir(args.out, "--out")
    path = args.model or pydoc_model_path()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    model = flexlab.Model.from_pretrained(path, dtype=dtype)
    print(model)
    # Weights partly on disk, KV cache on the cpu tier, two GPU batches per block.
    policy = flexlab.Policy.from_percent([30, 30, 0, 100, 100, 0], gpu_batch_size=len(DEMO_PROMPTS), num_gpu_batches=2)
    prompts = DEMO_PROMPTS * 2
    with flexlab.Engine(model, policy, offload_dir=args.offload_dir, progress=True) as engine:
        print(engine)
        result = engine.generate(prompts, max_new_tokens=args.max_new_tokens)
    reference = model.generate(prompts, max_new_tokens=args.max_new_tokens)
    for prompt, text in zip(DEMO_PROMPTS, result.texts or []):
        print(f"\n>>> {prompt}{text}")

    m, r = result.metrics, reference.metrics
    print(
        f"\noffloaded ({policy.describe()}): {int(m['new_tokens'])} tokens in {m['total_s']:.3f} s "
        f"-> {m['throughput_tok_s']:.1f} tokens/s"
    )
    print(
        f"reference path (no offloading): {r['throughput_tok_s']:.1f} tokens/s; "
        f"same tokens: {'yes' if result.token_ids == reference.token_ids else 'NO'}"
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
