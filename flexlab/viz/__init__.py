"""Plots and widgets: pure functions of Timelines and DataFrames (never the runtime).

The widgets (``TimelineExplorer``, ``CompressionExplorer``) need ipywidgets
(``pip install flexlab[notebook]``); they are imported on first use.
"""

from flexlab.viz.compression import plot_accuracy_vs_bits, plot_accuracy_vs_memory
from flexlab.viz.cost import plot_predicted_vs_measured
from flexlab.viz.export import save_figure
from flexlab.viz.policy import plot_memory, plot_throughput, plot_throughput_against
from flexlab.viz.timeline import plot_overlap_summary, plot_timeline, plot_timelines

__all__ = [
    "plot_timeline",
    "plot_timelines",
    "plot_overlap_summary",
    "plot_accuracy_vs_bits",
    "plot_accuracy_vs_memory",
    "plot_predicted_vs_measured",
    "plot_throughput",
    "plot_throughput_against",
    "plot_memory",
    "save_figure",
    "TimelineExplorer",
    "CompressionExplorer",
]


def __getattr__(name: str):
    if name in ("TimelineExplorer", "CompressionExplorer"):
        from flexlab.viz import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'flexlab.viz' has no attribute {name!r}")
