"""The cost model's commands: ``flexlab search`` (one process or a pipeline) and ``flexlab calibrate``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from flexlab.cli_args import (
    DTYPES,
    add_model_args,
    add_pipeline_args,
    dtype_of,
    load_model,
    memory_limit_from_args,
    policy_flags,
)
from flexlab.cli_checks import out_dir, out_file


def search(args: argparse.Namespace) -> int:
    """Search the fastest policy that fits a machine; print it, its prediction and why."""
    import flexlab
    from flexlab.cost import checkpoint_itemsize, get_hardware, search_policy
    from flexlab.files import atomic_write

    save = out_file(args.save_policy, "--save-policy") if args.save_policy else None
    # the compute dtype the target runs (default float16, as on a GPU); a checkpoint's own dtype
    # is what its disk weights are read in
    sizes: dict[str, Any] = dict(itemsize=dtype_of(args.dtype).itemsize if args.dtype else 2)
    if args.preset:
        config = flexlab.get_preset(args.preset)
    else:
        model = load_model(args)
        config, sizes["checkpoint_itemsize"] = model.config, checkpoint_itemsize(model)
    hw = get_hardware(args.hardware)
    caps = {
        k: v * 2**30
        for k, v in (("gpu_memory", args.gpu_mem), ("cpu_memory", args.cpu_mem), ("disk_space", args.disk))
        if v is not None
    }
    for k, v in caps.items():
        if v <= 0:
            raise ValueError(f"--{k.split('_')[0]} capacity must be positive, got {v / 2**30:g} GiB")
    if args.memory_limit_gb is not None:  # the whole process on the host, as the engine checks it
        limit = memory_limit_from_args(args)
        assert limit is not None, "a memory limit was given"
        caps.update(dict(cpu_memory=limit) if hw.has_link else dict(gpu_memory=limit / 2, cpu_memory=limit / 2))
    hw = hw.replace(**caps)
    if not 0 < args.attn_sparsity <= 1:
        raise ValueError(f"--attn-sparsity must be in (0, 1] (1: dense attention), got {args.attn_sparsity:g}")
    sizes["attn_sparsity"] = args.attn_sparsity
    if args.one_machine and args.pipeline == 1:
        raise ValueError("--one-machine describes the stages of a pipeline: give --pipeline N too")
    options = args.compress.split(",") if args.compress else []
    # a KV layout (BITS:GROUP:LAYOUT) applies to the cache only
    weights = (None, *(flexlab.QuantConfig.parse(o) for o in options if o.count(":") < 2))
    compress: dict[str, Any] = dict(
        compress=weights, compress_cache=(None, *map(flexlab.CacheQuantConfig.parse, options))
    )
    found = search_policy(
        config, hw, prompt_len=args.prompt_len, gen_len=args.gen_len, progress=args.pipeline == 1, **compress, **sizes
    )
    if args.pipeline != 1:
        return _search_pipeline(args, config, hw, {**compress, **sizes}, found, save)
    pred = found.prediction
    print(pred.summary())
    try:
        print(f"flags: {policy_flags(found.policy)}")
    except ValueError as e:  # a field no flag sets
        print(f"flags: {e}")
    if args.verbose:
        print("\n" + pred.stage_table())
        ranked = sorted(found.candidates, key=lambda c: -c["throughput_tok_s"])[:10]
        print(f"\nbest of {len(found.candidates)} candidates (tok/s, policy):")
        for c in ranked:
            print(f"{c['throughput_tok_s']:>10.3g}  {c['policy']}")
    if save is not None:
        atomic_write(save, json.dumps(found.policy.to_dict(), indent=2))
        print(f"wrote {args.save_policy} (pass it to --policy)")
    return 0


def _search_pipeline(args, config, hw, options: dict, one, save) -> int:
    """``search --pipeline N``: the fastest plan of N stages (each with the hardware given), beside
    the one-process answer; ``--save-policy`` writes the plan for ``generate --plan``."""
    from flexlab.cost import search_pipeline
    from flexlab.files import atomic_write

    found = search_pipeline(
        config,
        hw,
        args.pipeline,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        layers=args.pipeline_layers,
        groups=args.groups,
        one_machine=args.one_machine,
        **options,
    )
    pred, base = found.prediction, one.prediction.throughput_tok_s
    where = f"one {hw.name} with {args.pipeline} GPUs" if args.one_machine else f"{args.pipeline} x {hw.name}"
    print(
        f"{config.name} on {where} (prompt {args.prompt_len}, gen {args.gen_len}): "
        f"{pred.throughput_tok_s:.3g} tok/s predicted, {pred.throughput_tok_s / base:.2f}x one {hw.name} "
        f"({base:.3g} tok/s); bubble {pred.bubble:.0%}"
    )
    for r, (layers, policy) in enumerate(zip(found.plan.layers, found.plan.policies)):
        peak = ", ".join(f"{t} {v / 2**30:.2f}" for t, v in pred.ranks[r]["peak_bytes"].items())
        print(f"stage {r}: layers {layers.start}-{layers.stop - 1}: {policy.describe()}; peak GiB {peak}")
    print(f"groups: {found.plan.groups}")
    if args.verbose:
        for t in found.tried:
            what = f"{t['throughput_tok_s']:.3g} tok/s" if t["throughput_tok_s"] else t["why"]
            split = "+".join(map(str, t["layers"]))
            print(
                f"layers {split} {t['gpu_batch_size']:>4}x{t['num_gpu_batches']:<3} groups {t['groups'] or '-'}: {what}"
            )
    if save is not None:
        atomic_write(save, json.dumps(found.plan.to_dict(), indent=2))
        print(f"wrote {args.save_policy} (run it: flexlab generate --plan {args.save_policy} ...)")
    return 0


def calibrate(args: argparse.Namespace) -> int:
    """Measure this machine for the cost model and save the profile."""
    from flexlab.cost import calibrate as measure
    from flexlab.cost.hardware import _human

    out = out_file(args.out, "--out")
    offload = out_dir(args.offload_dir, "--offload-dir") if args.offload_dir else None
    hw = measure(quick=args.quick, dtype=dtype_of(args.dtype), offload_dir=offload)
    width = max(map(len, hw.__dict__)) + 2
    for key, value in hw.__dict__.items():
        print(f"{key:<{width}}{_human(key, value)}")
    hw.save(out)
    print(f"wrote {args.out} (use it with --hardware {args.out})")
    return 0


def add_cost_commands(sub) -> None:
    """The ``search`` and ``calibrate`` sub-commands, on the main parser's ``sub``."""
    p = sub.add_parser("search", help="the fastest policy that fits, by the cost model")
    add_model_args(p)
    p.add_argument(
        "--hardware",
        default="colab-t4",
        help="colab-t4, flexgen-t4 (FlexGen's paper machine), h100, h200, or a JSON from `flexlab calibrate`",
    )
    p.add_argument("--gpu-mem", type=float, help="GiB (default: the hardware's)")
    p.add_argument(
        "--cpu-mem",
        type=float,
        help="GiB (default: the hardware's); without a GPU the gpu and cpu "
        "tiers are one RAM and only the sum of the two counts",
    )
    p.add_argument("--disk", type=float, help="GiB (default: the hardware's)")
    p.add_argument(
        "--memory-limit-gb",
        type=float,
        metavar="GB",
        help="host RAM the whole process may use, in GB (10^9 bytes; default: the hardware's RAM); the policy "
        "found passes `generate --memory-limit-gb` with the same limit",
    )
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument(
        "--compress",
        nargs="?",
        const="4:64",
        metavar="BITS:GROUP[,...]",
        help="also consider compressed weights and cache, each chosen apart (bare: 4:64; a list such as "
        "3:64,4:64,4:128 tries each, and each option multiplies the search's time)",
    )
    p.add_argument(
        "--attn-sparsity",
        type=float,
        default=1.0,
        metavar="KEEP",
        help="price every candidate with sparse attention keeping this share of each head's weights in decode "
        "(default 1: dense); which rows are kept is modelled as independent per head: an upper bound on the reads",
    )
    p.add_argument("--save-policy", help="write the policy as JSON (for --policy)")
    p.add_argument("--verbose", action="store_true", help="also seconds per stage and the best candidates")
    add_pipeline_args(p)
    p.add_argument(
        "--one-machine",
        action="store_true",
        help="with --pipeline: the stages are the GPUs of one such machine, sharing its RAM, disk space and "
        "disk bandwidth (default: each stage on a machine of its own)",
    )
    p.set_defaults(func=search)

    p = sub.add_parser("calibrate", help="measure this machine for the cost model")
    p.add_argument("--out", default="hardware.json")
    p.add_argument("--quick", action="store_true", help="smaller sizes (seconds)")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--offload-dir", help="a directory on the disk to measure (default: the temp dir)")
    p.set_defaults(func=calibrate)
