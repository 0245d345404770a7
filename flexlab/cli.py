"""The ``flexlab`` command line: ``flexlab demo``, ``flexlab presets``."""

from __future__ import annotations

import argparse
import sys

DEMO_PROMPTS = ["The for statement", "Exceptions are raised when", "A class definition"]


def demo(args: argparse.Namespace) -> int:
    """Generate with the small pydoc-trained model (or ``--model``) and print throughput."""
    import torch

    import flexlab
    from flexlab.models.pydoc_model import pydoc_model_path

    path = args.model or pydoc_model_path()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    model = flexlab.Model.from_pretrained(path, dtype=dtype)
    print(model)
    result = model.generate(DEMO_PROMPTS, max_new_tokens=args.max_new_tokens)
    for prompt, text in zip(DEMO_PROMPTS, result.texts or []):
        print(f"\n>>> {prompt}{text}")
    m = result.metrics
    print(f"\nreference path (no offloading): {int(m['new_tokens'])} tokens in {m['total_s']:.3f} s "
          f"(prefill {m['prefill_s']:.3f} s, decode {m['decode_s']:.3f} s) -> {m['throughput_tok_s']:.1f} tokens/s")
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
    p = sub.add_parser("demo", help="generate with a small model and print throughput")
    p.add_argument("--model", help="checkpoint directory or hub id (default: the pydoc-trained model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: float16 on CUDA, bfloat16 on CPU)")
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
