"""Figures for a paper: one call writes a figure as PNG and SVG at print resolution.

>>> from flexlab.viz import plot_timeline, save_figure           # doctest: +SKIP
>>> save_figure(plot_timeline(result.timeline), "figures/timeline")  # timeline.png, timeline.svg  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from flexlab.files import atomic_path

PAPER_DPI = 200


def save_figure(
    fig: Figure, path: str | os.PathLike, *, dpi: int = PAPER_DPI, formats: tuple[str, ...] = ("png", "svg")
) -> list[Path]:
    """Write ``fig`` as ``path`` with each suffix in ``formats`` (a suffix ``path`` has is
    replaced), trimmed to its artists; each file is written atomically. Returns the paths."""
    if not formats:
        raise ValueError("formats is empty: give at least one, e.g. ('png', 'svg')")
    written = []
    for fmt in formats:
        target = Path(path).with_suffix(f".{fmt.lstrip('.')}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        written.append(target)
    return written
