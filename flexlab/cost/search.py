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
from flexlab.engine.footprint import Footprint
from flexlab.engine.policy import Policy
from flexlab.errors import FlexlabError
from flexlab.models.config import ModelConfig

ACT_TIERS = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0)}
REFINED = 3  # LP picks refined on the exact model (see _refine)


@dataclass
class SearchResult:
    """The chosen policy, its prediction, and every candidate tried (for plots and tables)."""

    policy: Policy
    prediction: Prediction
    candidates: list[dict]


# Placements whose predictions the LP interpolates between: (w_gpu, w_cpu, cache_gpu, cache_cpu).
EXTREMES: dict[str, tuple[float, float, float, float]] = {
    "base": (100, 0, 100, 0),
    "w_disk": (0, 0, 100, 0),
    "w_cpu": (0, 100, 100, 0),
    "c_disk": (100, 0, 0, 0),
    "c_cpu": (100, 0, 0, 100),
}


def _features(pred: Prediction) -> np.ndarray:
    """Seconds on compute, disk and link over the run, and peak bytes on gpu, cpu, disk."""
    busy = [sum(r[f"{k}_s"] for r in pred.stages) for k in ("compute", "disk", "link")]
    return np.array(busy + [pred.peak_bytes[t] for t in ("gpu", "cpu", "disk")])


def _extremes(front: float | None) -> dict[str, tuple[float, float, float, float]]:
    """:data:`EXTREMES`, or with ``front`` (a weight percent: see
    :meth:`CostModel.tied_front`) those of the placements that keep the tied weights on the cpu
    tier: the weights' zero point is then ``front`` percent on the cpu tier, the rest on disk,
    and the weights' one point all on the cpu tier."""
    if front is None:
        return EXTREMES
    return {
        "base": (0, 100, 100, 0),
        "w_disk": (0, front, 100, 0),
        "w_cpu": (0, 100, 100, 0),
        "c_disk": (0, 100, 0, 0),
        "c_cpu": (0, 100, 0, 100),
    }


def _percents(x: np.ndarray, keep: float, front: float | None) -> tuple[float, ...]:
    """The LP's shares, scaled by ``keep`` (what is not kept goes to disk), as a policy's
    ``(w_gpu, w_cpu, cache_gpu, cache_cpu)`` percents (see :func:`_extremes` for ``front``)."""
    wg, wc, cg, cc = (max(0.0, round(float(v) * keep * 100, 1)) for v in x)  # max: no -0.0
    if front is not None:  # wc is the share of what lies past the tied weights
        wg, wc = 0.0, round(front + wc * (100 - front) / 100, 1)
    return wg, min(wc, 100 - wg), cg, min(cc, 100 - cg)


def _solve_shares(
    base: Policy, predict, hw: HardwareProfile, margin: float, front: float | None = None
) -> np.ndarray | None:
    """The LP over ``(wg, wc, cg, cc, T)``; the shares as fractions, or None if nothing fits.

    Each feature is interpolated linearly from the extremes: with ``B`` all on gpu and ``E_*``
    one part moved wholly to one tier, ``f(x) = K + wg (B − E_wd) + wc (E_wc − E_wd)
    + cg (B − E_cd) + cc (E_cc − E_cd)`` with ``K = E_wd + E_cd − B``. Capacities are reduced by
    ``margin`` because the engine places whole tensors, not exact shares. With ``front`` the
    extremes are :func:`_extremes`' and ``wg`` is held at 0 (the gpu share would come first,
    before the tied weights).
    """
    f = {}
    for name, (wg, wc, cg, cc) in _extremes(front).items():
        policy = base.replace(w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc)
        pred = predict(policy)
        f[name] = _features(pred)
        if name == "base":
            gpu_extra, host_extra = _overheads(pred, hw)
    const = f["w_disk"] + f["c_disk"] - f["base"]
    coef = np.stack(
        [f["base"] - f["w_disk"], f["w_cpu"] - f["w_disk"], f["base"] - f["c_disk"], f["c_cpu"] - f["c_disk"]], axis=1
    )  # [features, 4]
    a_ub = [list(coef[r]) + [-1.0] for r in range(3)]  # each resource's seconds <= T
    b_ub = [-const[r] for r in range(3)]
    # the engine's bytes may use what the process's other needs leave (nearly the same for every share)
    caps = (
        (1 - margin) * hw.gpu_memory - gpu_extra,
        (1 - margin) * hw.cpu_memory - host_extra,
        (1 - margin) * hw.disk_space,
    )
    if hw.has_link:
        a_ub += [list(coef[3 + i]) + [0.0] for i in range(3)]  # memory per tier <= its capacity
        b_ub += [caps[i] - const[3 + i] for i in range(3)]
    else:  # one RAM: the gpu and cpu tiers together <= both capacities together; disk on its own
        a_ub += [list(coef[3] + coef[4]) + [0.0], list(coef[5]) + [0.0]]
        b_ub += [caps[0] + caps[1] - const[3] - const[4], caps[2] - const[5]]
    a_ub += [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]  # shares of one thing sum to at most 1
    b_ub += [1, 1]
    # Ties (compute-bound: any share under the compute) go to the faster tier: a tiny reward for
    # keeping things on gpu, then cpu.
    eps = 1e-4 * max(const[0], 1e-9)
    res = linprog(
        c=[-2 * eps, -eps, -2 * eps, -eps, 1.0],
        A_ub=a_ub,
        b_ub=b_ub,
        bounds=[(0, 0 if front is not None else 1)] + [(0, 1)] * 3 + [(0, None)],
        method="highs",
    )
    return res.x[:4] if res.status == 0 else None


