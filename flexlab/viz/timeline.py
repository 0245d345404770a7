"""Timeline plots: a Gantt chart of every lane with the stalls marked and the memory per tier
under it, two or more runs on one time axis, and the overlap summary.

Pure functions of a :class:`~flexlab.timeline.Timeline`; they return matplotlib
``Figure`` objects made without pyplot, so they work headless, in scripts and in notebooks.

    >>> from flexlab.viz import plot_timeline                        # doctest: +SKIP
    >>> plot_timeline(result.timeline, tokens=(0, 2)).savefig("timeline.png")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from flexlab.timeline import COMPUTE_LANE, Event, Timeline

KIND_COLORS = {
    "compute": "#4C72B0",
    "load_weight": "#DD8452",
    "load_cache": "#55A868",
    "store_cache": "#8172B3",
    "load_act": "#C44E52",
    "store_act": "#937860",
    "dequantize_weight": "#DA8BC3",  # (de)compression inside a compute, drawn over it
    "read_rows": "#E5AE38",  # reads a compute makes or waits for itself, drawn over it
    "wait_head": "#FF9896",
    "quantize_cache": "#8C8C8C",
    "dequantize_cache": "#CCB974",
    "recv": "#64B5CD",  # hand-offs between pipeline ranks
    "send": "#2F6F8F",
}
STALL_COLOR = "#D62728"
TIER_COLORS = {"gpu": "#4C72B0", "cpu": "#DD8452", "disk": "#55A868"}


def time_scale(span_s: float) -> tuple[float, str]:
    """The factor from seconds and the unit name the plots use for a span of ``span_s`` seconds."""
    return (1e3, "ms") if span_s < 10 else (1.0, "s")


def select(
    timeline: Timeline,
    tokens: tuple[int, int] | None = None,
    stages: tuple[int, int] | None = None,
    lanes: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
) -> list[Event]:
    """The events in the given inclusive token and stage ranges, on the given rows, overlapping
    the time ``window`` (seconds from the run's start); None selects everything."""
    return [
        e
        for e in timeline.events
        if (tokens is None or tokens[0] <= e.token <= tokens[1])
        and (stages is None or stages[0] <= e.stage <= stages[1])
        and (lanes is None or timeline.lane_of(e) in lanes)
        and (window is None or (e.end >= window[0] and e.start <= window[1]))
    ]


def describe_selection(timeline: Timeline, events: list[Event], tokens, stages, lanes, window) -> str:
    """What a figure's overlap figures are computed on, and the figures themselves, in one line."""
    parts = [f"tokens {tokens[0]}–{tokens[1]}" if tokens else "all tokens"]
    parts.append(f"stages {stages[0]}–{stages[1]}" if stages else "all stages")
    if lanes is not None and set(lanes) != set(timeline.lanes):
        parts.append(f"{len(lanes)} of {len(timeline.lanes)} lanes")
    if window is not None:
        scale, unit = time_scale(window[1] - window[0])
        parts.append(f"{window[0] * scale:.4g}–{window[1] * scale:.4g} {unit}")
    s = Timeline(events).summary()
    return (
        f"{len(events)} events ({', '.join(parts)}): I/O hidden under compute {s['io_hidden_fraction']:.0%}, "
        f"compute idle {s['compute_idle_fraction']:.0%}"
    )


def plot_timeline(
    timeline: Timeline,
    *,
    tokens: tuple[int, int] | None = None,
    stages: tuple[int, int] | None = None,
    lanes: list[str] | None = None,
    window: tuple[float, float] | None = None,
    stalls: int = 5,
    memory: bool | None = None,
    title: str | None = None,
    width: float = 12.0,
) -> Figure:
    """Gantt chart: a row per lane, a bar per event coloured by kind, token starts marked.

    ``tokens``/``stages``: inclusive ranges to show; ``lanes``: which rows (default all);
    ``window``: the time range to show, in seconds from the run's start (zoom and pan).
    ``stalls``: how many of the longest waits of compute to mark (shaded on the compute row,
    the transfer waited on outlined in red); ``memory``: a panel under the chart with the
    engine's bytes per tier over time (default: when the timeline recorded them). The title says
    which selection its overlap figures are computed on.
    """
    events = select(timeline, tokens, stages, lanes, window)
    rows = [lane for lane in timeline.lanes if lanes is None or lane in lanes]
    with_memory = bool(timeline.memory) if memory is None else memory
    legend_rows = len({e.kind for e in events}) + 1  # the legend beside the chart must fit its height
    height = max(0.6 * len(rows) + 1.6, 0.2 * legend_rows + 1.0) + 1.6 * with_memory
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[max(len(rows), 1), 2.5]) if with_memory else [fig.subplots()]
    ax = axes[0]
    if not events:
        ax.text(0.5, 0.5, "no events in this selection", ha="center", va="center", transform=ax.transAxes)
        return fig
    lo, hi = window or (min(e.start for e in events), max(e.end for e in events))
    scale, unit = time_scale(hi - lo)
    draw_gantt(ax, timeline, events, rows, scale, stalls=stalls)
    ax.set_xlim(lo * scale, hi * scale)
    ax.set_title(title or describe_selection(timeline, events, tokens, stages, lanes, window), fontsize=10)
    if with_memory:
        draw_memory(axes[1], timeline, lo, hi, scale)
    axes[-1].set_xlabel(f"time from the run's start ({unit})")
    return fig


