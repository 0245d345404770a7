"""The cost model against measurement, from a table with predicted and measured columns.

>>> from flexlab.viz import plot_predicted_vs_measured                     # doctest: +SKIP
>>> df = pd.read_csv("validate_cost_model_opt-125m_cpu.csv")              # doctest: +SKIP
>>> plot_predicted_vs_measured(df).savefig("cost.png")                   # doctest: +SKIP
"""

from __future__ import annotations

from matplotlib.figure import Figure


def plot_predicted_vs_measured(df, *, label: str = "policy", title: str | None = None, width: float = 11.0) -> Figure:
    """Left: predicted against measured throughput (log-log), the diagonal and a ±20% band, a
    point per row labelled by ``label``. Right: the same for peak bytes per tier.

    Needs columns ``predicted_tok_s``, ``measured_tok_s`` and, for the right panel,
    ``predicted_peak_{tier}`` / ``measured_peak_{tier}``.
    """
    for col in ("predicted_tok_s", "measured_tok_s"):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is missing; the table needs predicted_tok_s and measured_tok_s")
    fig = Figure(figsize=(width, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _diagonal(left, df.measured_tok_s, df.predicted_tok_s)
    left.scatter(df.measured_tok_s, df.predicted_tok_s, color="#4C72B0", zorder=3)
    for _, row in df.iterrows():
        left.annotate(
            str(row[label]),
            (row.measured_tok_s, row.predicted_tok_s),
            fontsize=6,
            xytext=(3, 2),
            textcoords="offset points",
        )
    left.set_xlabel("measured tokens/s")
    left.set_ylabel("predicted tokens/s")
    left.set_title("throughput", fontsize=10)
    tiers = [t for t in ("gpu", "cpu", "disk") if f"measured_peak_{t}" in df.columns]
    xs, ys = [], []
    for i, tier in enumerate(tiers):
        m, p = df[f"measured_peak_{tier}"] / 2**20, df[f"predicted_peak_{tier}"] / 2**20
        keep = m > 0
        right.scatter(m[keep], p[keep], label=tier, color=f"C{i}", zorder=3)
        xs += list(m[keep])
        ys += list(p[keep])
    if xs:
        _diagonal(right, xs, ys)
        right.legend(fontsize=8, frameon=False)
    right.set_xlabel("measured peak MiB")
    right.set_ylabel("predicted peak MiB")
    right.set_title("peak memory per tier", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _diagonal(ax, xs, ys) -> None:
    lo = min(min(xs), min(ys)) * 0.8
    hi = max(max(xs), max(ys)) * 1.25
    grid = [lo, hi]
    ax.plot(grid, grid, color="grey", linewidth=0.8)
    ax.fill_between(grid, [g * 0.8 for g in grid], [g * 1.2 for g in grid], color="grey", alpha=0.12, label="±20%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
