"""The ``flexlab`` command line: ``flexlab demo``, ``flexlab presets``."""

from __future__ import annotations

import argparse
import sys

DEMO_PROMPTS = ["The for statement", "Exceptions are raised when", "A class definition"]


def demo(args: argparse.Namespace) -> int:
    """Generate with an offloading policy on a small model; print throughput; write the timeline."""
    from pathlib import Path

    import torch

    import flexlab
    from flexlab.models.pydoc_model import pydoc_model_path
    from flexlab.viz import plot_timeline

    path = args.model or pydoc_model_path()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    model = flexlab.Model.from_pretrained(path, dtype=dtype)
    print(model)
    # Weights partly on disk, KV cache on the cpu tier, two GPU batches per block.
    policy = flexlab.Policy.from_percent([30, 30, 0, 100, 100, 0], gpu_batch_size=len(DEMO_PROMPTS),
                                         num_gpu_batches=2)
    prompts = DEMO_PROMPTS * 2
    with flexlab.Engine(model, policy, offload_dir=args.offload_dir, progress=True) as engine:
        print(engine)
        result = engine.generate(prompts, max_new_tokens=args.max_new_tokens)
    reference = model.generate(prompts, max_new_tokens=args.max_new_tokens)
    for prompt, text in zip(DEMO_PROMPTS, result.texts or []):
        print(f"\n>>> {prompt}{text}")

    m, r = result.metrics, reference.metrics
    print(f"\noffloaded ({policy.describe()}): {int(m['new_tokens'])} tokens in {m['total_s']:.3f} s "
          f"-> {m['throughput_tok_s']:.1f} tokens/s")
    print(f"reference path (no offloading): {r['throughput_tok_s']:.1f} tokens/s; "
          f"same tokens: {'yes' if result.token_ids == reference.token_ids else 'NO'}")
    print("peak bytes per tier: " + ", ".join(f"{t} {m[f'peak_bytes_{t}'] / 2**20:.2f} MiB" for t in ("gpu", "cpu", "disk")))
    s = result.timeline.summary()
    print(f"timeline: {len(result.timeline)} events; I/O hidden under compute {s['io_hidden_fraction']:.0%}, "
          f"compute idle {s['compute_idle_fraction']:.0%}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_timeline(result.timeline, tokens=(0, 2)).savefig(out / "timeline.png", dpi=120)
    result.timeline.to_chrome_trace(out / "trace.json")
    result.timeline.save(out / "timeline.json")
    print(f"wrote {out / 'timeline.png'} (first tokens), {out / 'trace.json'} (open in ui.perfetto.dev), "
          f"{out / 'timeline.json'} (Timeline.load)")
    return 0


def presets(args: argparse.Namespace) -> int:
    """Print every preset with its size."""
    from flexlab.models.config import get_preset, preset_names

    print(f"{'preset':<16}{'params':>10}{'layers':>8}{'hidden':>8}{'fp16 GiB':>10}{'KV MiB/tok':>12}")
    for name in preset_names():
        c = get_preset(name)
        print(f"{name:<16}{c.num_parameters() / 1e6:>9.1f}M{c.num_layers:>8}{c.hidden_size:>8}"
              f"{c.total_weight_bytes(2) / 2**30:>10.2f}{c.kv_cache_bytes_per_token(2) / 2**20:>12.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate with an offloading policy, print throughput, plot the timeline")
    p.add_argument("--model", help="checkpoint directory or hub id (default: the pydoc-trained model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--offload-dir", default=None, help="where disk-tier data goes (default: a temp dir)")
    p.add_argument("--out", default="flexlab-demo", help="folder for the timeline picture and traces")
    p.set_defaults(func=demo)
    sub.add_parser("presets", help="list model presets and their sizes").set_defaults(func=presets)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # flexlab's input errors: one clear line, no traceback
        print(f"flexlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
