"""The ``flexlab`` command line.

    flexlab demo                                   # the README's main job
    flexlab generate --model DIR --prompt "..." --percent 20 30 0 100 100 0
    flexlab bench --preset opt-1.3b --sweep --out results/
    flexlab search --preset opt-30b --hardware colab-t4
    flexlab calibrate --out my-machine.json
    flexlab convert SRC DST --dtype float16
    flexlab convert opt-13b DST --random     # random weights, float16
    flexlab chat --model DIR
    flexlab presets

Model families: OPT, the LLaMA family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), BLOOM, CodeGen, GLM-4;
``flexlab presets`` lists their sizes. Every command takes ``--help``. Bad input ends with one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from flexlab import hugepages
from flexlab.cli_args import (
    DTYPES,
    add_model_args,
    add_pipeline_args,
    add_policy_args,
    add_sampling_args,
    dtype_of,
    load_model,
    memory_limit_from_args,
    policy_from_args,
    sampling_from_args,
)
from flexlab.cli_checks import in_file, out_dir, out_file, read_prompts, run_guarded
from flexlab.cli_cost import add_cost_commands


class _Parser(argparse.ArgumentParser):
    """argparse, with bad flags reported on one line (and exit status 2)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# ---- commands ------------------------------------------------------------------------------
def demo(args: argparse.Namespace) -> int:
    """Generate with an offloading policy on a small model; print throughput; write the timeline."""
    from flexlab.demo import run_demo

    return run_demo(args)


