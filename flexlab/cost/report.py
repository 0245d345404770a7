"""A prediction in words: the answer in a few lines, and per stage on request.

    >>> from flexlab import Policy, get_preset
    >>> from flexlab.cost import CostModel, get_hardware
    >>> cm = CostModel(get_preset("opt-6.7b"), Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=8),
    ...                get_hardware("colab-t4"), prompt_len=512, gen_len=32)
    >>> print(summary(cm).splitlines()[2])        # doctest: +ELLIPSIS
    time per block: prefill ... s, decode ... s; bottleneck: disk (busy ...% of the run; compute ...%, link ...%)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flexlab.cost.model import CostModel, Prediction

RESOURCES = ("compute", "disk", "link")


def summary(cm: CostModel, pred: Prediction | None = None) -> str:
    """The answer: throughput, the policy, time and bottleneck, peak memory against capacity."""
    pred = pred or cm.predict()
    hw = cm.hw
    busy = pred.utilisation
    others = ", ".join(f"{r} {busy[r]:.0%}" for r in RESOURCES if r != pred.bottleneck)
    gib = {t: v / 2**30 for t, v in pred.peak_bytes.items()}
    if hw.has_link:
        memory = ", ".join(
            f"{t} {gib[t]:.2f} of {cap / 2**30:.2f}"
            for t, cap in (("gpu", hw.gpu_memory), ("cpu", hw.cpu_memory), ("disk", hw.disk_space))
        )
    else:  # one RAM: the gpu and cpu tiers share it
        memory = (
            f"RAM {gib['gpu'] + gib['cpu']:.2f} of {(hw.gpu_memory + hw.cpu_memory) / 2**30:.2f} (gpu and cpu tiers: "
            f"{gib['gpu']:.2f} + {gib['cpu']:.2f}), disk {gib['disk']:.2f} of {hw.disk_space / 2**30:.2f}"
        )
    return "\n".join(
        [
            f"{cm.config.name} on {hw.name} (prompt {cm.prompt_len}, gen {cm.gen_len}, {cm.num_prompts} prompts): "
            f"{pred.throughput_tok_s:.3g} tok/s predicted",
            f"policy: {cm.policy.describe()}",
            f"time per block: prefill {pred.prefill_s:.3f} s, decode {pred.decode_s:.3f} s; bottleneck: "
            f"{pred.bottleneck} (busy {busy[pred.bottleneck]:.0%} of the run; {others})",
            f"peak GiB: {memory}",
        ]
    )


def stage_table(pred: Prediction) -> str:
    """Seconds per stage over the run; stages that would print the same line are one line (a
    96-layer model has a handful of distinct stages, not 194)."""
    groups: dict[tuple, list[int | None]] = {}
    for row in pred.stages:
        kind, _, layer = row["stage"].partition(".")
        key = (kind, *(round(row[f"{r}_s"], 4) for r in RESOURCES))
        groups.setdefault(key, []).append(int(layer) if layer else None)
    names = [kind if layers == [None] else f"{kind} {_ranges(layers)}" for (kind, *_), layers in groups.items()]
    width = max(len(n) for n in ["stage", *names]) + 2
    lines = [f"{'stage':<{width}}{'compute s':>12}{'disk s':>12}{'link s':>12}  bound"]
    for name, (_, *secs) in zip(names, groups):
        bound = RESOURCES[secs.index(max(secs))]
        lines.append(f"{name:<{width}}" + "".join(f"{s:>12.4f}" for s in secs) + f"  {bound}")
    return "\n".join(lines)


def _ranges(numbers: list) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``0-2,5,7-8``; a long list as its ends and its length."""
    out: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = n
    if len(out) > 6:
        return f"{out[0]},{out[1]},…,{out[-1]} ({len(numbers)} layers)"
    return ",".join(out)
