"""The arguments the commands share: the model, the sampling, and FlexGen's policy flags.

Policy flags go both ways: the flags the commands take, the Policy they make, and the flags that
make a given Policy (what ``flexlab search`` prints, so that copying its line runs exactly the
policy it searched).

    >>> from flexlab import Policy, QuantConfig
    >>> policy = Policy.from_percent([20, 30, 0, 100, 100, 0], gpu_batch_size=8,
    ...                              compress_weight=QuantConfig(bits=4, group_size=64))
    >>> policy_flags(policy)
    '--percent 20 30 0 100 100 0 --gpu-batch-size 8 --num-gpu-batches 1 --compress-weight 4:64'
    >>> policy_from_flags(policy_flags(policy)) == policy
    True
"""

from __future__ import annotations

import argparse

from flexlab.cli_checks import in_file

DTYPES = ("float32", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--preset`` (random weights) and ``--dtype``."""
    g = p.add_argument_group("model")
    g.add_argument("--model", help="checkpoint directory or hub id (default: the pydoc-trained model)")
    g.add_argument("--preset", help="a preset name instead (random weights), e.g. opt-1.3b; see `flexlab presets`")
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="compute dtype (default: float16 on CUDA; bfloat16 on a CPU with native bf16, else float32)",
    )


def dtype_of(name: str | None):
    """The torch dtype a ``--dtype`` value names (None: the device's default)."""
    import torch

    return getattr(torch, name) if name else None


def load_model(args: argparse.Namespace):
    """The model ``--model``/``--preset`` say (default: the pydoc-trained model)."""
    import flexlab

    if getattr(args, "preset", None):
        if args.model:
            raise ValueError("pass --model or --preset, not both")
        return flexlab.Model.from_config(args.preset, seed=0, dtype=dtype_of(args.dtype))
    path = args.model or flexlab.pydoc_model_path()
    return flexlab.Model.from_pretrained(path, dtype=dtype_of(args.dtype))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """How many tokens, and greedy or sampled."""
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def sampling_from_args(args: argparse.Namespace) -> dict:
    """The keywords of ``generate`` that the sampling flags set (stop rules: the model's eos)."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=None,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=(),
        stop_strings=None,
    )


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """``--pipeline N`` and how its stages share the model."""
    g = p.add_argument_group("pipeline (several processes; see flexlab.distributed)")
    g.add_argument(
        "--pipeline",
        type=int,
        default=1,
        metavar="N",
        help="run on N local processes, each holding a share of the layers (under torchrun: its processes)",
    )
    g.add_argument(
        "--pipeline-layers",
        type=lambda v: [int(x) for x in v.replace(",", " ").split()],
        metavar='"L0 L1 ..."',
        help="layers per stage (default: the search balances them by predicted time; generate: by weight)",
    )
    g.add_argument(
        "--groups",
        type=int,
        metavar="G",
        help="groups of GPU batches taking turns, so that the stages work at once (default: one per stage)",
    )
    g.add_argument(
        "--plan", help="a plan JSON (as `flexlab search --pipeline N --save-policy` writes): stages, policies"
    )


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """The policy flags of ``generate``, ``bench`` and ``chat``."""
    g = p.add_argument_group("policy (FlexGen's flags)")
    g.add_argument(
        "--percent",
        nargs=6,
        type=float,
        metavar=("WG", "WC", "CG", "CC", "HG", "HC"),
        help="weights, cache and activations on gpu/cpu in percent (disk gets the rest)",
    )
    g.add_argument("--policy", help="a JSON file of Policy fields (as Policy.to_dict writes); flags override it")
    g.add_argument("--gpu-batch-size", type=int)
    g.add_argument("--num-gpu-batches", type=int)
    # FlexGen's spellings work as FlexGen wrote them: a bare --compress-weight is 4-bit groups of
    # 64, and --overlap / --sep-layer / --pin-weight take True/False (or 1/0).
    g.add_argument(
        "--compress-weight", nargs="?", const="4:64", metavar="BITS[:GROUP]", help="quantize weights (bare: 4:64)"
    )
    g.add_argument(
        "--compress-cache",
        nargs="?",
        const="4:64",
        metavar="BITS[:GROUP[:LAYOUT]]",
        help="quantize the KV cache (bare: 4:64)",
    )
    g.add_argument("--cpu-cache-compute", action="store_true", help="decode attention over cpu-tier cache on the CPU")
    g.add_argument("--attn-sparsity", type=float, help="keep this fraction of attention weights in decode")
    g.add_argument("--overlap", type=_bool, metavar="BOOL", help="overlap transfers with compute (default True)")
    g.add_argument("--no-overlap", action="store_true", help="the same as --overlap False")
    g.add_argument("--sep-layer", type=_bool, metavar="BOOL", help="attention and MLP as two stages (default True)")
    g.add_argument("--pin-weight", type=_bool, metavar="BOOL", help="pin cpu-tier weights for the GPU (default True)")
    g.add_argument("--offload-dir", help="where disk-tier data goes (default: a temporary directory)")
    g.add_argument(
        "--memory-limit-gb",
        type=float,
        metavar="GB",
        help="host RAM the whole process may use, in GB (10^9 bytes); a policy predicted to need more is refused "
        "before it starts (default: the cgroup's limit, else the memory available; inf: no check); with --pipeline, "
        "what the stages on this machine may use together, each held to a share in proportion to its predicted peak",
    )


def memory_limit_from_args(args: argparse.Namespace) -> float | None:
    """``--memory-limit-gb`` in bytes (None: the engine's default)."""
    gb = getattr(args, "memory_limit_gb", None)
    if gb is None:
        return None
    if not gb > 0:
        raise ValueError(f"--memory-limit-gb must be positive (inf: no check), got {gb:g}")
    return gb * 1e9


def policy_from_args(args: argparse.Namespace, **defaults):
    """The Policy the flags say: ``defaults``, then ``--policy FILE``, then each flag given."""
    from flexlab import CacheQuantConfig, Policy, QuantConfig
    from flexlab.engine.policy import PERCENT_FIELDS, PolicyError

    fields = dict(defaults)
    if args.policy:
        try:
            fields.update(Policy.load(in_file(args.policy, "--policy")).to_dict())
        except PolicyError as e:
            raise ValueError(f"--policy {args.policy}: {e}") from None
    if args.percent:
        fields.update(zip(PERCENT_FIELDS, args.percent))
    for name in ("gpu_batch_size", "num_gpu_batches", "attn_sparsity"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    for name, kind in (("compress_weight", QuantConfig), ("compress_cache", CacheQuantConfig)):
        if getattr(args, name):
            fields[name] = kind.parse(getattr(args, name))
    if args.cpu_cache_compute:
        fields["cpu_cache_compute"] = True
    if args.no_overlap and args.overlap:
        raise ValueError("--no-overlap and --overlap True disagree; pass one of them")
    if args.no_overlap:
        fields["overlap"] = False
    for name in ("overlap", "sep_layer", "pin_weight"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return Policy.from_dict(fields)


def _bool(value: str) -> bool:
    """``True``/``False`` as FlexGen's flags take them (also 1/0, yes/no; any case)."""
    word = value.strip().lower()
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean: pass True or False (or 1/0)")


def policy_from_flags(flags: str):
    """The Policy a line of flags makes (as ``flexlab search`` prints them)."""
    import shlex

    parser = argparse.ArgumentParser(prog="policy flags", add_help=False)
    add_policy_args(parser)
    return policy_from_args(parser.parse_args(shlex.split(flags)))


def policy_flags(policy) -> str:
    """The flags that make exactly ``policy``. Raises ValueError naming the fields no flag sets
    (pass such a policy as ``--policy FILE``)."""
    missing = []
    for name in ("compress_weight", "compress_cache"):
        q = getattr(policy, name)
        if q is not None and q != type(q).parse(_quant(q)):
            missing.append(f"{name}={q}")
    if missing:
        raise ValueError(f"no flags set {', '.join(missing)}; pass the policy as --policy FILE")
    flags = [
        "--percent",
        *map(_number, policy.percent),
        "--gpu-batch-size",
        str(policy.gpu_batch_size),
        "--num-gpu-batches",
        str(policy.num_gpu_batches),
    ]
    if policy.compress_weight is not None:
        flags += ["--compress-weight", _quant(policy.compress_weight)]
    if policy.compress_cache is not None:
        flags += ["--compress-cache", _quant(policy.compress_cache)]
    if policy.cpu_cache_compute:
        flags.append("--cpu-cache-compute")
    if policy.attn_sparsity < 1:
        flags += ["--attn-sparsity", _number(policy.attn_sparsity)]
    if not policy.overlap:
        flags += ["--overlap", "False"]
    if not policy.sep_layer:
        flags += ["--sep-layer", "False"]
    if not policy.pin_weight:
        flags += ["--pin-weight", "False"]
    return " ".join(flags)


def _quant(q) -> str:
    return f"{q.bits}:{q.group_size}" + (":per-channel" if getattr(q, "kv_layout", "") == "per-channel" else "")


def _number(value: float) -> str:
    """Short where that is exact (``20``), every digit where it is not (``33.333333333333336``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))