def generate(args: argparse.Namespace) -> int:
    """Generate for prompts under a policy; print the texts and the metrics (or JSON). With
    ``--pipeline N``, or in the processes torchrun started, on a pipeline of ranks."""
    import flexlab
    from flexlab.distributed.launch import init_from_torchrun
    from flexlab.models.generation import prepare_generation

    prompts = read_prompts(args.prompt, args.prompts_file, args.prompt_ids)
    if args.preset and (args.prompt or args.prompts_file):  # before building the model
        raise ValueError(
            f"--preset {args.preset} has random weights and no tokenizer: pass token ids "
            '(--prompt-ids "2 5 7"), or --model DIR for text prompts'
        )
    timeline = out_file(args.timeline, "--timeline") if args.timeline else None
    log_file = out_file(args.log_file, "--log-file") if args.log_file else None
    model = load_model(args)
    policy = policy_from_args(args, gpu_batch_size=min(len(prompts), 8))
    sampling = sampling_from_args(args)
    prepare_generation(prompts, model.tokenizer, model.config, **sampling)  # bad prompts: refused before placing
    plan = None
    if args.plan:  # one policy per stage, as the search wrote them
        from flexlab.distributed import PipelinePlan

        try:
            data = json.loads(in_file(args.plan, "--plan").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--plan {args.plan}: cannot read a JSON plan ({e})") from None
        plan = PipelinePlan.from_dict(model.config, data)
        if args.pipeline not in (1, plan.num_ranks):
            raise ValueError(f"--pipeline {args.pipeline}, but --plan {args.plan} has {plan.num_ranks} stages")
        args.pipeline = plan.num_ranks
    ranks = init_from_torchrun()  # (rank, world size) when torchrun started this process
    if ranks is not None or args.pipeline != 1:
        from flexlab.distributed import make_plan
        from flexlab.distributed.launch import run_job
        from flexlab.distributed.stage import ModelSource, PipelineJob

        if ranks is not None and args.pipeline not in (1, ranks[1]):
            raise ValueError(f"--pipeline {args.pipeline}, but torchrun started {ranks[1]} processes; drop --pipeline")
        if plan is not None and ranks is not None and ranks[1] != plan.num_ranks:
            raise ValueError(f"--plan {args.plan} has {plan.num_ranks} stages, but torchrun started {ranks[1]}")
        if plan is None:
            plan = make_plan(
                model.config, ranks[1] if ranks else args.pipeline, policy, args.pipeline_layers, args.groups
            )
        job = PipelineJob(ModelSource.of(model), plan, "generate", prompts, sampling, args.offload_dir)
        result = run_job(dataclasses.replace(job, memory_limit=memory_limit_from_args(args)), ranks)
        if result is None:
            return 0  # a torchrun process other than rank 0, which speaks for the pipeline
        what = plan.describe()
    else:
        on_terminal = sys.stderr.isatty()  # bars only where someone watches (not in logs or pipes)
        limit = memory_limit_from_args(args)
        with flexlab.Engine(
            model, policy, offload_dir=args.offload_dir, progress=on_terminal, memory_limit=limit
        ) as engine:
            result = engine.generate(prompts, **sampling, progress=on_terminal)
        what = policy.describe()
    m = result.metrics
    if args.json:
        fields = {"token_ids": result.token_ids, "texts": result.texts, "metrics": m, "policy": what}
        print(json.dumps(fields))
    else:
        for prompt, ids, text in zip(prompts, result.token_ids, result.texts or [None] * len(prompts)):
            print(f">>> {prompt}{text}" if text is not None else f">>> {prompt} -> {ids}")
    print(
        f"{what}: {int(m['new_tokens'])} tokens in {m['total_s']:.3f} s -> {m['throughput_tok_s']:.1f} tokens/s",
        file=sys.stderr,
    )
    if timeline is not None:
        result.timeline.save(timeline)
    if log_file is not None:  # FlexGen's --log-file: a line per run, appended in one write
        entry = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model.config.name, "policy": what, **m}
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Throughput of one policy, or of the standard sweep, on synthetic prompts; writes a results folder."""
    import flexlab
    from flexlab.engine.policy import PERCENT_FIELDS
    from flexlab.eval import policy_sweep
    from flexlab.files import atomic_path, atomic_write
    from flexlab.viz import plot_memory, plot_throughput

    out = out_dir(args.out, "--out")
    model = load_model(args)
    base = policy_from_args(args, gpu_batch_size=8, num_gpu_batches=2)
    if args.sweep:
        shares = {
            "all on gpu": [100, 0, 100, 0, 100, 0],
            "weights on cpu": [0, 100, 100, 0, 100, 0],
            "weights 50% disk": [0, 50, 100, 0, 100, 0],
            "weights on disk": [0, 0, 100, 0, 100, 0],
            "cache on cpu": [100, 0, 0, 100, 100, 0],
            "cache on disk": [100, 0, 0, 0, 100, 0],
        }
        policies = {k: base.replace(**dict(zip(PERCENT_FIELDS, v))) for k, v in shares.items()}
    else:
        policies = {"policy": base}
    n = args.num_prompts or base.block_size
    vocab = model.config.vocab_size
    prompts = [[2] + [4 + (i * 7 + j) % (vocab - 4) for j in range(args.prompt_len - 1)] for i in range(n)]
    df = policy_sweep(model, policies, prompts, max_new_tokens=args.gen_len, offload_dir=args.offload_dir)
    cols = [
        "policy",
        "throughput_tok_s",
        "total_s",
        "io_hidden_fraction",
        "peak_bytes_gpu",
        "peak_bytes_cpu",
        "peak_bytes_disk",
    ]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    with atomic_path(out / "bench.csv") as tmp:
        df.to_csv(tmp, index=False)
    atomic_write(
        out / "bench.json",
        json.dumps(
            {
                "model": model.config.name,
                "dtype": str(model.dtype),
                "prompt_len": args.prompt_len,
                "gen_len": args.gen_len,
                "policies": {k: p.to_dict() for k, p in policies.items()},
                "flexlab": flexlab.__version__,
            },
            indent=2,
        ),
    )
    for name, plot in (("throughput.png", plot_throughput), ("memory.png", plot_memory)):
        with atomic_path(out / name) as tmp:
            plot(df).savefig(tmp, dpi=110)
    print(f"wrote {out}/bench.csv, bench.json, throughput.png, memory.png")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``flexlab eval ...``: lm-eval's own command line with ``--model flexlab`` (see
    :mod:`flexlab.eval.lm_eval` for the model_args: pretrained, dtype, percent, compression).
    Without ``--include_path`` the offline pydoc tasks (:mod:`flexlab.eval.local_tasks`) are found by name."""
    rest = list(args.rest)
    if "--model" in rest:
        raise ValueError(
            "flexlab eval runs lm-eval with --model flexlab: drop --model (set the policy in --model_args)"
        )
    try:
        from lm_eval.__main__ import cli_evaluate

        import flexlab.eval.lm_eval  # noqa: F401  (registers the model)
    except ImportError as e:
        raise ValueError(f"flexlab eval needs lm-evaluation-harness ({e}): pip install 'flexlab[eval]'") from None
    rest = rest[1:] if rest[:1] == ["run"] else rest  # `flexlab eval run ...` as lm-eval spells it too
    if not any(a.startswith("--include_path") for a in rest):  # the offline pydoc tasks, found by name
        from flexlab.eval.local_tasks import pydoc_tasks_dir

        rest += ["--include_path", str(pydoc_tasks_dir())]
    saved, sys.argv = sys.argv, ["lm_eval", "run", "--model", "flexlab", *rest]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint into safetensors shards the engine reads in place from disk, or write
    a preset's random weights as a checkpoint (``--random``)."""
    from flexlab.models.convert import convert_checkpoint, save_checkpoint

    if args.random:
        import flexlab

        out = save_checkpoint(
            flexlab.Model.from_config(args.source, seed=args.seed), args.target, dtype=dtype_of(args.dtype or "float16")
        )
    else:
        out = convert_checkpoint(args.source, args.target, dtype=dtype_of(args.dtype))
    print(f"wrote {out}")
    return 0


