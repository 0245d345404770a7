"""Interactive explorers for notebooks (ipywidgets): a timeline explorer and a compression explorer.

Figures are rendered to PNG and shown in an ``ipywidgets.Image``, so they work the same in
Jupyter, JupyterLab and Colab with no interactive matplotlib backend. Each explorer keeps its
current ``figure`` and shows itself when it is the last expression of a cell.

    >>> TimelineExplorer(result.timeline)                     # doctest: +SKIP
    >>> CompressionExplorer(ablation_df, generate=setting_generator(model, "The "))  # doctest: +SKIP
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable

from matplotlib.figure import Figure

from flexlab.timeline import Timeline
from flexlab.viz.compression import TARGET_ORDER, plot_accuracy_vs_bits
from flexlab.viz.timeline import plot_timeline


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


class TimelineExplorer:
    """Choose a token range, a stage (layer) range and the lanes to show; step through the
    events in view to see one's kind, stage, batch, bytes and bandwidth (it is ringed in red)."""

    def __init__(self, timeline: Timeline, *, width: float = 12.0) -> None:
        import ipywidgets as w

        if not len(timeline):
            raise ValueError("the timeline has no events; run a generation first")
        self.timeline, self.width = timeline, width
        tokens = [e.token for e in timeline.events]
        stages = [e.stage for e in timeline.events]
        self.tokens = w.IntRangeSlider(value=(0, min(1, max(tokens))), min=0, max=max(tokens), description="tokens")
        self.stages = w.IntRangeSlider(value=(0, max(stages)), min=0, max=max(stages), description="stages")
        self.lanes = w.SelectMultiple(
            options=timeline.lanes, value=tuple(timeline.lanes), description="lanes", rows=min(6, len(timeline.lanes))
        )
        self.event = w.IntSlider(value=0, min=0, max=0, description="event")
        self.image = w.Image(format="png")
        self.details = w.HTML()
        for control in (self.tokens, self.stages, self.lanes):
            control.observe(self._on_range, names="value")
        self.event.observe(lambda _: self._render(), names="value")
        self.widget = w.VBox(
            [w.HBox([w.VBox([self.tokens, self.stages, self.event]), self.lanes]), self.details, self.image]
        )
        self.figure: Figure | None = None
        self._on_range(None)

    def visible(self) -> list:
        """The events the current controls select, in time order."""
        (t0, t1), (s0, s1), lanes = self.tokens.value, self.stages.value, set(self.lanes.value)
        return [e for e in self.timeline.events if t0 <= e.token <= t1 and s0 <= e.stage <= s1 and e.lane in lanes]

    def _on_range(self, _change) -> None:
        n = len(self.visible())
        self.event.max = max(n - 1, 0)
        self.event.value = min(self.event.value, self.event.max)
        self._render()

    def _render(self) -> None:
        events = self.visible()
        self.figure = plot_timeline(
            self.timeline,
            tokens=self.tokens.value,
            stages=self.stages.value,
            lanes=list(self.lanes.value),
            width=self.width,
        )
        if events:
            e = events[self.event.value]
            ax = self.figure.axes[0]
            rows = [lane for lane in self.timeline.lanes if lane in self.lanes.value]
            t0 = min(x.start for x in events)
            scale = 1e3 if max(x.end for x in events) - t0 < 10 else 1.0
            ax.broken_barh(
                [((e.start - t0) * scale, max(e.duration * scale, 1e-6))],
                (rows.index(e.lane) - 0.45, 0.9),
                facecolors="none",
                edgecolors="red",
                linewidth=1.5,
            )
            bandwidth = f", {e.bytes / e.duration / 1e9:.2f} GB/s" if e.bytes and e.duration > 0 else ""
            self.details.value = (
                f"<b>{html.escape(e.kind)}</b> {html.escape(e.stage_name)} (stage {e.stage}), "
                f"token {e.token}, batch {e.batch}, on <i>{html.escape(e.lane)}</i>: "
                f"{e.duration * 1e3:.3f} ms, {e.bytes / 2**20:.2f} MiB{bandwidth}"
            )
        else:
            self.details.value = "no events in this selection"
        self.image.value = _png(self.figure)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


