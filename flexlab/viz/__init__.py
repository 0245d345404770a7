"""Plots and widgets: pure functions of Timelines and DataFrames (never the runtime)."""

from flexlab.viz.timeline import plot_overlap_summary, plot_timeline

__all__ = ["plot_timeline", "plot_overlap_summary"]
