"""What the cost model predicts, and the same in words: the answer in a few lines, and seconds
per stage on request.

    >>> from flexlab import Policy, get_preset
    >>> from flexlab.cost import CostModel, get_hardware
    >>> pred = CostModel(get_preset("opt-6.7b"), Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=8),
    ...                  get_hardware("colab-t4"), prompt_len=512, gen_len=32).predict()
    >>> print(pred.summary().splitlines()[2])        # doctest: +ELLIPSIS
    time per block: prefill ... s, decode ... s; bottleneck: disk (busy ...% of the run; compute ...%, link ...%)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexlab.cost.hardware import HardwareProfile
from flexlab.engine.footprint import Footprint
from flexlab.engine.policy import Policy

RESOURCES = ("compute", "disk", "link")


@dataclass
class Prediction:
    """What the cost model predicts for one block of prompts (``title``, ``policy`` and ``hw``
    say what was predicted, for :meth:`summary`)."""

    prefill_s: float
    decode_s: float
    throughput_tok_s: float
    peak_bytes: dict[str, float]
    bytes_per_kind: dict[str, float]  # over the whole run, keyed like the timeline's event kinds
    stages: list[dict] = field(repr=False)  # per stage: name and seconds of compute, disk, link
    bottleneck: str = ""
    title: str = ""
    policy: Policy | None = field(default=None, repr=False)
    hw: HardwareProfile | None = field(default=None, repr=False)
    footprint: Footprint | None = field(default=None, repr=False)  # the whole process's peak

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def utilisation(self) -> dict[str, float]:
        """Busy seconds of compute, disk and link as a fraction of the run."""
        return {r: sum(row[f"{r}_s"] for row in self.stages) / self.total_s if self.total_s else 0.0 for r in RESOURCES}

    def summary(self) -> str:
        """The answer: throughput, the policy, time and bottleneck, peak memory against capacity."""
        busy = self.utilisation
        others = ", ".join(f"{r} {busy[r]:.0%}" for r in RESOURCES if r != self.bottleneck)
        lines = [
            f"{self.title}: {self.throughput_tok_s:.3g} tok/s predicted",
            f"policy: {self.policy.describe() if self.policy else '?'}",
            f"time per block: prefill {self.prefill_s:.3f} s, decode {self.decode_s:.3f} s; bottleneck: "
            f"{self.bottleneck} (busy {busy[self.bottleneck]:.0%} of the run; {others})",
        ]
        gib = {t: v / 2**30 for t, v in self.peak_bytes.items()}
        hw = self.hw
        if hw is None:
            memory = ", ".join(f"{t} {v:.2f}" for t, v in gib.items())
        elif hw.has_link:
            caps = {"gpu": hw.gpu_memory, "cpu": hw.cpu_memory, "disk": hw.disk_space}
            memory = ", ".join(f"{t} {gib[t]:.2f} of {cap / 2**30:.2f}" for t, cap in caps.items())
        else:  # one RAM: the gpu and cpu tiers share it
            memory = (
                f"RAM {gib['gpu'] + gib['cpu']:.2f} of {(hw.gpu_memory + hw.cpu_memory) / 2**30:.2f} (gpu and cpu "
                f"tiers: {gib['gpu']:.2f} + {gib['cpu']:.2f}), disk {gib['disk']:.2f} of {hw.disk_space / 2**30:.2f}"
            )
        lines.append(f"peak GiB: {memory}")
        fp = self.footprint
        if fp is not None:
            to_gib = 2**-30
            lines.append(
                f"process peak GiB: host {fp.host * to_gib:.2f}"
                + (f", gpu {fp.device * to_gib:.2f}" if fp.on_cuda else "")
                + f" (runtime base {fp.runtime_base * to_gib:.2f}, workspace {fp.workspace * to_gib:.2f}"
                + ("" if fp.on_cuda else f" x{fp.slack:g} slack")
                + f", placing weights {fp.placing * to_gib:.2f})"
            )
        return "\n".join(lines)

    def stage_table(self) -> str:
        """Seconds per stage over the run; stages that would print the same line are one line (a
        96-layer model has a handful of distinct stages, not 194)."""
        groups: dict[tuple, list[int | None]] = {}
        for row in self.stages:
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