def plot_timelines(
    timelines: Sequence[Timeline],
    labels: Sequence[str] | None = None,
    *,
    tokens: tuple[int, int] | None = None,
    stages: tuple[int, int] | None = None,
    stalls: int = 3,
    width: float = 12.0,
) -> Figure:
    """Several runs (overlap on and off, two policies, ...) one above the other on one time
    axis, each titled with its label and its overlap figures for the same selection."""
    labels = list(labels) if labels is not None else [f"run {i}" for i in range(len(timelines))]
    if len(labels) != len(timelines):
        raise ValueError(f"{len(timelines)} timelines but {len(labels)} labels: give one label per timeline")
    chosen = [select(tl, tokens, stages) for tl in timelines]
    spans = [(min(e.start for e in evs), max(e.end for e in evs)) for evs in chosen if evs]
    if not spans:
        raise ValueError("no timeline has events in this selection")
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    scale, unit = time_scale(hi - lo)
    heights = [max(len(tl.lanes), 1) for tl in timelines]
    fig = Figure(figsize=(width, 0.55 * sum(heights) + 1.2 * len(timelines)), layout="constrained")
    axes = fig.subplots(len(timelines), 1, sharex=True, height_ratios=heights, squeeze=False)[:, 0]
    for ax, tl, evs, label in zip(axes, timelines, chosen, labels):
        draw_gantt(ax, tl, evs, tl.lanes, scale, stalls=stalls, legend=ax is axes[0])
        ax.set_title(f"{label}: {describe_selection(tl, evs, tokens, stages, None, None)}", fontsize=9)
    axes[-1].set_xlim(lo * scale, hi * scale)
    axes[-1].set_xlabel(f"time from the run's start ({unit})")
    return fig


