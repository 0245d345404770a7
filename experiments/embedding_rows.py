"""Weights on disk: what a decode token reads, and how fast it runs, for models whose token table
is a large share of their weights (OPT-125M: 31%; Qwen2.5-0.5B and Llama-3.2-1B with a few of their
layers: most of them).

Every weight lives on disk (random weights, read with O_DIRECT); the table prints, per model, the
weight bytes one decode token reads (the stages' loads, and the rows the embedding reads of the
token table: ``read_rows``), the decode throughput and the whole run's. Run it under two checkouts
to compare a change (``PYTHONPATH=/path/to/other/checkout``, ``--label``): that is how the
embedding's row reads were measured against loading the whole table (docs/measured.md).

    python experiments/embedding_rows.py --label rows
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import pandas as pd
import torch

from _common import cpu_dtype, parse_config, write_results


@dataclass
class Config:
    presets: str = "opt-125m,qwen2.5-0.5b:4,llama-3.2-1b:2"  # name[:layers kept]
    gpu_batch_size: int = 8
    num_gpu_batches: int = 2
    prompt_len: int = 32
    gen_len: int = 8
    repeats: int = 3  # runs per model after a warm-up (medians)
    dtype: str = "auto"
    label: str = ""  # names the results file (e.g. the checkout measured)
    out_dir: str = "experiments/results"


def main(cfg: Config) -> pd.DataFrame:
    import flexlab

    dtype = cpu_dtype(cfg.dtype)
    rows = []
    n = cfg.gpu_batch_size * cfg.num_gpu_batches
    for item in cfg.presets.split(","):
        name, _, layers = item.partition(":")
        config = flexlab.get_preset(name)
        if layers:
            config = config.replace(name=f"{name}-{layers}layers", num_layers=int(layers))
        model = flexlab.Model.from_config(config, seed=0, dtype=dtype)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(4, config.vocab_size, (n, cfg.prompt_len), generator=gen).tolist()
        policy = flexlab.Policy.from_percent(
            [0, 0, 100, 0, 100, 0], gpu_batch_size=cfg.gpu_batch_size, num_gpu_batches=cfg.num_gpu_batches
        )
        with tempfile.TemporaryDirectory() as off, flexlab.Engine(model, policy, offload_dir=off) as engine:
            engine.generate(prompts[: cfg.gpu_batch_size], max_new_tokens=2, stop_token_ids=None)  # warm-up
            runs = [
                engine.generate(prompts, max_new_tokens=cfg.gen_len, stop_token_ids=None) for _ in range(cfg.repeats)
            ]
        decode_rate = sorted(n * (cfg.gen_len - 1) / r.metrics["decode_s"] for r in runs)[len(runs) // 2]
        total_rate = sorted(r.metrics["throughput_tok_s"] for r in runs)[len(runs) // 2]
        events = runs[-1].timeline.to_pandas()
        decode = events[events.token == cfg.gen_len - 1]  # the last token: a decode step like the others
        rows.append(
            dict(
                model=config.name,
                table_share=config.vocab_size
                * config.hidden_size
                / sum(s.numel for s in model.family.weight_specs(config)),
                load_weight_MB=decode[decode.kind == "load_weight"].bytes.sum() / 1e6,
                read_rows_MB=decode[decode.kind == "read_rows"].bytes.sum() / 1e6,
                decode_tok_s=decode_rate,
                throughput_tok_s=total_rate,
            )
        )
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    stem = "embedding_rows" + (f"_{cfg.label}" if cfg.label else "")
    out = write_results(df, cfg, stem, dtype=str(dtype))
    print(f"wrote {out}/{stem}.csv and .json")
    return df


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
