"""Reference-path and engine throughput against transformers' generate, same weights, same run.

The "no offloading" baseline: flexlab's reference path (everything on the compute device), the
engine with everything resident (one GPU batch of the whole batch: its loop's overhead, issue 21;
on a CPU in bfloat16 with its matrices packed, and again with them plain as the reference holds
them) and ``OPTForCausalLM.generate`` with identical random weights, timed side by side, alternating,
so that machine noise hits all three. Prints a table and writes CSV + JSON metadata under
``experiments/results/``.

    python experiments/reference_throughput.py                 # CPU: opt-125m in the CPU's fast dtype
    python experiments/reference_throughput.py --preset opt-1.3b --batch 16   # e.g. on a GPU
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import torch

from _common import parse_config, write_results


@dataclass
class Config:
    preset: str = "opt-125m"
    batch: int = 4
    prompt_len: int = 128
    gen_len: int = 32
    repeats: int = 3
    dtype: str = "auto"  # float16 on CUDA; on a CPU bfloat16 where it is native, else float32
    threads: int = 0  # torch's CPU threads; 0: its default (one thread's runs repeat closer on a shared host)
    out_dir: str = "experiments/results"


def hf_model_with_same_weights(model, dtype, device):
    from transformers import OPTConfig, OPTForCausalLM

    from flexlab.models.opt import config_to_hf

    with torch.device("meta"):  # no random init: it took a minute for opt-1.3b on two cores
        hf = OPTForCausalLM(OPTConfig(**config_to_hf(model.config), dtype=dtype))
    state = {"model." + name: model.weights.get(name, dtype) for name in model.weights.specs}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    left = [name for name, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not left, f"weights left uninitialised: {left}"
    return hf.to(device).eval()


def main(cfg: Config) -> pd.DataFrame:
    import flexlab
    from flexlab.models import layers

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = flexlab.Model.from_config(
        cfg.preset, seed=0, device=device, dtype=None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    )
    hf = hf_model_with_same_weights(model, model.dtype, device)
    packs = layers.packs(device, model.dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, model.config.vocab_size, (cfg.batch, cfg.prompt_len), generator=gen)
    prompts[:, 0] = 2

    def run_flexlab():
        r = model.generate(prompts.tolist(), max_new_tokens=cfg.gen_len, stop_token_ids=None)
        return r.token_ids

    engine = flexlab.Engine(model, flexlab.Policy(gpu_batch_size=cfg.batch))
    # on a CPU in bfloat16 the engine holds its matrices packed (flexlab.models.layers.packed); the
    # plain engine holds them as the reference path does, which leaves the loop's own overhead
    plain = flexlab.Engine(model, flexlab.Policy(gpu_batch_size=cfg.batch), pack_weights=False) if packs else None

    def run_engine(e=engine):
        return e.generate(prompts.tolist(), max_new_tokens=cfg.gen_len, stop_token_ids=None).token_ids

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(
                prompts.to(device),
                attention_mask=torch.ones_like(prompts).to(device),
                max_new_tokens=cfg.gen_len,
                min_new_tokens=cfg.gen_len,
                do_sample=False,
                pad_token_id=1,
            )
        return out[:, cfg.prompt_len :].tolist()

    rows, outputs = [], {}
    for rep in range(cfg.repeats + 1):  # the first round warms up and is not recorded
        systems = [("flexlab reference", run_flexlab), ("flexlab engine", run_engine)]
        if plain is not None:
            systems.append(("flexlab engine, plain matrices", lambda: run_engine(plain)))
        for name, fn in (*systems, ("transformers generate", run_hf)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outputs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            print(f"round {rep}{' (warm-up)' if not rep else ''}: {name} {seconds:.2f} s", flush=True)
            if rep:
                rows.append(
                    dict(system=name, repeat=rep, seconds=seconds, tokens_per_s=cfg.batch * cfg.gen_len / seconds)
                )
    engine.close()
    if plain is not None:
        plain.close()
    df = pd.DataFrame(rows)
    summary = df.groupby("system").agg(median_s=("seconds", "median"), tokens_per_s=("tokens_per_s", "median"))
    a, b = outputs["flexlab reference"], outputs["transformers generate"]
    agreement = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (cfg.batch * cfg.gen_len)
    print(f"{cfg.preset}, batch {cfg.batch}, prompt {cfg.prompt_len}, gen {cfg.gen_len}, {model.dtype}, {device}")
    print(summary.to_string())
    tok_s = summary["tokens_per_s"]
    ratio = tok_s["flexlab reference"] / tok_s["transformers generate"]
    engine_ratio = tok_s["flexlab engine"] / tok_s["transformers generate"]
    print(f"flexlab reference / transformers throughput: {ratio:.2f}x; greedy token agreement: {agreement:.1%}")
    print(
        f"flexlab engine / transformers: {engine_ratio:.2f}x; engine / reference: "
        f"{tok_s['flexlab engine'] / tok_s['flexlab reference']:.2f}x"
    )
    if plain is not None:
        print(f"plain engine / reference: {tok_s['flexlab engine, plain matrices'] / tok_s['flexlab reference']:.2f}x")
        assert outputs["flexlab engine, plain matrices"] == a, "the plain engine's tokens differ from the reference's"
    assert outputs["flexlab engine"] == a, "the engine's tokens differ from the reference path's"

    write_results(
        df,
        cfg,
        f"reference_throughput_{cfg.preset}_{device.type}_b{cfg.batch}",
        dtype=str(model.dtype),
        torch_threads=torch.get_num_threads(),
        ratio=ratio,
        engine_ratio=engine_ratio,
        token_agreement=agreement,
    )
    return df


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
