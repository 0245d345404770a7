"""Timeline plots: a Gantt chart of every lane, and the overlap summary.

Pure functions of a :class:`~flexlab.timeline.Timeline`; they return matplotlib
``Figure`` objects made without pyplot, so they work headless, in scripts and in notebooks.

    >>> from flexlab.viz import plot_timeline                        # doctest: +SKIP
    >>> plot_timeline(result.timeline, tokens=(0, 2)).savefig("timeline.png")  # doctest: +SKIP
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from flexlab.timeline import COMPUTE_LANE, Timeline

KIND_COLORS = {
    "compute": "#4C72B0",
    "load_weight": "#DD8452",
    "load_cache": "#55A868",
    "store_cache": "#8172B3",
    "load_act": "#C44E52",
    "store_act": "#937860",
    "dequantize_weight": "#DA8BC3",  # (de)compression inside a compute, drawn over it
    "quantize_cache": "#8C8C8C",
    "dequantize_cache": "#CCB974",
    "recv": "#64B5CD",  # hand-offs between pipeline ranks
    "send": "#2F6F8F",
}


def plot_timeline(
    timeline: Timeline,
    *,
    tokens: tuple[int, int] | None = None,
    stages: tuple[int, int] | None = None,
    lanes: list[str] | None = None,
    title: str | None = None,
    width: float = 12.0,
) -> Figure:
    """Gantt chart: a row per lane, a bar per event coloured by kind, token starts marked.

    ``tokens``/``stages``: inclusive ranges to show; ``lanes``: which rows (default all).
    """
    events = [
        e
        for e in timeline.events
        if (tokens is None or tokens[0] <= e.token <= tokens[1])
        and (stages is None or stages[0] <= e.stage <= stages[1])
        and (lanes is None or timeline.lane_of(e) in lanes)
    ]
    rows = [lane for lane in timeline.lanes if lanes is None or lane in lanes]
    fig = Figure(figsize=(width, 0.6 * len(rows) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    if not events:
        ax.text(0.5, 0.5, "no events in this selection", ha="center", va="center", transform=ax.transAxes)
        return fig
    t0 = min(e.start for e in events)
    scale, unit = (1e3, "ms") if max(e.end for e in events) - t0 < 10 else (1.0, "s")
    for y, lane in enumerate(rows):
        bars = [((e.start - t0) * scale, max(e.duration * scale, 1e-6)) for e in events if timeline.lane_of(e) == lane]
        colors = [KIND_COLORS.get(e.kind, "grey") for e in events if timeline.lane_of(e) == lane]
        ax.broken_barh(bars, (y - 0.38, 0.76), facecolors=colors, edgecolor="white", linewidth=0.3)
    token_starts, stage_starts = {}, {}
    first_compute = next((timeline.lane_of(e) for e in events if e.lane == COMPUTE_LANE), None)  # rank 0's
    for e in events:
        if e.lane == COMPUTE_LANE:
            token_starts[e.token] = min(token_starts.get(e.token, e.start), e.start)
        if timeline.lane_of(e) == first_compute:
            stage_starts[(e.token, e.stage)] = min(stage_starts.get((e.token, e.stage), e.start), e.start)
    if first_compute in rows and len(stage_starts) <= 80:  # layer boundaries: ticks on the compute row
        y = rows.index(first_compute)
        ax.vlines([(s - t0) * scale for s in stage_starts.values()], y - 0.5, y - 0.38, color="black", linewidth=0.5)
    for token, start in sorted(token_starts.items()):
        x = (start - t0) * scale
        ax.axvline(x, color="black", linewidth=0.6, linestyle=":")
        ax.text(x, len(rows) - 0.45, " prefill" if token == 0 else f" t{token}", fontsize=7, va="bottom")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(f"time ({unit})")
    kinds = sorted({e.kind for e in events}, key=lambda k: list(KIND_COLORS).index(k) if k in KIND_COLORS else 99)
    ax.legend(
        handles=[Patch(color=KIND_COLORS.get(k, "grey"), label=k) for k in kinds],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
    )
    s = Timeline(events).summary()
    ax.set_title(
        title
        or f"{len(events)} events — I/O hidden under compute: {s['io_hidden_fraction']:.0%}, "
        f"compute idle: {s['compute_idle_fraction']:.0%}",
        fontsize=10,
    )
    return fig


def plot_overlap_summary(timeline: Timeline, width: float = 7.0) -> Figure:
    """Busy seconds per lane, and the I/O time split into hidden (under compute) and exposed."""
    s = timeline.summary()
    fig = Figure(figsize=(width, 3.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[2, 1])
    lanes = timeline.lanes
    ax1.barh(
        lanes,
        [s[f"busy_s[{lane}]"] for lane in lanes],
        color=[KIND_COLORS["compute"] if lane.endswith(COMPUTE_LANE) else "#999999" for lane in lanes],
    )
    ax1.invert_yaxis()
    ax1.set_xlabel("busy (s)")
    ax1.set_title("busy time per lane", fontsize=10)
    ax2.bar(["I/O"], [s["io_hidden_s"]], color="#55A868", label="hidden under compute")
    ax2.bar(["I/O"], [s["io_exposed_s"]], bottom=[s["io_hidden_s"]], color="#C44E52", label="exposed")
    ax2.set_ylabel("seconds")
    ax2.legend(fontsize=8, frameon=False)
    ax2.set_title(f"{s['io_hidden_fraction']:.0%} of I/O hidden", fontsize=10)
    return fig