def draw_gantt(
    ax: Axes, timeline: Timeline, events: list[Event], rows: list[str], scale: float, *, stalls: int, legend=True
) -> None:
    """The chart itself, on ``ax``: bars per row, token starts, layer ticks, the longest stalls."""
    row_of = {lane: y for y, lane in enumerate(rows)}
    for y, lane in enumerate(rows):
        mine = [e for e in events if timeline.lane_of(e) == lane]
        bars = [(e.start * scale, max(e.duration * scale, 1e-6)) for e in mine]
        colors = [KIND_COLORS.get(e.kind, "grey") for e in mine]
        ax.broken_barh(bars, (y - 0.38, 0.76), facecolors=colors, edgecolor="white", linewidth=0.3)
    token_starts: dict[int, float] = {}
    stage_starts: dict[tuple[int, int], float] = {}
    first_compute = next((timeline.lane_of(e) for e in events if e.lane == COMPUTE_LANE), None)  # rank 0's
    for e in events:
        if e.lane == COMPUTE_LANE:
            token_starts[e.token] = min(token_starts.get(e.token, e.start), e.start)
        if timeline.lane_of(e) == first_compute:
            stage_starts[(e.token, e.stage)] = min(stage_starts.get((e.token, e.stage), e.start), e.start)
    if first_compute in row_of and len(stage_starts) <= 80:  # layer boundaries: ticks on the compute row
        y = row_of[first_compute]
        ax.vlines([s * scale for s in stage_starts.values()], y - 0.5, y - 0.38, color="black", linewidth=0.5)
    for token, start in sorted(token_starts.items()):
        ax.axvline(start * scale, color="black", linewidth=0.6, linestyle=":")
        ax.text(start * scale, len(rows) - 0.45, " prefill" if token == 0 else f" t{token}", fontsize=7, va="bottom")
    shown = set(map(id, events))
    marked = [s for s in timeline.stalls() if id(s.after) in shown][:stalls]
    for s in marked:
        row = row_of.get(timeline.lane_of(s.after))
        if row is not None:  # the wait itself, shaded on the compute row
            gap = ((s.after.start - s.waited) * scale, s.waited * scale)
            ax.broken_barh([gap], (row - 0.45, 0.9), facecolors=STALL_COLOR, alpha=0.3, edgecolor=STALL_COLOR)
        if s.cause is not None and timeline.lane_of(s.cause) in row_of:  # and what it waited on
            cause_row = row_of[timeline.lane_of(s.cause)]
            bar = (s.cause.start * scale, max(s.cause.duration * scale, 1e-6))
            ax.broken_barh([bar], (cause_row - 0.45, 0.9), facecolors="none", edgecolors=STALL_COLOR, linewidth=1.5)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    if not legend:
        return
    kinds = sorted({e.kind for e in events}, key=lambda k: list(KIND_COLORS).index(k) if k in KIND_COLORS else 99)
    handles = [Patch(color=KIND_COLORS.get(k, "grey"), label=k) for k in kinds]
    if marked:
        handles.append(Patch(facecolor=STALL_COLOR, alpha=0.3, edgecolor=STALL_COLOR, label="stall (waited on: red)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)


def draw_memory(ax: Axes, timeline: Timeline, lo: float, hi: float, scale: float) -> None:
    """The engine's bytes per tier (and rank) from ``lo`` to ``hi`` seconds as step lines: the
    level at ``lo`` is the last sample before it."""
    series: dict[tuple[int, str], list[tuple[float, int]]] = {}
    for m in timeline.memory:
        points = series.setdefault((m.rank, m.tier), [])
        if m.time <= lo:
            points[:] = [(lo, m.bytes)]
        elif m.time <= hi:
            points.append((m.time, m.bytes))
    series = {key: pts for key, pts in series.items() if pts and any(b for _, b in pts)}
    top = max((b for pts in series.values() for _, b in pts), default=0)
    div, unit = (2**30, "GiB") if top >= 2**30 else (2**20, "MiB")
    several = len({rank for rank, _ in series}) > 1
    order = list(TIER_COLORS)
    for (rank, tier), pts in sorted(series.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        xs = [t * scale for t, _ in pts] + [hi * scale]
        ys = [b / div for _, b in pts] + [pts[-1][1] / div]
        label = f"rank {rank} {tier}" if several else tier
        ax.step(xs, ys, where="post", color=TIER_COLORS.get(tier), label=label, linewidth=1.2)
    ax.set_ylabel(f"engine {unit}")
    ax.set_ylim(bottom=0)
    if series:
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False, title="memory", title_fontsize=8
        )
    else:
        ax.text(0.5, 0.5, "no memory recorded", ha="center", va="center", transform=ax.transAxes)


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
    ax1.set_title("busy time per lane (whole run)", fontsize=10)
    ax2.bar(["I/O"], [s["io_hidden_s"]], color="#55A868", label="hidden under compute")
    ax2.bar(["I/O"], [s["io_exposed_s"]], bottom=[s["io_hidden_s"]], color="#C44E52", label="exposed")
    ax2.set_ylabel("seconds")
    ax2.legend(fontsize=8, frameon=False)
    ax2.set_title(f"{s['io_hidden_fraction']:.0%} of I/O hidden (whole run)", fontsize=10)
    return fig