# The share of each memory capacity a search leaves free. The whole-process prediction is within
# a few percent on most runs but off by up to 9-14% on some (experiments/validate_memory.py), and a
# cgroup also charges the page cache: with 5% left free, opt-1.3b's pick under a 1.2 GB cgroup
# peaked 6% above its prediction and was killed (bloom-1b7's at 98% of 3 GB, 1% above, before any).
HEADROOM = 0.10


def fits(fp: Footprint | None, hw: HardwareProfile, headroom: float = 0.0) -> bool:
    """Whether a predicted run (its ``Prediction.footprint``) fits ``hw``'s capacities, as the
    whole process: its host peak
    (runtime base, engine bytes on host tiers, workspace and slack; see
    :class:`~flexlab.engine.footprint.Footprint`) within the host RAM, the GPU's within its
    memory, the disk tier within the disk. Without a GPU (``hw.has_link`` is False) the gpu and
    cpu tiers are the same RAM: the process counts against the sum of the two capacities, so the
    RAM may be split between the tiers however the policy needs. A prediction without a
    footprint (not made for a search) fits nothing. ``headroom``: the share of each memory
    capacity to leave free (the search's :data:`HEADROOM`)."""
    if fp is None or fp.tracked["disk"] > hw.disk_space:
        return False
    room = 1 - headroom
    if not hw.has_link:
        return fp.host <= room * (hw.gpu_memory + hw.cpu_memory)
    return fp.device <= room * hw.gpu_memory and fp.host <= room * hw.cpu_memory


def _overheads(pred: Prediction, hw: HardwareProfile) -> tuple[float, float]:
    """What the process holds beyond the engine's tracked bytes, on the GPU and on the host (on a
    CPU the two are one RAM: all of it on the host): the LP's capacities are reduced by these."""
    fp = pred.footprint
    assert fp is not None, "a search's predictions carry the process footprint"
    if hw.has_link:
        return fp.device - fp.tracked["gpu"], fp.host - fp.tracked["cpu"]
    return 0.0, fp.host - fp.tracked["gpu"] - fp.tracked["cpu"]


def _neighbours(policy: Policy, step: float) -> list[Policy]:
    """Policies that move ``step`` percentage points of the weights or of the cache from one tier
    to another (as much as there is, if less)."""
    out = []
    for gpu_field, cpu_field in (("w_gpu_percent", "w_cpu_percent"), ("cache_gpu_percent", "cache_cpu_percent")):
        shares = {"gpu": getattr(policy, gpu_field), "cpu": getattr(policy, cpu_field)}
        shares["disk"] = 100 - shares["gpu"] - shares["cpu"]
        for src, dst in itertools.permutations(shares, 2):
            amount = min(step, shares[src])
            if amount <= 0:
                continue
            moved = dict(shares, **{src: shares[src] - amount, dst: shares[dst] + amount})
            out.append(policy.replace(**{gpu_field: round(moved["gpu"], 1), cpu_field: round(moved["cpu"], 1)}))
    return out


