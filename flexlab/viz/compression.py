"""Accuracy against compression bits, from an ablation table (``flexlab.eval.run_ablation``).

>>> from flexlab.viz import plot_accuracy_vs_bits                  # doctest: +SKIP
>>> plot_accuracy_vs_bits(pd.read_csv("ablate_compression_opt-pydoc.csv")).savefig("bits.png")  # doctest: +SKIP
"""

from __future__ import annotations

from matplotlib.figure import Figure

TARGET_ORDER = ("weights", "cache", "both")
TARGET_COLORS = {"weights": "#4C72B0", "cache": "#55A868", "both": "#C44E52"}
HIGHER_IS_BETTER = ("token_agreement", "last_word_accuracy")  # the others (perplexity) are better low
SYMLOG_LINTHRESH = 1.0  # linear within ±1 (a percent, or a perplexity point), logarithmic beyond
LABELS = {
    "perplexity_change_pct": "perplexity change (%)",
    "perplexity": "perplexity",
    "token_agreement": "token agreement with uncompressed",
    "last_word_accuracy": "last-word accuracy",
}


def plot_accuracy_vs_bits(
    df,
    metric: str = "perplexity_change_pct",
    *,
    title: str | None = None,
    width: float = 12.0,
    highlight: str | None = None,
) -> Figure:
    """One column per target (weights, cache, both). Top: ``metric`` against bits, a line per
    group size (dashed: per-channel keys), the uncompressed value as a grey line. Bottom: peak
    memory saved over all tiers against bits per element. ``highlight``: a ``setting`` name
    whose points get a red ring."""
    if metric not in df.columns:
        raise ValueError(f"metric {metric!r} is not a column; choose from {sorted(LABELS)}")
    base = df[df.target == "none"]
    targets = [t for t in TARGET_ORDER if (df.target == t).any()]
    fig = Figure(figsize=(width, 6.4), layout="constrained")
    axes = fig.subplots(2, max(len(targets), 1), squeeze=False)  # own y scales: cache effects are small
    saved = _saved_pct(df)
    groups = sorted(df.group_size.dropna().unique())
    color = {g: f"C{i}" for i, g in enumerate(groups)}  # the same group size has the same colour everywhere
    for col, target in enumerate(targets):
        top, bottom = axes[0][col], axes[1][col]
        rows = df[df.target == target]
        for (group, layout), line in rows.groupby(["group_size", rows.kv_layout.fillna("per-token")]):
            line = line.sort_values("bits")
            style = "--" if layout == "per-channel" else "-"
            label = f"g{int(group)}" + (" per-channel keys" if layout == "per-channel" else "")
            top.plot(line.bits, line[metric], style, marker="o", label=label, color=color[group])
            bits_col = "weight_bits_per_element" if target == "weights" else "cache_bits_per_element"
            bottom.plot(line[bits_col], saved[line.index], style, marker="o", label=label, color=color[group])
        if len(base):
            top.axhline(float(base[metric].iloc[0]), color="grey", linewidth=0.8, label="uncompressed")
        chosen = rows[rows.setting == highlight] if highlight is not None and "setting" in rows else rows.iloc[:0]
        for _, row in chosen.iterrows():
            bits_col = "weight_bits_per_element" if target == "weights" else "cache_bits_per_element"
            ring = dict(s=220, facecolors="none", edgecolors="red", linewidths=2, zorder=5)
            top.scatter([row.bits], [row[metric]], **ring)
            bottom.scatter([row[bits_col]], [saved[row.name]], **ring)
        top.set_title(f"compressed: {target}", fontsize=10)
        top.set_xlabel("bits")
        top.set_xticks(sorted(rows.bits.dropna().unique()))
        bottom.set_xlabel("bits per element (codes + scales)")
        top.legend(fontsize=7, frameon=False)
    ylabel = axis_label(metric)
    if metric.startswith("lm_eval:") and higher_is_better(metric):  # accuracies: one scale for every column
        low, high = float(df[metric].min()), float(df[metric].max())
        pad = max(0.02, 0.1 * (high - low))
        for ax in axes[0]:
            ax.set_ylim(low - pad, high + pad)
    elif squashed(df.loc[df.target != "none", metric]):  # 2-bit points would flatten the others to a line
        for ax in axes[0]:
            ax.set_yscale("symlog", linthresh=SYMLOG_LINTHRESH)
        ylabel += " (symlog scale)"
    axes[0][0].set_ylabel(ylabel)
    axes[1][0].set_ylabel("peak memory saved, all tiers (%)")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def axis_label(metric: str) -> str:
    """An axis label for an ablation column (``lm_eval:pydoc_order:acc,none`` -> ``pydoc_order acc (lm-eval)``)."""
    if metric.startswith("lm_eval:"):
        _, task, name = metric.split(":", 2)
        return f"{task} {name.removesuffix(',none')} (lm-eval)"
    return LABELS.get(metric, metric)


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of an ablation column is the better one: accuracies (lm-eval's
    ``lm_eval:TASK:acc,none`` included) yes, perplexities and bits per byte no."""
    if metric.startswith("lm_eval:"):
        return not any(word in metric for word in ("perplexity", "bits_per_byte"))
    return metric in HIGHER_IS_BETTER


def _saved_pct(df):
    """Peak bytes over all tiers saved against the uncompressed row, in percent."""
    total = sum(df[f"peak_bytes_{t}"] for t in ("gpu", "cpu", "disk"))
    base = df[df.target == "none"]
    if not len(base):
        return total * float("nan")
    return 100 * (1 - total / float(total[base.index[0]]))


def squashed(values) -> bool:
    """Whether a linear axis would squash most of ``values`` into a sliver: the largest is
    more than 20 times the median magnitude and beyond the symlog threshold."""
    mags = values.dropna().abs()
    mags = mags[mags > 0]
    return bool(len(mags)) and mags.max() > max(20 * mags.median(), 10 * SYMLOG_LINTHRESH)


def plot_accuracy_vs_memory(
    df, metric: str = "perplexity_change_pct", *, title: str | None = None, width: float = 8.0
) -> Figure:
    """Accuracy against memory over a compression grid: a point per setting (coloured by what
    is compressed) at its peak bytes over all tiers, the uncompressed run as a star, and the
    Pareto front — the settings no other beats on both memory and ``metric`` — as a step line
    with its points labelled. A symlog y-axis where a few settings would squash the rest."""
    if metric not in df.columns:
        raise ValueError(f"metric {metric!r} is not a column; choose from {sorted(LABELS)}")
    total = sum(df[f"peak_bytes_{t}"] for t in ("gpu", "cpu", "disk")) / 2**20
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    ax = fig.subplots()
    for target in TARGET_ORDER:
        rows = df.target == target
        if rows.any():
            ax.scatter(total[rows], df[metric][rows], color=TARGET_COLORS[target], label=f"compressed: {target}", s=18)
    base = df.target == "none"
    if base.any():
        ax.scatter(total[base], df[metric][base], marker="*", s=160, color="black", label="uncompressed", zorder=4)
    front = pareto_front(total, df[metric], higher_is_better=higher_is_better(metric))
    ax.step(total[front], df[metric][front], where="post", color="grey", linewidth=1, label="Pareto front")
    for i in front:
        ax.annotate(
            str(df.setting[i]), (total[i], df[metric][i]), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    ylabel = axis_label(metric)
    if squashed(df[metric]):
        ax.set_yscale("symlog", linthresh=SYMLOG_LINTHRESH)
        ylabel += " (symlog scale)"
    ax.set_ylabel(ylabel)
    ax.set_xlabel("peak memory, all tiers (MiB)")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title or "accuracy against memory", fontsize=10)
    return fig


def pareto_front(memory, metric, *, higher_is_better: bool = False) -> list:
    """Index labels of the rows no other row beats on both: less (or equal) memory and a better
    (or equal) ``metric``, one strictly; in order of memory."""
    better = (lambda a, b: a >= b) if higher_is_better else (lambda a, b: a <= b)
    front, best = [], None
    for i in sorted(memory.index, key=lambda i: (memory[i], -metric[i] if higher_is_better else metric[i])):
        if metric[i] != metric[i]:  # NaN: not measured
            continue
        if best is None or (better(metric[i], best) and metric[i] != best):
            front.append(i)
            best = metric[i]
    return front
