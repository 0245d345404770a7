"""What each compression bit costs: bits × group size × target (weights, cache, both) × KV layout.

Every setting runs through the engine under one offloading policy (weights and cache spread
over the tiers, so memory saved shows per tier). Accuracy is measured where compression acts:
perplexity by teacher-forced decode (the KV cache is written and read back compressed), token
agreement of a greedy generation with the uncompressed run, and last-word accuracy. The table
(CSV), the run's settings and versions (JSON) and a plot of accuracy against bits go to
experiments/results/.

    python experiments/ablate_compression.py                       # the small pydoc model, CPU, ~4 min
    python experiments/ablate_compression.py --model pydoc-llama   # its LLaMA-family twin
    python experiments/ablate_compression.py --model facebook/opt-1.3b --dataset wikitext-2 \\
        --dtype float16 --num-seqs 64 --seq-len 512                 # a Colab GPU
    python experiments/ablate_compression.py --smoke true           # seconds: a few settings, short text
    python experiments/ablate_compression.py --model facebook/opt-1.3b --lm-eval-tasks hellaswag,piqa \
        --lm-eval-limit 200                                         # standard tasks too (pip install flexlab[eval])
    python experiments/ablate_compression.py --lm-eval-tasks pydoc_order  # offline: flexlab.eval.local_tasks
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from _common import parse_config, write_results


@dataclass
class Config:
    model: str = "pydoc"  # "pydoc" or "pydoc-llama" (trained here, offline), a preset (random weights), HF id / path
    dataset: str = "auto"  # "auto", "wikitext-2" or "pydoc"
    dtype: str = "float32"  # float32 or bfloat16 on a CPU, float16 on a GPU
    bits: str = "8,4,3,2"
    group_sizes: str = "32,64,128"
    targets: str = "weights,cache,both"
    kv_layouts: str = "per-token,per-channel"
    seq_len: int = 128  # tokens per perplexity window
    num_seqs: int = 16
    num_prompts: int = 16
    prompt_len: int = 32
    gen_len: int = 16
    last_word_items: int = 64
    percent: str = "40,30,50,50,100,0"  # FlexGen's six shares of the base policy
    gpu_batch_size: int = 8
    num_gpu_batches: int = 2
    smoke: bool = False  # a few settings on short text, for CI and notebooks
    lm_eval_tasks: str = ""  # lm-evaluation-harness tasks run under each setting too, e.g. "hellaswag,piqa"
    lm_eval_include: str = ""  # a directory of task YAMLs of your own (lm-eval's --include_path; default: pydoc's)
    lm_eval_limit: int = 0  # documents per task (0: all)
    max_settings: int = 0  # measure only the first this many settings, the baseline included (0: all)
    out_dir: str = "experiments/results"


def load_model(cfg: Config):
    import flexlab

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype)
    if cfg.model in ("pydoc", "pydoc-llama"):
        family = "llama" if cfg.model == "pydoc-llama" else "opt"
        return flexlab.Model.from_pretrained(flexlab.pydoc_model_path(family=family), dtype=dtype, device=device)
    if cfg.model in flexlab.preset_names():
        return flexlab.Model.from_config(cfg.model, seed=0, dtype=dtype, device=device)
    return flexlab.Model.from_pretrained(cfg.model, dtype=dtype, device=device)


def lm_eval_args(cfg: Config) -> dict:
    """run_ablation's lm-eval keywords from the config (none when no task is named)."""
    if not cfg.lm_eval_tasks:
        return {}
    from lm_eval.tasks import TaskManager

    from flexlab.eval.local_tasks import pydoc_tasks_dir

    include = cfg.lm_eval_include or str(pydoc_tasks_dir())  # the offline pydoc tasks unless told otherwise
    options: dict = {"limit": cfg.lm_eval_limit or None, "task_manager": TaskManager(include_path=include)}
    return dict(lm_eval_tasks=cfg.lm_eval_tasks.split(","), lm_eval_options=options)


def main(cfg: Config):
    import flexlab
    from flexlab.eval import ablation_settings, eval_texts, last_word_items, run_ablation, token_windows
    from flexlab.viz import plot_accuracy_vs_bits

    if cfg.smoke:
        cfg.bits, cfg.group_sizes, cfg.targets = "4,2", "64", "weights,cache"
        cfg.num_seqs, cfg.seq_len, cfg.num_prompts, cfg.gen_len, cfg.last_word_items = 4, 48, 4, 4, 8
    model = load_model(cfg)
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    settings = ablation_settings(
        ints(cfg.bits), ints(cfg.group_sizes), tuple(cfg.targets.split(",")), tuple(cfg.kv_layouts.split(","))
    )
    if model.tokenizer is not None:
        dataset, texts = eval_texts(cfg.dataset)
        seqs = token_windows(texts, model.tokenizer, cfg.seq_len, limit=cfg.num_seqs)
        items = last_word_items(texts, model.tokenizer, limit=cfg.last_word_items)
    else:  # a preset with random weights: no text, so perplexity is of random tokens (mechanics only)
        dataset = "random tokens (no tokenizer)"
        g = torch.Generator().manual_seed(0)
        seqs = [
            [2] + torch.randint(4, model.config.vocab_size, (cfg.seq_len - 1,), generator=g).tolist()
            for _ in range(cfg.num_seqs)
        ]
        items = []
    prompts = [s[: cfg.prompt_len] for s in (seqs * cfg.num_prompts)[: cfg.num_prompts]]
    base = flexlab.Policy.from_percent(
        [float(x) for x in cfg.percent.split(",")],
        gpu_batch_size=cfg.gpu_batch_size,
        num_gpu_batches=cfg.num_gpu_batches,
    )
    with tempfile.TemporaryDirectory(prefix="flexlab-ablate-") as offload:
        df = run_ablation(
            model,
            settings,
            base_policy=base,
            sequences=seqs,
            prompts=prompts,
            gen_len=cfg.gen_len,
            last_word=items,
            offload_dir=offload,
            max_settings=cfg.max_settings or None,
            **lm_eval_args(cfg),
        )
    name = model.config.name
    print(
        f"{name} ({model.dtype}, {model.device}) on {dataset}: {len(seqs)} windows of {cfg.seq_len} tokens, "
        f"base policy {base.describe()}"
    )
    cols = [
        "setting",
        "perplexity",
        "perplexity_change_pct",
        "token_agreement",
        "last_word_accuracy",
        "weight_bits_per_element",
        "cache_bits_per_element",
        "saved_gpu_pct",
        "saved_cpu_pct",
        "saved_disk_pct",
        "throughput_tok_s",
    ] + [c for c in df if c.startswith("lm_eval:")]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    stem = f"ablate_compression_{name}" + ("_smoke" if cfg.smoke else "")
    out = write_results(
        df,
        cfg,
        stem,
        dataset=dataset,
        model_dtype=str(model.dtype),
        policy=base.describe(),
        transformers=__import__("transformers").__version__,
        flexlab=flexlab.__version__,
    )
    fig = plot_accuracy_vs_bits(df, title=f"{name} on {dataset}: perplexity change against compression bits")
    fig.savefig(out / f"{stem}.png", dpi=110)
    for task in cfg.lm_eval_tasks.split(",") if cfg.lm_eval_tasks else ():  # accuracy against bits per task
        metric = next((c for c in df if c.startswith(f"lm_eval:{task}:")), None)
        if metric is not None:
            fig = plot_accuracy_vs_bits(df, metric, title=f"{name}: lm-eval {task} against compression bits")
            fig.savefig(out / f"{stem}_{task}.png", dpi=110)
    return df


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