def chat(args: argparse.Namespace) -> int:
    """A multi-turn chat in the terminal; an empty line or end of input ends it."""
    import flexlab
    from flexlab.chat import Chat

    if args.preset:  # before building the model
        raise ValueError(
            f"--preset {args.preset} has random weights and no tokenizer, and chat needs text: pass --model DIR "
            "(a checkpoint with a tokenizer; default: the pydoc-trained model)"
        )
    model = load_model(args)
    if model.tokenizer is None:
        raise ValueError(f"{model.config.name} has no tokenizer; chat needs a checkpoint directory with one")
    interactive = sys.stdin.isatty()
    limit = memory_limit_from_args(args)
    with flexlab.Engine(model, policy_from_args(args), offload_dir=args.offload_dir, memory_limit=limit) as engine:
        bot = Chat(
            engine.generate,
            model.tokenizer,
            model.config.max_positions,
            eos_token_ids=model.config.eos_token_ids,
            **{
                k: v
                for k, v in sampling_from_args(args).items()
                if k not in ("top_k", "stop_token_ids", "stop_strings")
            },
        )
        while True:
            if interactive:
                print("Human: ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                return 0
            print(f"Assistant: {bot.reply(line.strip())}", flush=True)


def presets(args: argparse.Namespace) -> int:
    """Print every preset with its size."""
    from flexlab.models.config import get_preset, preset_names
    from flexlab.models.registry import num_parameters, weight_bytes

    print(f"{'preset':<16}{'params':>10}{'layers':>8}{'hidden':>8}{'fp16 GiB':>10}{'KV MiB/tok':>12}")
    for name in preset_names():
        c = get_preset(name)
        print(
            f"{name:<16}{num_parameters(c) / 1e6:>9.1f}M{c.num_layers:>8}{c.hidden_size:>8}"
            f"{weight_bytes(c, 2) / 2**30:>10.2f}{c.kv_cache_bytes_per_token(2) / 2**20:>12.3f}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    hugepages.enable_before_torch()  # torch reads it at its first allocation: before any command loads it
    parser = _Parser(prog="flexlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate with an offloading policy, print throughput, plot the timeline")
    p.add_argument("--model", help="checkpoint directory or hub id (default: the pydoc-trained model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs of each path, compared by their medians")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="compute dtype (default: float16 on CUDA; bfloat16 on a CPU with native bf16, else float32)",
    )
    p.add_argument("--offload-dir", default=None, help="where disk-tier data goes (default: a temp dir)")
    p.add_argument("--out", default="flexlab-demo", help="folder for the timeline picture and traces")
    p.set_defaults(func=demo)

    p = sub.add_parser("generate", help="generate for prompts under a policy")
    add_model_args(p)
    add_policy_args(p)
    p.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", help='a prompt as token ids, e.g. "2 5 6" (repeatable)')
    p.add_argument("--prompts-file", help="a file with one prompt per line")
    p.add_argument("--timeline", help="save the run's timeline as JSON here")
    p.add_argument("--log-file", help="append a line of JSON per run here (model, policy, metrics), as FlexGen's")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (ids, texts, metrics)")
    add_pipeline_args(p)
    add_sampling_args(p)
    p.set_defaults(func=generate)

    p = sub.add_parser("bench", help="throughput of a policy or a sweep; writes CSV, JSON and plots")
    add_model_args(p)
    add_policy_args(p)
    p.add_argument("--sweep", action="store_true", help="run the standard sweep of placements (on top of the policy)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--num-prompts", type=int, help="default: one block (gpu batch size x batches)")
    p.add_argument("--out", default="flexlab-bench")
    p.set_defaults(func=bench)

    add_cost_commands(sub)  # search, calibrate

    p = sub.add_parser("convert", help="checkpoint -> safetensors the engine reads in place from disk")
    p.add_argument("source", help="checkpoint directory or hub id (with --random: a preset name)")
    p.add_argument("target", help="a new directory")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="convert the weights to this dtype (with --random, default float16)",
    )
    p.add_argument(
        "--random",
        action="store_true",
        help="write the preset's random weights (one tensor at a "
        "time: any size fits in memory), e.g. for benchmarks without a download",
    )
    p.add_argument("--seed", type=int, default=0, help="with --random: the weights' seed")
    p.set_defaults(func=convert)

    p = sub.add_parser("chat", help="a multi-turn chat in the terminal")
    add_model_args(p)
    add_policy_args(p)
    add_sampling_args(p)
    p.set_defaults(func=chat, max_new_tokens=64)

    p = sub.add_parser(
        "eval",
        help="lm-evaluation-harness with flexlab as the model (the rest is lm-eval's: --tasks, --model_args, ...)",
        add_help=False,
    )
    p.set_defaults(func=evaluate, rest=[])  # (main hands the rest of the line over before parsing)

    sub.add_parser("presets", help="list model presets and their sizes").set_defaults(func=presets)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # the rest is lm-eval's own line, options included: argparse would claim them
        return run_guarded(evaluate, argparse.Namespace(rest=argv[1:]))
    args = parser.parse_args(argv)
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
