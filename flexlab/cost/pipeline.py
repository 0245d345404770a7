"""Predicting a pipeline: each rank's time from the cost model over its share, then the ring.

A rank runs its layers for each of the G groups of the block's batches in turn (see
:func:`~flexlab.engine.schedule.block_schedule`). With ``t_r`` the seconds rank r is busy with one
group's token (the cost model over its share and that group's batches: every group loads the
rank's weights again) and ``m_r`` the hand-off of the group's hidden states (or, from the last
rank, its next tokens) to the next rank, which runs on a lane beside the compute, the steady
period of a token is

    period = max(max_r G * t_r, sum_r (t_r + m_r))

the busiest rank has G groups to do; and a group must go round the ring before its next token can
start. G = 1 makes the ranks take turns (the period is the sum); G = N keeps balanced ranks busy
at once (the period is N * t). The prefill adds the fill: its last group leaves the last rank
after ``sum_r (t_r + m_r) + (G - 1) * max_r t_r``. The bubble is the share of the ranks' time
left idle.

Ranks that are processes of one machine share its disk and its CPU (``shared_disk``): with G
groups, min(G, N) ranks work at once, so each rank is priced at that share of the disk's bandwidth
and of the host's attention rate (``cpu_cache_compute``: the host's memory bandwidth and cores,
which :func:`~flexlab.distributed.threads_per_rank` shares out the same way); taking turns, a rank
has them alone. Each GPU keeps its own link (one PCIe slot each; GPUs behind one switch would
share theirs: not modelled).

    >>> from flexlab import Policy, get_preset
    >>> from flexlab.cost import get_hardware
    >>> from flexlab.engine.pipeline import make_plan
    >>> cfg, policy = get_preset("opt-6.7b"), Policy(gpu_batch_size=8, num_gpu_batches=4)  # each share on its GPU
    >>> turns, busy = (predict_pipeline(cfg, make_plan(cfg, 4, policy, groups=g), get_hardware("colab-t4"),
    ...                                 prompt_len=512, gen_len=32) for g in (1, 4))
    >>> busy.throughput_tok_s > 2 * turns.throughput_tok_s   # four groups keep four T4s busy at once
    True
    >>> round(turns.bubble, 2), round(busy.bubble, 2)         # taking turns, each GPU idles 3/4 of the time
    (0.75, 0.32)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flexlab.cost.hardware import HardwareProfile
from flexlab.cost.model import CostModel
from flexlab.engine.pipeline import PipelinePlan
from flexlab.engine.policy import Policy
from flexlab.engine.schedule import split_batches
from flexlab.models.config import ModelConfig

LOOPBACK_BW = 2e9  # bytes/s of a gloo message between processes of one machine (TCP over loopback)


@dataclass
class PipelinePrediction:
    """What the cost model predicts for one block on a pipeline; ``ranks``: per rank, its layers,
    seconds per group token (prefill, decode), hand-off seconds and peak bytes per tier."""

    prefill_s: float
    decode_s: float
    throughput_tok_s: float
    bubble: float
    ranks: list[dict] = field(repr=False)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def predict_pipeline(
    config: ModelConfig,
    plan: PipelinePlan,
    hw: HardwareProfile | list[HardwareProfile],
    *,
    prompt_len: int,
    gen_len: int,
    itemsize: int = 2,
    hand_off_bw: float | None = None,
    checkpoint_itemsize: int | None = None,
    shared_disk: bool = False,
) -> PipelinePrediction:
    """The prediction for ``plan`` on ``hw``
    (one profile for every rank, or one per rank). ``hand_off_bw``: bytes/s between ranks
    (default: the host link where there is one, else :data:`LOOPBACK_BW`); ``checkpoint_itemsize``:
    as :class:`~flexlab.cost.CostModel`'s; ``shared_disk``: the ranks are processes of one machine
    (as ``generate --pipeline N`` starts them), whose disk and CPU the ranks at work at once share."""
    profiles = hw if isinstance(hw, list) else [hw] * plan.num_ranks
    policy0 = plan.policies[0]
    groups = split_batches(policy0.num_gpu_batches, plan.groups)
    if shared_disk:
        profiles = [shared_host(h, min(len(groups), plan.num_ranks)) for h in profiles]
    prompts = [len(g) * policy0.gpu_batch_size for g in groups]
    decode_tokens = max(gen_len - 1, 0)
    ranks, busy = [], 0.0
    prefill_t, decode_t, prefill_m, decode_m = [], [], [], []
    for r, (layers, policy, rank_hw) in enumerate(zip(plan.layers, plan.policies, profiles)):
        bw = hand_off_bw or (rank_hw.link_pageable_bw if rank_hw.has_link else LOOPBACK_BW)
        last = r == plan.num_ranks - 1
        tp = td = mp = md = 0.0
        for g, n in zip(groups, prompts):
            cm = CostModel(
                config,
                policy.replace(num_gpu_batches=len(g)),
                rank_hw,
                prompt_len=prompt_len,
                gen_len=gen_len,
                itemsize=itemsize,
                num_prompts=n,
                layers=layers,
                checkpoint_itemsize=checkpoint_itemsize,
            )
            pred = cm.predict()
            tp, td = max(tp, pred.prefill_s), max(td, pred.decode_s / decode_tokens if decode_tokens else 0.0)
            if plan.num_ranks > 1:  # the hand-off: the next token ids, or hidden states
                per_token = 8 if last else config.hidden_size * itemsize
                mp, md = max(mp, n * prompt_len * per_token / bw), max(md, n * per_token / bw)
            busy += pred.prefill_s + pred.decode_s
        # every group's cache is resident on the rank at once: its memory is the whole block's
        whole = CostModel(
            config,
            policy,
            rank_hw,
            prompt_len=prompt_len,
            gen_len=gen_len,
            itemsize=itemsize,
            layers=layers,
            checkpoint_itemsize=checkpoint_itemsize,
        ).footprint()
        ranks.append(
            dict(
                rank=r,
                layers=layers,
                prefill_group_s=tp,
                decode_group_token_s=td,
                hand_off_s=md,
                peak_bytes=whole.tracked,
                footprint=whole,
            )
        )
        prefill_t.append(tp)
        decode_t.append(td)
        prefill_m.append(mp)
        decode_m.append(md)
    n_groups = len(groups)
    prefill = sum(prefill_t) + sum(prefill_m) + (n_groups - 1) * max(prefill_t)
    period = max(n_groups * max(decode_t), sum(decode_t) + sum(decode_m))
    decode = decode_tokens * period
    total = prefill + decode
    new_tokens = sum(prompts) * gen_len
    return PipelinePrediction(
        prefill,
        decode,
        new_tokens / total if total else float("inf"),
        1 - busy / (plan.num_ranks * total) if total else 0.0,
        ranks,
    )


def shared_host(hw: HardwareProfile, ranks: int) -> HardwareProfile:
    """``hw`` as each of ``ranks`` processes at work at once on that machine sees it: a share of
    its disk's bandwidth and of its CPU's attention rate (see the module's docstring)."""
    # Without a GPU the CPU is every rank's compute device, whose rates are the rank's own already
    # (a profile measured with its threads): only the disk is shared out then.
    cpu = hw.cpu_attention_bw / ranks if hw.has_link else hw.cpu_attention_bw
    return dataclasses.replace(
        hw, disk_read_bw=hw.disk_read_bw / ranks, disk_write_bw=hw.disk_write_bw / ranks, cpu_attention_bw=cpu
    )


@dataclass
class PipelineSearchResult:
    """The fastest plan found, its prediction, and every block shape tried (tok/s, or why not)."""

    plan: PipelinePlan
    prediction: PipelinePrediction
    tried: list[dict] = field(repr=False)


def search_pipeline(
    config: ModelConfig,
    hw: HardwareProfile,
    num_ranks: int,
    *,
    prompt_len: int,
    gen_len: int,
    itemsize: int = 2,
    layers: list[int] | None = None,
    groups: int | None = None,
    batch_sizes=(4, 8, 16, 32, 64),
    num_batches=(1, 2, 4, 8),
    checkpoint_itemsize: int | None = None,
    one_machine: bool = False,
    **grid,
) -> PipelineSearchResult:
    """The fastest plan for ``num_ranks`` ranks, each with ``hw`` of its own (its GPU, host memory
    and disk), or with ``one_machine`` the GPUs of one ``hw`` machine: each rank then fits in an
    equal share of its host memory and disk space (so that the ranks' peaks together fit the
    machine, as the engine's memory guard checks), and they share its disk's bandwidth and its CPU
    (``predict_pipeline(shared_disk=True)``; each rank's placement is searched for those shares).
    For each block shape every rank's placement and compression are searched over its share
    (``search_policy(layers=...)``, ``grid``: its other options), and the plans are ranked by
    :func:`predict_pipeline`. Layers are split as given; else the search starts from the split
    balanced by weight and then moves layers off the busiest rank, one at a time, while the
    prediction improves (the head's matmul and the embedding's lookup cost different times for
    the same bytes, and a rank's placement changes what its layers cost). ``groups``: the groups
    of batches taking turns (default: each from 1 to the block's batches is tried; it changes
    only the schedule, not what a rank holds). ``tried`` lists every plan priced (its layer
    counts, shape, groups, tok/s) and every shape that fitted nowhere (why)."""
    import itertools

    from flexlab.cost.search import search_policy
    from flexlab.engine.pipeline import make_plan
    from flexlab.errors import FlexlabError

    balanced = [len(r) for r in make_plan(config, num_ranks, layers=layers).layers]  # checks num_ranks, layers
    rank_hw = hw
    if one_machine:
        if not hw.has_link:
            raise FlexlabError(
                f"{hw.name} has no GPU: pipeline ranks on one CPU share its cores, memory and disk, so they cannot "
                "beat one process there; search for one process (drop --pipeline), or for ranks on machines of "
                "their own (drop --one-machine)"
            )
        rank_hw = hw.replace(cpu_memory=hw.cpu_memory / num_ranks, disk_space=hw.disk_space / num_ranks)
    # A rank's pick, searched once per (its layer count, whether it holds the embedding and the
    # head, block shape): a family's layers are alike, so ranks of one count in the middle share it.
    picked: dict[tuple, Policy] = {}
    tried: list[dict] = []

    def price(counts: list[int], bs: int, nb: int, group_options) -> tuple[PipelinePlan, PipelinePrediction]:
        """The best plan of these layer counts and block shape over ``group_options``; raises
        FlexlabError when nothing fits a rank (or too few batches for the groups)."""
        policies = []
        for r in make_plan(config, num_ranks, layers=counts).layers:
            key = (len(r), r.start == 0, r.stop == config.num_layers, bs, nb)
            if key not in picked:
                # on one machine a rank's pick sees the disk and CPU shared by as many ranks as the
                # shape lets work at once (its prediction below then prices each group count exactly)
                picked[key] = search_policy(
                    config,
                    shared_host(rank_hw, min(groups or nb, nb, num_ranks)) if one_machine else rank_hw,
                    prompt_len=prompt_len,
                    gen_len=gen_len,
                    itemsize=itemsize,
                    layers=r,
                    checkpoint_itemsize=checkpoint_itemsize,
                    refined=1,  # one shape's few candidates: refining the best is enough, and 3x faster
                    batch_sizes=(bs,),
                    num_batches=(nb,),
                    **grid,
                ).policy
            policies.append(picked[key])
        best = None
        for g in group_options:  # every rank holds the whole block's cache whatever the groups
            plan = make_plan(config, num_ranks, policies, counts, g)
            pred = predict_pipeline(
                config,
                plan,
                rank_hw,
                prompt_len=prompt_len,
                gen_len=gen_len,
                itemsize=itemsize,
                checkpoint_itemsize=checkpoint_itemsize,
                shared_disk=one_machine,
            )
            entry = dict(layers=counts, gpu_batch_size=bs, num_gpu_batches=nb, groups=g, why="")
            tried.append({**entry, "throughput_tok_s": pred.throughput_tok_s})
            if best is None or pred.throughput_tok_s > best[1].throughput_tok_s:
                best = (plan, pred)
        assert best is not None, "no groups to try"
        return best

    best: tuple[PipelinePlan, PipelinePrediction] | None = None
    for bs, nb in itertools.product(batch_sizes, num_batches):
        try:
            found = price(balanced, bs, nb, [groups] if groups else range(1, nb + 1))
        except FlexlabError as e:  # nothing fits a rank with this shape, or too few batches for the groups
            tried.append(
                dict(
                    layers=balanced,
                    gpu_batch_size=bs,
                    num_gpu_batches=nb,
                    groups=groups,
                    throughput_tok_s=None,
                    why=str(e),
                )
            )
            continue
        if best is None or found[1].throughput_tok_s > best[1].throughput_tok_s:
            best = found
    if best is None:
        raise FlexlabError(
            f"no plan of {num_ranks} ranks fits {config.name} (prompt {prompt_len}, gen {gen_len}) on {hw.name}: "
            f"{tried[-1]['why']}"
        )
    if layers is None:
        best = _rebalance(best, price, gen_len)
    return PipelineSearchResult(best[0], best[1], tried)


def _rebalance(best, price, gen_len: int):
    """Move one layer at a time from the busiest rank to a neighbour while the predicted throughput
    rises (the best plan's block shape and groups kept); at most as many moves as layers."""
    from flexlab.errors import FlexlabError

    plan, pred = best
    shape = (plan.policies[0].gpu_batch_size, plan.policies[0].num_gpu_batches)
    for _ in range(sum(len(r) for r in plan.layers)):
        counts = [len(r) for r in plan.layers]
        busy = [r["prefill_group_s"] + max(gen_len - 1, 0) * r["decode_group_token_s"] for r in pred.ranks]
        slow = max(range(len(counts)), key=busy.__getitem__)
        moves = []
        for to in (slow - 1, slow + 1):
            if 0 <= to < len(counts) and counts[slow] > 1:
                moved = list(counts)
                moved[slow], moved[to] = moved[slow] - 1, moved[to] + 1
                try:
                    moves.append(price(moved, *shape, [plan.groups]))
                except FlexlabError:  # the neighbour cannot hold another layer with this shape
                    continue
        better = max(moves, key=lambda m: m[1].throughput_tok_s, default=None)
        if better is None or better[1].throughput_tok_s <= pred.throughput_tok_s * (1 + 1e-9):
            break
        plan, pred = better
    return plan, pred
