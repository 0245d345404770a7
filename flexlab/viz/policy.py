"""Throughput per policy and memory per tier, from a sweep table (``flexlab.eval.policy_sweep``).

>>> from flexlab.viz import plot_throughput, plot_memory           # doctest: +SKIP
>>> plot_throughput(df).savefig("throughput.png")                  # doctest: +SKIP
"""

from __future__ import annotations

from matplotlib.figure import Figure

TIERS = ("gpu", "cpu", "disk")
CATEGORY_COLORS = {
    "weights": "#4C72B0",
    "kv_cache": "#55A868",
    "kv_tail": "#8FD19E",
    "activations": "#C44E52",
    "weight_read_buffers": "#DD8452",
    "working_weights": "#CCB974",
}


def plot_throughput(df, *, title: str | None = None, width: float = 11.0) -> Figure:
    """Left: tokens/s per policy (bars, best highlighted). Right: tokens/s against peak bytes
    per tier, a marker per tier, one point per policy and tier, each labelled with its policy."""
    for col in ("policy", "throughput_tok_s"):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is missing; pass the table policy_sweep returns")
    tiers = [t for t in TIERS if f"peak_bytes_{t}" in df.columns]
    fig = Figure(figsize=(width, 0.35 * len(df) + 2.6), layout="constrained")
    bars, scatter = fig.subplots(1, 2, width_ratios=[3, 2]) if tiers else (fig.subplots(), None)
    best = df.throughput_tok_s.max()
    colors = ["#DD8452" if v == best else "#4C72B0" for v in df.throughput_tok_s]
    # Bars at positions, labelled after: a categorical axis would stack rows of the same name.
    bars.barh(range(len(df)), df.throughput_tok_s, color=colors)
    bars.set_yticks(range(len(df)), df.policy)
    bars.invert_yaxis()
    for y, v in enumerate(df.throughput_tok_s):
        bars.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    bars.set_xlabel("generation throughput (tokens/s)")
    bars.set_title("throughput per policy", fontsize=10)
    if scatter is None:  # no memory columns: the bars alone
        if title:
            fig.suptitle(title, fontsize=11)
        return fig
    for marker, tier in zip("o^s", TIERS):
        col = f"peak_bytes_{tier}"
        if col in df.columns:
            keep = df[col] > 0
            scatter.scatter(df[col][keep] / 2**20, df.throughput_tok_s[keep], marker=marker, label=tier, alpha=0.8)
            for x, y, name in zip(df[col][keep] / 2**20, df.throughput_tok_s[keep], df.policy[keep]):
                scatter.annotate(str(name), (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    scatter.set_xscale("symlog")
    scatter.set_xlabel("peak MiB on the tier")
    scatter.set_ylabel("tokens/s")
    scatter.set_title("throughput against peak memory", fontsize=10)
    if scatter.get_legend_handles_labels()[0]:
        scatter.legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_throughput_against(
    df, x: str, *, series: str | None = None, title: str | None = None, width: float = 7.0
) -> Figure:
    """Tokens/s against a numeric column of a sweep (``gpu_batch_size``, ``num_gpu_batches``,
    ``w_disk_percent``, ...), a line per value of ``series`` if given, with error bars from the
    fastest to the slowest of each point's runs where the sweep had ``repeats`` > 1."""
    for col in (x, "throughput_tok_s") + ((series,) if series else ()):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is missing; pass the table policy_sweep returns and one of its columns")
    if df[x].dtype.kind not in "iuf":  # integers or floats; not booleans, not names
        raise ValueError(f"column {x!r} is not numeric; plot_throughput draws policies by name")
    fig = Figure(figsize=(width, 4.2), layout="constrained")
    ax = fig.subplots()
    groups = df.groupby(series, sort=True) if series else [(None, df)]
    spread = {"throughput_tok_s_min", "throughput_tok_s_max"} <= set(df.columns)
    for value, rows in groups:
        rows = rows.sort_values(x)
        errors = None
        if spread:
            errors = [
                rows.throughput_tok_s - rows.throughput_tok_s_min,
                rows.throughput_tok_s_max - rows.throughput_tok_s,
            ]
        shown = f"{value:g}" if isinstance(value, (int, float)) else str(value)  # 100, not 100.0
        label = None if series is None else f"{series} = {shown}"
        ax.errorbar(rows[x], rows.throughput_tok_s, yerr=errors, marker="o", capsize=3, label=label)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("generation throughput (tokens/s)")
    repeats = int(df.repeats.max()) if "repeats" in df.columns else 1
    note = f"median of {repeats} runs, bars: fastest to slowest" if repeats > 1 else "one run per point"
    ax.set_title(title or f"throughput against {x.replace('_', ' ')} ({note})", fontsize=10)
    if series:
        ax.legend(fontsize=8, frameon=False)
    return fig


def plot_memory(df, *, title: str | None = None, width: float = 11.0) -> Figure:
    """Stacked bars per policy and tier: weights, KV cache, activations, read buffers, working
    copies — what filled each tier at its peak (the ``mem_<tier>_<category>`` columns)."""
    cols = [c for c in df.columns if c.startswith("mem_")]
    if not cols:
        raise ValueError("no mem_<tier>_<category> columns; pass the table policy_sweep returns")
    categories = sorted(
        {c.split("_", 2)[2] for c in cols}, key=lambda c: list(CATEGORY_COLORS).index(c) if c in CATEGORY_COLORS else 99
    )
    fig = Figure(figsize=(width, 3.6), layout="constrained")
    axes = fig.subplots(1, len(TIERS), sharey=False)
    for ax, tier in zip(axes, TIERS):
        bottom = [0.0] * len(df)
        for category in categories:
            col = f"mem_{tier}_{category}"
            if col not in df.columns:
                continue
            values = list(df[col] / 2**20)
            ax.bar(
                range(len(df)),
                values,
                bottom=bottom,
                label=category.replace("_", " "),
                color=CATEGORY_COLORS.get(category, "grey"),
            )
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(len(df)), df.policy, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{tier}", fontsize=10)
    axes[0].set_ylabel("MiB at the tier's peak")
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    axes[-1].legend(handles, labels, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