def _refine(found: tuple[Policy, Prediction], predict, hw: HardwareProfile) -> tuple[Policy, Prediction]:
    """The LP's pick improved on the exact model. The LP interpolates memory linearly, but read
    buffers follow the largest stage on disk, so keeping one more stage (the embedding) in memory
    can shrink the footprint, and the best policy can lie off the LP's line. So: the best that
    fits of the LP's pick and a coarse grid of shares (halves), then a climb to the best
    neighbour while it is predicted faster, in steps of 10 then 2.5 points."""
    halves = [(g, c) for g in (0, 50, 100) for c in range(0, 101 - g, 50)]
    grid = [
        found[0].replace(w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc)
        for wg, wc in halves
        for cg, cc in halves
    ]
    tried = [(p, predict(p)) for p in grid]
    best = max([found] + [t for t in tried if fits(t[1].footprint, hw, HEADROOM)], key=lambda t: t[1].throughput_tok_s)
    for step in (10.0, 2.5):
        while True:
            tried = [(p, predict(p)) for p in _neighbours(best[0], step)]
            better = [
                t
                for t in tried
                if fits(t[1].footprint, hw, HEADROOM) and t[1].throughput_tok_s > best[1].throughput_tok_s * (1 + 1e-6)
            ]
            if not better:
                break
            best = max(better, key=lambda t: t[1].throughput_tok_s)
    return best


def _first_fit(base: Policy, front: float | None, predict, hw: HardwareProfile) -> tuple[Policy, Prediction] | None:
    """The LP's shares for ``base``'s shape, or None if none fit. The LP interpolates memory
    linearly, but whole tensors are placed and read buffers follow the largest stage: where the
    exact footprint overshoots, the shares move to disk step by step."""
    x = _solve_shares(base, predict, hw, margin=HEADROOM + 0.03, front=front)
    if x is None:
        return None
    for keep in (1.0, 0.9, 0.75, 0.5, 0.25, 0.0):
        wg, wc, cg, cc = _percents(x, keep, front)
        policy = base.replace(w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc)
        pred = predict(policy)
        if fits(pred.footprint, hw, HEADROOM):
            return policy, pred
    return None


