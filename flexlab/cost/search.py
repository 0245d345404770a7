"""Which policy to use: a linear program over the placement shares, inside an enumeration of
batch shapes, activation tiers and compression settings; every candidate is then checked with
the full cost model, and the fastest one that fits is returned.

The LP (FlexGen's idea, with the cost model's terms): for fixed ``gpu_batch_size``,
``num_gpu_batches`` and activation tier, the per-token time of the prefill and of an average
decode step are each at least the compute time and at least the time on the disk and on the
host↔device link, all linear in the shares ``wg, wc, cg, cc``; memory per tier is linear in
them too. Minimise ``prefill + (gen_len − 1) · decode`` subject to the capacities.

    >>> from flexlab import get_preset
    >>> from flexlab.cost import get_hardware, search_policy
    >>> found = search_policy(get_preset("opt-30b"), get_hardware("colab-t4"), prompt_len=512, gen_len=32)
    >>> found.policy.w_disk_percent > 0            # 60 GB of weights: some must go to disk
    True
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from flexlab.compress import QuantConfig
from flexlab.cost.hardware import HardwareProfile
from flexlab.cost.model import CostModel, Prediction
from flexlab.engine.policy import Policy
from flexlab.errors import FlexlabError
from flexlab.models.config import ModelConfig

ACT_TIERS = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0)}


@dataclass
class SearchResult:
    """The chosen policy, its prediction, and every candidate tried (for plots and tables)."""

    policy: Policy
    prediction: Prediction
    candidates: list[dict]


# Placements whose predictions the LP interpolates between: (w_gpu, w_cpu, cache_gpu, cache_cpu).
EXTREMES = {"base": (100, 0, 100, 0), "w_disk": (0, 0, 100, 0), "w_cpu": (0, 100, 100, 0),
            "c_disk": (100, 0, 0, 0), "c_cpu": (100, 0, 0, 100)}


def _features(pred: Prediction) -> np.ndarray:
    """Seconds on compute, disk and link over the run, and peak bytes on gpu, cpu, disk."""
    busy = [sum(r[f"{k}_s"] for r in pred.stages) for k in ("compute", "disk", "link")]
    return np.array(busy + [pred.peak_bytes[t] for t in ("gpu", "cpu", "disk")])


def _solve_shares(base: Policy, config: ModelConfig, hw: HardwareProfile, prompt_len: int, gen_len: int,
                  itemsize: int, margin: float) -> np.ndarray | None:
    """The LP over ``(wg, wc, cg, cc, T)``; the shares as fractions, or None if nothing fits.

    Each feature is interpolated linearly from the extremes: with ``B`` all on gpu and ``E_*``
    one part moved wholly to one tier, ``f(x) = K + wg (B − E_wd) + wc (E_wc − E_wd)
    + cg (B − E_cd) + cc (E_cc − E_cd)`` with ``K = E_wd + E_cd − B``. Capacities are reduced by
    ``margin`` because the engine places whole tensors, not exact shares.
    """
    f = {}
    for name, (wg, wc, cg, cc) in EXTREMES.items():
        policy = base.replace(w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc)
        f[name] = _features(CostModel(config, policy, hw, prompt_len=prompt_len, gen_len=gen_len,
                                      itemsize=itemsize).predict())
    const = f["w_disk"] + f["c_disk"] - f["base"]
    coef = np.stack([f["base"] - f["w_disk"], f["w_cpu"] - f["w_disk"], f["base"] - f["c_disk"],
                     f["c_cpu"] - f["c_disk"]], axis=1)  # [features, 4]
    a_ub = [list(coef[r]) + [-1.0] for r in range(3)]  # each resource's seconds <= T
    b_ub = [-const[r] for r in range(3)]
    caps = tuple((1 - margin) * c for c in (hw.gpu_memory, hw.cpu_memory, hw.disk_space))
    a_ub += [list(coef[3 + i]) + [0.0] for i in range(3)]  # memory per tier <= its capacity
    b_ub += [caps[i] - const[3 + i] for i in range(3)]
    a_ub += [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]  # shares of one thing sum to at most 1
    b_ub += [1, 1]
    # Ties (compute-bound: any share under the compute) go to the faster tier: a tiny reward for
    # keeping things on gpu, then cpu.
    eps = 1e-4 * max(const[0], 1e-9)
    res = linprog(c=[-2 * eps, -eps, -2 * eps, -eps, 1.0], A_ub=a_ub, b_ub=b_ub, bounds=[(0, 1)] * 4 + [(0, None)],
                  method="highs")
    return res.x[:4] if res.status == 0 else None


def search_policy(config: ModelConfig, hw: HardwareProfile, *, prompt_len: int, gen_len: int, itemsize: int = 2,
                  batch_sizes=(1, 2, 4, 8, 16, 32, 64), num_batches=(1, 2, 4, 8),
                  compress: tuple[QuantConfig | None, ...] = (None,), act_tiers=("gpu", "cpu"),
                  progress: bool = False) -> SearchResult:
    """The fastest policy (by the cost model) whose peak memory fits ``hw``'s capacities.

    Capacities are per tier. On a machine without a GPU the gpu and cpu tiers are the same RAM:
    split the RAM you allow between ``gpu_memory`` and ``cpu_memory``.
    """
    if prompt_len + gen_len > config.max_positions:
        raise FlexlabError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds {config.name}'s "
                           f"{config.max_positions} positions")
    from tqdm.auto import tqdm

    grid = list(itertools.product(batch_sizes, num_batches, act_tiers, compress))
    candidates, best = [], None
    smallest: dict[str, float] | None = None
    for bs, nb, act, cq in tqdm(grid, desc="policy search", disable=not progress):
        base = Policy(gpu_batch_size=bs, num_gpu_batches=nb, act_gpu_percent=ACT_TIERS[act][0],
                      act_cpu_percent=ACT_TIERS[act][1], compress_weight=cq, compress_cache=cq)
        found = None
        x = _solve_shares(base, config, hw, prompt_len, gen_len, itemsize, margin=0.03)
        # The LP interpolates memory linearly, but whole tensors are placed and read buffers follow
        # the largest stage: if the exact footprint overshoots, move shares to disk step by step.
        for keep in ((1.0, 0.9, 0.75, 0.5, 0.25, 0.0) if x is not None else ()):
            wg, wc, cg, cc = (max(0.0, round(float(v) * keep * 100, 1)) for v in x)  # max: no -0.0
            policy = base.replace(w_gpu_percent=wg, w_cpu_percent=min(wc, 100 - wg), cache_gpu_percent=cg,
                                  cache_cpu_percent=min(cc, 100 - cg))
            pred = CostModel(config, policy, hw, prompt_len=prompt_len, gen_len=gen_len, itemsize=itemsize).predict()
            if all(pred.peak_bytes[t] <= cap for t, cap in
                   (("gpu", hw.gpu_memory), ("cpu", hw.cpu_memory), ("disk", hw.disk_space))):
                found = (policy, pred)
                break
        if found is None:
            footprint = CostModel(config, base.replace(w_gpu_percent=0, cache_gpu_percent=0), hw,
                                  prompt_len=prompt_len, gen_len=gen_len, itemsize=itemsize).peak_bytes()
            if smallest is None or sum(footprint.values()) < sum(smallest.values()):
                smallest = footprint
            continue
        policy, pred = found
        candidates.append(dict(policy=policy.describe(), gpu_batch_size=bs, num_gpu_batches=nb, act_tier=act,
                               compress=cq.describe() if cq else "none", throughput_tok_s=pred.throughput_tok_s,
                               **{f"peak_bytes_{t}": v for t, v in pred.peak_bytes.items()}))
        if best is None or pred.throughput_tok_s > best[1].throughput_tok_s:
            best = found
    if best is None:
        need = smallest or {}
        raise FlexlabError(
            f"no policy fits {config.name} (prompt {prompt_len}, gen {gen_len}) in gpu {hw.gpu_memory / 2**30:.1f} "
            f"GiB, cpu {hw.cpu_memory / 2**30:.1f} GiB, disk {hw.disk_space / 2**30:.1f} GiB; the smallest "
            f"footprint tried (everything off the gpu) needs gpu {need.get('gpu', float('nan')) / 2**30:.2f}, cpu "
            f"{need.get('cpu', float('nan')) / 2**30:.2f} and disk {need.get('disk', float('nan')) / 2**30:.1f} GiB: "
            "free disk space, allow compression, or try smaller batches")
    return SearchResult(best[0], best[1], candidates)
