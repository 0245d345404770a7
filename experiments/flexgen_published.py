"""The cost model against the one published GPU table there is: FlexGen's T4 results.

FlexGen's paper (Sheng et al., ICML 2023, Table 2 and its appendix's policies) reports the
throughput of OPT-6.7B, 30B and 175B on one T4 (16 GB) with 208 GB of DRAM and a 1.5 TB SSD,
prompt 512, 32 tokens generated, each with its own searched policy (the commands of its
``benchmark/flexgen/bench_suite.py``). For each row this prints:

* ``published``: FlexGen's measured tok/s;
* ``flexgen_model``: what FlexGen's own cost model (its paper's equations, re-derived here, with
  the rates it fitted on that machine) predicts for that policy;
* ``flexlab_model``: what flexlab's cost model predicts for the same policy on the
  ``flexgen-t4`` hardware preset (FlexGen's machine and fitted rates, see flexlab.cost.hardware);
* for compressed rows, the one dequantization rate (weights and cache alike) at which flexlab's
  prediction would equal the published number: if one rate explains every compressed row, the
  cost of FlexGen's dequantization is the term that differs (flexgen-t4 keeps colab-t4's guess);
* then flexlab's own search on that machine (``--search true``): its pick and prediction.

No GPU is needed: nothing here runs a model. The published numbers are FlexGen's, measured with
its ``--debug fewer_batch`` mode (the prefill in full, then 20 decode layer-steps timed and
extrapolated to the whole run).

    python experiments/flexgen_published.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

import flexlab
from flexlab.cost import CostModel, fits, get_hardware, search_policy

from _common import parse_config, write_results

GIB = 2**30
Q4 = dict(bits=4, group_size=64)
# model, FlexGen's six shares, gpu batch x batches, other fields, published tok/s (prompt 512, gen 32)
CASES = [
    ("opt-6.7b", [100, 0, 100, 0, 100, 0], 2, 1, {"overlap": False}, 25.26),
    (
        "opt-6.7b",
        [100, 0, 100, 0, 100, 0],
        72,
        1,
        {"overlap": False, "compress_weight": Q4, "compress_cache": Q4},
        29.12,
    ),
    ("opt-30b", [20, 80, 0, 100, 0, 100], 48, 3, {"cpu_cache_compute": True}, 7.32),
    ("opt-30b", [0, 100, 0, 100, 0, 100], 64, 8, {"compress_cache": Q4}, 8.70),
    ("opt-175b", [0, 50, 0, 0, 0, 100], 32, 8, {"cpu_cache_compute": True, "pin_weight": False}, 0.69),
    (
        "opt-175b",
        [0, 100, 0, 100, 0, 100],
        48,
        3,
        {"pin_weight": False, "compress_weight": Q4, "compress_cache": Q4},
        1.12,
    ),
]

# FlexGen's fitted rates for its T4 machine (experimental/cost_model.py; GB there is 2**30)
FLEXGEN_T4 = dict(
    ctog=12.89 * GIB,  # host -> GPU (weights, activations)
    gtoc_cache=0.97 * GIB,  # GPU -> host, KV cache
    gtoc_hidden=4.82 * GIB,
    dtoc=0.473 * GIB,  # disk -> host
    ctod_cache_p=0.746 * GIB,  # host -> disk, KV cache in the prefill
    ctod_hidden_p=2.015 * GIB,
    ctod_g=2.015 * GIB,
    mm_p=21.24e12,  # matmul FLOP/s in the prefill, in decode
    mm_g=4.3e12,
    bmm_p=9.97e12,  # attention FLOP/s in the prefill, in decode
    bmm_g=0.079e12,
    cpu=0.0123e12,  # attention FLOP/s on the CPU
)


@dataclass
class Config:
    prompt_len: int = 512
    gen_len: int = 32
    search: bool = True
    out_dir: str = "experiments/results"


def flexgen_model(cfg, policy, s: int, n: int, r: dict = FLEXGEN_T4) -> float:
    """FlexGen's own prediction (tok/s) for a policy: per layer, the prefill takes the longest of
    (host->GPU + disk->host), (GPU->host + host->disk) and compute; a decode step takes
    host->GPU plus the longest of the other links and compute. Its model has no term for the
    cost of compression (weights shrink 4x; the cache is modelled uncompressed)."""
    h1, h2, bls, gbs = cfg.hidden_size, cfg.ffn_dim, policy.block_size, policy.gpu_batch_size
    wg, wc, cg, cc = (x / 100 for x in (policy.w_gpu_percent, policy.w_cpu_percent, *policy.percent[2:4]))
    hg, hc = policy.act_gpu_percent / 100, policy.act_cpu_percent / 100
    wn, cn, hn = 1 - wg - wc, 1 - cg - cc, 1 - hg - hc
    wi = (8 * h1**2 + 4 * h1 * h2) / (4 if policy.compress_weight else 1)  # fp16 bytes of one layer
    ctog = (wi * (wc + wn) + 2 * s * h1 * bls * (hc + hn)) / r["ctog"]
    gtoc = 4 * (s + 1) * h1 * bls * (cc + cn) / r["gtoc_cache"] + 2 * s * h1 * bls * (hc + hn) / r["gtoc_hidden"]
    dtoc = (wi * wn + 2 * s * h1 * bls * hn) / r["dtoc"]
    ctod = 4 * bls * (s + 1) * h1 * cn / r["ctod_cache_p"] + 2 * s * h1 * bls * hn / r["ctod_hidden_p"]
    comp = bls * (8 * s * h1**2 + 4 * s * h1 * h2) / r["mm_p"] + 4 * bls * s**2 * h1 / r["bmm_p"]
    prefill = max(ctog + dtoc, gtoc + ctod, comp)
    # its CPU attention rate shrinks for small batches and narrow models
    lg, lh = max(0.0, math.log2(64 / gbs)), max(0.0, math.log2(4096 / h1))
    cpu = r["cpu"] * max(0.1, 1 + 0.0168 * lg * lh - 0.0328 * lg - 0.0621 * lh)
    mid = s + n / 2  # the average cache length in decode
    ctog = (wi * (wc + wn) + 2 * h1 * bls * (hc + hn)) / r["ctog"]
    gtoc = 2 * h1 * bls * (hc + hn) / r["gtoc_hidden"]
    dtoc = (4 * bls * mid * h1 * cn + 2 * h1 * bls * hn) / r["dtoc"] + wi * wn / (0.95 * r["dtoc"])
    ctod = (4 * bls * h1 * cn + 2 * h1 * bls * hn) / r["ctod_g"]
    comp = (
        bls * (8 * h1**2 + 4 * h1 * h2) / r["mm_g"]
        + 4 * bls * mid * h1 * cg / r["bmm_g"]
        + 4 * bls * mid * h1 * (cc + cn) / cpu
    )
    decode = ctog + max(gtoc, dtoc, ctod, comp)
    total = cfg.num_layers * (prefill + (n - 1) * decode)
    return bls * n / total


def matching_codec_rate(config, policy, hw, cfg: Config, published: float) -> float:
    """The one rate of dequantization (weights and cache alike, elements/s) at which flexlab's
    prediction equals the published throughput; nan where no rate in 0.1-1000 G/s does."""
    lo, hi = math.log(1e8), math.log(1e12)

    def tok_s(log_rate: float) -> float:
        rate = math.exp(log_rate)
        at = hw.replace(dequant_elems=rate, kv_codec_elems=rate)
        return CostModel(config, policy, at, prompt_len=cfg.prompt_len, gen_len=cfg.gen_len).predict().throughput_tok_s

    if not tok_s(lo) <= published <= tok_s(hi):
        return float("nan")
    for _ in range(40):  # throughput grows with the rate: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tok_s(mid) < published else (lo, mid)
    return math.exp(lo)


TIERS, CAPACITIES = ("gpu", "cpu", "disk"), ("gpu_memory", "cpu_memory", "disk_space")


def main(cfg: Config) -> None:
    hw = get_hardware("flexgen-t4")
    rows = []
    for name, percent, bs, nb, extra, published in CASES:
        fields = {k: flexlab.QuantConfig(**v) if k.startswith("compress") else v for k, v in extra.items()}
        policy = flexlab.Policy.from_percent(percent, gpu_batch_size=bs, num_gpu_batches=nb, **fields)
        config = flexlab.get_preset(name)
        pred = CostModel(config, policy, hw, prompt_len=cfg.prompt_len, gen_len=cfg.gen_len).predict()
        theirs = flexgen_model(config, policy, cfg.prompt_len, cfg.gen_len)
        rows.append(
            dict(
                model=name,
                policy=policy.describe(),
                published_tok_s=published,
                flexgen_model_tok_s=round(theirs, 3),
                flexlab_model_tok_s=round(pred.throughput_tok_s, 3),
                flexlab_over_published=round(pred.throughput_tok_s / published, 2),
                flexgen_model_over_published=round(theirs / published, 2),
                flexlab_bottleneck=pred.bottleneck,
                # the engine's bytes per tier within the capacities (as FlexGen's own model counts), and
                # the whole process (runtime, the prefill's workspace): FlexGen's picks may not leave room
                fits=all(pred.peak_bytes[t] <= getattr(hw, cap) for t, cap in zip(TIERS, CAPACITIES)),
                process_fits=fits(pred.footprint, hw),
                matching_dequant_g_elems_s=round(matching_codec_rate(config, policy, hw, cfg, published) / 1e9, 2)
                if policy.compress_weight or policy.compress_cache
                else float("nan"),
                **{f"peak_gib_{t}": round(v / GIB, 1) for t, v in pred.peak_bytes.items()},
            )
        )
        if cfg.search:
            compress = (
                (None, flexlab.QuantConfig(**Q4))
                if "compress_weight" in extra or "compress_cache" in extra
                else (None,)
            )
            found = search_policy(config, hw, prompt_len=cfg.prompt_len, gen_len=cfg.gen_len, compress=compress)
            rows[-1].update(
                searched_policy=found.policy.describe(), searched_tok_s=round(found.prediction.throughput_tok_s, 3)
            )
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 90):
        print(df.drop(columns=[c for c in df if c.startswith("peak")]).to_string(index=False))
    out = write_results(df, cfg, "flexgen_published_t4", hardware=hw.__dict__, flexgen_rates=FLEXGEN_T4)
    print(f"wrote {out}/flexgen_published_t4.csv and .json")


if __name__ == "__main__":
    main(parse_config(Config, __doc__))
