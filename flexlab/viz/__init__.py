"""Plots and widgets: pure functions of Timelines and DataFrames (never the runtime)."""

from flexlab.viz.compression import plot_accuracy_vs_bits
from flexlab.viz.cost import plot_predicted_vs_measured
from flexlab.viz.timeline import plot_overlap_summary, plot_timeline

__all__ = ["plot_timeline", "plot_overlap_summary", "plot_accuracy_vs_bits", "plot_predicted_vs_measured"]