class CompressionExplorer:
    """Pick bits, group size, target and KV layout from an ablation table: the accuracy curves
    ring the choice, and a line gives its bits per element, perplexity change and memory saved
    per tier. With ``generate`` (a table row -> the text generated under that setting, e.g.
    :func:`flexlab.eval.setting_generator`), the button shows the uncompressed text (the row
    ``{"target": "none"}``) and the chosen setting's side by side."""

    def __init__(self, df, *, generate: Callable | None = None, width: float = 12.0) -> None:
        import ipywidgets as w

        rows = df[df.target != "none"]
        if not len(rows):
            raise ValueError("the ablation table has no compressed settings")
        self.df, self.generate, self.width = df, generate, width
        options = lambda col: sorted(rows[col].dropna().unique().tolist())  # noqa: E731
        self.target = w.Dropdown(options=[t for t in TARGET_ORDER if t in options("target")], description="target")
        bits = [int(b) for b in options("bits")]
        self.bits = w.Dropdown(options=bits, value=4 if 4 in bits else bits[-1], description="bits")
        self.group = w.Dropdown(options=[int(g) for g in options("group_size")], description="group")
        layouts = sorted(options("kv_layout") or ["per-token"], key=lambda x: x != "per-token")
        self.layout = w.Dropdown(options=layouts, description="KV layout")
        self.image, self.details, self.texts = w.Image(format="png"), w.HTML(), w.HTML()
        self.button = w.Button(description="generate side by side", disabled=generate is None)
        self.button.on_click(self._generate)
        for control in (self.target, self.bits, self.group, self.layout):
            control.observe(lambda _: self._render(), names="value")
        self.widget = w.VBox(
            [
                w.HBox([self.target, self.bits, self.group, self.layout]),
                self.details,
                self.image,
                self.button,
                self.texts,
            ]
        )
        self.figure: Figure | None = None
        self._render()

    def selected(self):
        """The table row the controls pick (None when that combination was not run)."""
        df = self.df
        pick = (df.target == self.target.value) & (df.bits == self.bits.value) & (df.group_size == self.group.value)
        if self.target.value != "weights":
            pick &= df.kv_layout == self.layout.value
        rows = df[pick]
        return rows.iloc[0] if len(rows) else None

    def _render(self) -> None:
        row = self.selected()
        self.layout.disabled = self.target.value == "weights"
        self.figure = plot_accuracy_vs_bits(self.df, highlight=None if row is None else row.setting, width=self.width)
        if row is None:
            self.details.value = "this combination is not in the table"
        else:
            saved = ", ".join(f"{t} {row.get(f'saved_{t}_pct', float('nan')):.0f}%" for t in ("gpu", "cpu", "disk"))
            bpe = row.weight_bits_per_element if self.target.value == "weights" else row.cache_bits_per_element
            self.details.value = (
                f"<b>{html.escape(row.setting)}</b>: {bpe:.2f} bits per element, perplexity "
                f"{row.perplexity:.2f} ({row.perplexity_change_pct:+.1f}%), memory saved: {saved}"
            )
        self.image.value = _png(self.figure)

    def _generate(self, _button=None) -> None:
        row = self.selected()
        if row is None or self.generate is None:
            return
        texts = [self.generate({"target": "none"}), self.generate(row)]
        cell = "<td style='vertical-align:top;white-space:pre-wrap;border:1px solid #ccc;padding:4px'>{}</td>"
        self.texts.value = (
            "<table><tr><th>uncompressed</th><th>"
            + html.escape(row.setting)
            + "</th></tr><tr>"
            + "".join(cell.format(html.escape(t)) for t in texts)
            + "</tr></table>"
        )

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