def search_policy(
    config: ModelConfig,
    hw: HardwareProfile,
    *,
    prompt_len: int,
    gen_len: int,
    itemsize: int = 2,
    batch_sizes=(1, 2, 4, 8, 16, 32, 64),
    num_batches=(1, 2, 4, 8),
    compress: tuple[QuantConfig | None, ...] = (None,),
    compress_cache: tuple[QuantConfig | None, ...] | None = None,
    act_tiers=("gpu", "cpu"),
    cpu_cache_compute: tuple[bool, ...] | None = None,
    sep_layer: tuple[bool, ...] = (True,),
    layers: range | None = None,
    checkpoint_itemsize: int | None = None,
    attn_sparsity: float = 1.0,
    refined: int = REFINED,
    progress: bool = False,
) -> SearchResult:
    """The fastest policy (by the cost model) whose peak memory fits ``hw``'s capacities, less a
    :data:`HEADROOM` of each memory tier's for the prediction's error.

    Capacities are per tier. On a machine without a GPU the gpu and cpu tiers are the same RAM:
    split the RAM you allow between ``gpu_memory`` and ``cpu_memory`` (``calibrate()`` gives each
    half); the search counts only their sum (see :func:`fits`).

    The grid: every combination of ``batch_sizes`` x ``num_batches``, activation tier, weight
    compression (``compress``), cache compression (``compress_cache``; default: the same options
    as ``compress``, chosen independently), ``cpu_cache_compute`` (default: both where there is
    a GPU; on a CPU the host tier is attended in place anyway) and ``sep_layer``. ``layers``: search
    for a pipeline rank holding only those layers (see :func:`flexlab.cost.search_pipeline`).
    ``checkpoint_itemsize``: as :class:`CostModel`'s (a checkpoint read in place from disk).
    ``attn_sparsity``: every candidate's (sparse attention trades accuracy for reads, so it is the
    user's choice, not the search's; its value reads are priced as :mod:`flexlab.cost.sparse` says).
    ``refined``: how many of the best LP picks are refined on the exact model.
    """
    if prompt_len + gen_len > config.max_positions:
        raise FlexlabError(
            f"prompt_len + gen_len = {prompt_len + gen_len} exceeds {config.name}'s {config.max_positions} positions"
        )
    from tqdm.auto import tqdm

    cache_options = compress if compress_cache is None else compress_cache
    cpu_options = cpu_cache_compute if cpu_cache_compute is not None else ((False, True) if hw.has_link else (False,))
    grid = list(itertools.product(batch_sizes, num_batches, act_tiers, compress, cache_options, cpu_options, sep_layer))

    shared: dict = {}  # the prices every candidate's model may share (see CostModel)

    def model(policy: Policy) -> CostModel:
        return CostModel(
            config,
            policy,
            hw,
            prompt_len=prompt_len,
            gen_len=gen_len,
            itemsize=itemsize,
            layers=layers,
            checkpoint_itemsize=checkpoint_itemsize,
            shared=shared,
        )

    def predict(policy: Policy) -> Prediction:
        return model(policy).predict()

    candidates, found_all = [], []
    smallest: Footprint | None = None
    fronts_by_sep = {sep: model(Policy(sep_layer=sep)).tied_front() for sep in sep_layer}
    for bs, nb, act, cw, cc, on_cpu, sep in tqdm(grid, desc="policy search", disable=not progress):
        base = Policy(
            gpu_batch_size=bs,
            num_gpu_batches=nb,
            act_gpu_percent=ACT_TIERS[act][0],
            act_cpu_percent=ACT_TIERS[act][1],
            compress_weight=cw,
            compress_cache=cc,
            cpu_cache_compute=on_cpu,
            sep_layer=sep,
            attn_sparsity=attn_sparsity,
        )
        # Read buffers follow the largest stages, so memory is not linear in the weights' shares
        # where a tied token table outweighs the layers: all on disk, it takes a buffer of its
        # size. A second LP keeps it on the cpu tier and shares out the rest.
        for front in dict.fromkeys([None, fronts_by_sep[sep]]):
            found = _first_fit(base, front, predict, hw)
            if found is None:
                least = model(base.replace(w_gpu_percent=0, w_cpu_percent=front or 0, cache_gpu_percent=0)).footprint()
                if smallest is None or least.host + least.device < smallest.host + smallest.device:
                    smallest = least
                continue
            found_all.append(found)
            candidates.append(_candidate(*found))
    if not found_all:
        memory = (
            f"gpu {hw.gpu_memory / 2**30:.1f} GiB, cpu {hw.cpu_memory / 2**30:.1f} GiB"
            if hw.has_link
            else f"RAM {(hw.gpu_memory + hw.cpu_memory) / 2**30:.1f} GiB (gpu and cpu tiers together)"
        )
        need = "nothing was tried"
        if smallest is not None:
            gpu = f"gpu {smallest.device / 2**30:.2f} GiB, " if hw.has_link else ""
            need = (
                f"{gpu}host {smallest.host / 2**30:.2f} GiB as a whole process (runtime base "
                f"{smallest.runtime_base / 2**30:.2f}) and disk {smallest.tracked['disk'] / 2**30:.1f} GiB"
            )
        raise FlexlabError(
            f"no policy fits {config.name} (prompt {prompt_len}, gen {gen_len}) in {memory} less the "
            f"{HEADROOM:.0%} the search keeps free, disk "
            f"{hw.disk_space / 2**30:.1f} GiB; the smallest footprint tried (everything off the gpu) needs {need}: "
            + (
                "free disk space, or try fewer bits (e.g. 3:64) or smaller batches"
                if any(q is not None for q in (*compress, *cache_options))
                else "free disk space, allow compression (--compress), or try smaller batches"
            )
        )
    # The few best LP picks, each refined on the exact model; the fastest of them wins.
    top = sorted(found_all, key=lambda f: f[1].throughput_tok_s, reverse=True)[: max(1, refined)]
    picks = [_refine(f, predict, hw) for f in top]
    candidates += [_candidate(*r) for r, f in zip(picks, top) if r[0] != f[0]]
    best = max(picks, key=lambda r: r[1].throughput_tok_s)
    return SearchResult(best[0], best[1], candidates)


def _candidate(policy: Policy, pred: Prediction) -> dict:
    """One row of ``SearchResult.candidates``."""
    cw, cc = policy.compress_weight, policy.compress_cache
    return dict(
        policy=policy.describe(),
        gpu_batch_size=policy.gpu_batch_size,
        num_gpu_batches=policy.num_gpu_batches,
        act_tier=next(
            t for t, shares in ACT_TIERS.items() if shares == (policy.act_gpu_percent, policy.act_cpu_percent)
        ),
        compress_weight=cw.describe() if cw else "none",
        compress_cache=cc.describe() if cc else "none",
        cpu_cache_compute=policy.cpu_cache_compute,
        sep_layer=policy.sep_layer,
        throughput_tok_s=pred.throughput_tok_s,
        **{f"peak_bytes_{t}": v for t, v in pred.peak_bytes.items()},
    )
