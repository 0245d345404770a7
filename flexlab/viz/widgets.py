"""Interactive explorers for notebooks (ipywidgets): a timeline explorer and a compression explorer.

Figures are rendered to PNG and shown in an ``ipywidgets.Image``, so they work the same in
Jupyter, JupyterLab and Colab with no interactive matplotlib backend. Each explorer keeps its
current ``figure`` and shows itself when it is the last expression of a cell.

    >>> TimelineExplorer(result.timeline)                     # doctest: +SKIP
    >>> CompressionExplorer(ablation_df, generate=setting_generator(model, "The "))  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
from collections.abc import Callable
from typing import Any

from matplotlib.figure import Figure

from flexlab.timeline import Timeline
from flexlab.viz.compression import TARGET_ORDER, plot_accuracy_vs_bits
from flexlab.viz.timeline import plot_timeline, select, time_scale

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _bundle(widget, png: bytes, text: str) -> dict:
    """How an explorer shows itself: the live widget where widgets render (ipywidgets 7 and 8
    spell its view alike), and its current figure as a PNG beside it, which saved notebooks,
    GitHub and HTML exports show instead (they cannot run the widget)."""
    data: dict[str, Any] = {"text/plain": text, "image/png": base64.b64encode(png).decode("ascii")}
    if getattr(widget, "_view_name", None) is not None and getattr(widget, "comm", None) is not None:
        data[WIDGET_VIEW] = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
    return data


class TimelineExplorer:
    """Find where compute waited, and on what. Choose a token range, a stage (layer) range, the
    lanes, and a time window (zoom and pan); pick one of the longest stalls to zoom onto it (the
    wait is shaded on the compute row, the transfer it waited on outlined in red, and a table
    lists the longest stalls in view); step through the events in view to see one's kind,
    stage, batch, bytes and bandwidth (it is ringed in red). The engine's memory per tier runs
    under the chart. Saved notebooks and HTML exports show the current figure as a picture."""

    STALLS_LISTED = 8

    def __init__(self, timeline: Timeline, *, width: float = 12.0) -> None:
        import ipywidgets as w

        if not len(timeline):
            raise ValueError("the timeline has no events; run a generation first")
        self.timeline, self.width = timeline, width
        tokens = [e.token for e in timeline.events]
        stages = [e.stage for e in timeline.events]
        end = max(e.end for e in timeline.events)
        self.scale, self.unit = time_scale(end)
        self.tokens = w.IntRangeSlider(value=(0, min(1, max(tokens))), min=0, max=max(tokens), description="tokens")
        self.stages = w.IntRangeSlider(value=(0, max(stages)), min=0, max=max(stages), description="stages")
        self.lanes = w.SelectMultiple(
            options=timeline.lanes, value=tuple(timeline.lanes), description="lanes", rows=min(6, len(timeline.lanes))
        )
        top = end * self.scale
        self.window = w.FloatRangeSlider(
            value=(0.0, top), min=0.0, max=top, step=top / 1000, description=f"time ({self.unit})", readout_format=".4g"
        )
        self.stall = w.Dropdown(options=[("(longest stalls)", None)], description="stall")
        self.event = w.IntSlider(value=0, min=0, max=0, description="event")
        self.image = w.Image(format="png")
        self.details, self.table = w.HTML(), w.HTML()
        self._quiet = False  # set while one control moves the others: a single redraw
        self._span = (0.0, top)  # the selection's time span, which a zoom onto a stall stays inside
        for control in (self.tokens, self.stages, self.lanes):
            control.observe(self._on_selection, names="value")
        self.window.observe(lambda _: self._on_range(), names="value")
        self.stall.observe(self._on_stall, names="value")
        self.event.observe(lambda _: self._render(), names="value")
        self.widget = w.VBox(
            [
                w.HBox([w.VBox([self.tokens, self.stages, self.window]), w.VBox([self.stall, self.event]), self.lanes]),
                self.details,
                self.image,
                self.table,
            ]
        )
        self.figure: Figure | None = None
        self._on_selection(None)

    def visible(self) -> list:
        """The events the current controls select, in time order."""
        lo, hi = self.window.value
        return select(
            self.timeline, self.tokens.value, self.stages.value, self.lanes.value, (lo / self.scale, hi / self.scale)
        )

    @contextlib.contextmanager
    def _together(self):
        """Move several controls with one redraw at the end (their observers wait meanwhile)."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False
        self._render()

    def _on_selection(self, _change) -> None:
        """New tokens, stages or lanes: the window spans them, and the stall list is theirs."""
        chosen = select(self.timeline, self.tokens.value, self.stages.value, self.lanes.value)
        shown = set(map(id, chosen))
        self._stalls = [s for s in self.timeline.stalls() if id(s.after) in shown][: self.STALLS_LISTED]
        with self._together():
            if chosen:
                self._span = (min(e.start for e in chosen) * self.scale, max(e.end for e in chosen) * self.scale)
                self.window.value = self._span
            self.stall.options = [("(longest stalls)", None)] + [
                (self._label(s), i) for i, s in enumerate(self._stalls)
            ]
            self.stall.value = None
            self._fit_event_slider()

    def _on_stall(self, change) -> None:
        """Zoom onto a stall: the wait and the transfer it waited on, with as much again around,
        within the selection's span (a zoom never shows more than the selection did)."""
        if self._quiet or change["new"] is None:
            return
        s = self._stalls[change["new"]]
        lo = min(s.after.start - s.waited, s.cause.start if s.cause else s.after.start)
        hi = s.after.end
        pad = hi - lo
        with self._together():
            first, last = self._span
            self.window.value = (max(first, (lo - pad) * self.scale), min(last, (hi + pad) * self.scale))
            self._fit_event_slider()
            self.event.value = next((i for i, e in enumerate(self.visible()) if e is s.after), 0)

    def _on_range(self) -> None:
        if not self._quiet:
            with self._together():
                self._fit_event_slider()

    def _fit_event_slider(self) -> None:
        self.event.max = max(len(self.visible()) - 1, 0)
        self.event.value = min(self.event.value, self.event.max)

    @staticmethod
    def _label(s) -> str:
        e = s.after
        return f"{s.waited * 1e3:.2f} ms on {s.cause_kind}: token {e.token}, {e.stage_name or e.stage}, batch {e.batch}"

    def _render(self) -> None:
        if self._quiet:
            return
        events = self.visible()
        lo, hi = self.window.value
        self.figure = plot_timeline(
            self.timeline,
            tokens=self.tokens.value,
            stages=self.stages.value,
            lanes=list(self.lanes.value),
            window=(lo / self.scale, hi / self.scale),
            width=self.width,
        )
        if events:
            e = events[self.event.value]
            ax = self.figure.axes[0]
            rows = [lane for lane in self.timeline.lanes if lane in self.lanes.value]
            scale = time_scale((hi - lo) / self.scale)[0]
            ax.broken_barh(
                [(e.start * scale, max(e.duration * scale, 1e-6))],
                (rows.index(self.timeline.lane_of(e)) - 0.45, 0.9),
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
        self.table.value = self._stall_table()
        self.image.value = _png(self.figure)

    def _stall_table(self) -> str:
        if not self._stalls:
            return "<i>compute never waited in this selection</i>"
        rows = "".join(
            f"<tr><td>{s.after.token}</td><td>{html.escape(s.after.stage_name or str(s.after.stage))}</td>"
            f"<td>{s.after.batch}</td><td>{s.waited * 1e3:.3f}</td><td>{html.escape(s.cause_kind)}</td>"
            f"<td>{(s.waited - s.transfer_s) * 1e3:.3f}</td>"
            f"<td>{(s.cause.bytes if s.cause else 0) / 2**20:.2f}</td></tr>"
            for s in self._stalls
        )
        names = ("token", "stage", "batch", "waited (ms)", "on", "of it host (ms)", "MiB")
        head = "<tr>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
        return f"<b>longest stalls in this selection</b><table>{head}{rows}</table>"

    def _repr_mimebundle_(self, **kwargs) -> dict:
        return _bundle(self.widget, self.image.value, repr(self))

    def __repr__(self) -> str:
        return f"TimelineExplorer({len(self.timeline)} events, {len(self.timeline.lanes)} lanes)"


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

    def _repr_mimebundle_(self, **kwargs) -> dict:
        return _bundle(self.widget, self.image.value, f"CompressionExplorer({len(self.df)} settings)")
