"""Plots render headless (Agg) from a recorded timeline and from tables, with the expected lanes,
series and labels; widgets construct, and changing a control updates what they show."""

from __future__ import annotations

import matplotlib
import pandas as pd
import pytest
import torch
from matplotlib.collections import PathCollection

import flexlab
from flexlab import Policy
from flexlab.eval import policy_sweep
from flexlab.viz import (
    plot_memory,
    plot_overlap_summary,
    plot_predicted_vs_measured,
    plot_throughput,
    plot_timeline,
    plot_timelines,
)

matplotlib.use("Agg")
PROMPTS = [[2, 5, 6, 7, 8]] * 4


@pytest.fixture(scope="module")
def model():
    return flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def result(model):
    policy = Policy.from_percent(
        [0, 50, 0, 0, 0, 100],
        gpu_batch_size=2,
        num_gpu_batches=2,
        compress_weight=flexlab.QuantConfig(bits=4, group_size=32),
    )
    with flexlab.Engine(model, policy) as engine:
        return engine.generate(PROMPTS, max_new_tokens=3, stop_token_ids=None)


@pytest.fixture(scope="module")
def timeline(result):
    return result.timeline


@pytest.fixture(scope="module")
def sweep(model):
    return policy_sweep(
        model,
        {
            "all on gpu": Policy(gpu_batch_size=2),
            "weights on disk": Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=2),
            "cache on disk": Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=2),
        },
        PROMPTS,
        max_new_tokens=3,
        progress=False,
    )


def test_timeline_plot_has_a_row_per_lane_and_a_legend_per_kind(timeline):
    fig = plot_timeline(timeline)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == timeline.lanes
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"compute", "load_weight", "dequantize_weight", "store_cache", "load_act"} <= legend
    only = plot_timeline(timeline, tokens=(1, 1), lanes=["compute"])
    assert [t.get_text() for t in only.axes[0].get_yticklabels()] == ["compute"]
    summary = plot_overlap_summary(timeline)
    assert [t.get_text() for t in summary.axes[0].get_yticklabels()] == timeline.lanes


def test_the_run_records_memory_per_tier_and_the_plot_draws_it_under_the_chart(result):
    tl = result.timeline
    for tier in ("gpu", "cpu", "disk"):  # the samples reach the peak the run reports, and no higher
        assert max(m.bytes for m in tl.memory if m.tier == tier) == result.metrics[f"peak_bytes_{tier}"]
    fig = plot_timeline(tl)
    chart, memory = fig.axes[:2]
    assert memory.get_shared_x_axes().joined(chart, memory)
    assert {line.get_label() for line in memory.get_lines()} == {"gpu", "cpu", "disk"}
    gpu = next(line for line in memory.get_lines() if line.get_label() == "gpu")
    assert max(gpu.get_ydata()) * 2**20 == pytest.approx(result.metrics["peak_bytes_gpu"])  # MiB
    assert len(plot_timeline(tl, memory=False).axes) == 1


def test_the_chart_marks_the_longest_stalls_and_says_what_it_shows(timeline):
    fig = plot_timeline(timeline, tokens=(1, 2), stalls=3)
    ax = fig.axes[0]
    assert "stall (waited on: red)" in {t.get_text() for t in ax.get_legend().get_texts()}
    shaded = [c for c in ax.collections if c.get_alpha() == 0.3]
    assert len(shaded) == 3  # the three longest waits in view
    assert "tokens 1–2" in ax.get_title() and "all stages" in ax.get_title()
    s = timeline.stalls()[0]
    lo, hi = s.after.start - 2 * s.waited, s.after.end + s.waited
    zoomed = plot_timeline(timeline, window=(lo, hi)).axes[0]
    assert zoomed.get_xlim() == pytest.approx((lo * 1e3, hi * 1e3))  # ms
    assert f"{lo * 1e3:.4g}–{hi * 1e3:.4g} ms" in zoomed.get_title()


def test_two_runs_share_one_time_axis(model, timeline):
    with flexlab.Engine(model, Policy(gpu_batch_size=2, num_gpu_batches=2, overlap=False)) as engine:
        other = engine.generate(PROMPTS, max_new_tokens=3, stop_token_ids=None).timeline
    fig = plot_timelines([timeline, other], ["overlap on", "overlap off"], tokens=(0, 1))
    top, bottom = fig.axes[:2]
    assert top.get_shared_x_axes().joined(top, bottom)
    assert top.get_title().startswith("overlap on: ") and bottom.get_title().startswith("overlap off: ")
    assert [t.get_text() for t in bottom.get_yticklabels()] == other.lanes
    with pytest.raises(ValueError, match="one label per timeline"):
        plot_timelines([timeline, other], ["one"])


def test_sweep_table_and_its_plots(sweep):
    assert list(sweep.policy) == ["all on gpu", "weights on disk", "cache on disk"]
    assert (sweep.throughput_tok_s > 0).all()
    assert sweep.loc[1, "mem_disk_weights"] > 0 and sweep.loc[2, "mem_disk_kv_cache"] > 0
    assert sweep.loc[0, "mem_disk_weights"] == 0
    fig = plot_throughput(sweep)
    bars = fig.axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == list(sweep.policy)
    assert [round(p.get_width(), 6) for p in bars.patches] == [round(v, 6) for v in sweep.throughput_tok_s]
    labels = [t.get_text() for t in fig.axes[1].texts]
    assert set(labels) == set(sweep.policy) and len(labels) == sum(
        int(v > 0) for t in ("gpu", "cpu", "disk") for v in sweep[f"peak_bytes_{t}"]
    )  # every point of the scatter says its policy
    mem = plot_memory(sweep)
    assert [ax.get_title() for ax in mem.axes[:3]] == ["gpu", "cpu", "disk"]
    disk_labels = {p.get_label() for p in mem.axes[2].containers}
    assert {"weights", "kv cache"} <= disk_labels
    with pytest.raises(ValueError, match="policy_sweep returns"):
        plot_throughput(pd.DataFrame({"x": [1]}))


def test_a_sweep_with_repeats_plots_throughput_against_a_number_with_error_bars(model):
    from flexlab.viz import plot_throughput_against

    policies = {
        f"{d}% on disk, batch {b}": Policy.from_percent([100 - d, 0, d, 0, 100, 0], gpu_batch_size=b)
        for d in (0, 100)
        for b in (1, 2)
    }
    df = policy_sweep(model, policies, PROMPTS, max_new_tokens=2, repeats=3, progress=False)
    assert list(df.repeats) == [3] * 4 and list(df.gpu_batch_size) == [1, 2, 1, 2]
    assert list(df.w_disk_percent) == [0, 0, 100, 100]
    assert (df.throughput_tok_s_min <= df.throughput_tok_s).all() and (
        df.throughput_tok_s <= df.throughput_tok_s_max
    ).all()
    assert (df.throughput_tok_s_std >= 0).all()
    ax = plot_throughput_against(df, "gpu_batch_size", series="w_disk_percent").axes[0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"w_disk_percent = 0", "w_disk_percent = 100"}
    assert len(ax.containers) == 2 and all(c.has_yerr for c in ax.containers)  # a line with error bars each
    for container, (_, rows) in zip(ax.containers, df.groupby("w_disk_percent")):
        assert list(container.lines[0].get_ydata()) == list(rows.sort_values("gpu_batch_size").throughput_tok_s)
    assert "median of 3 runs" in ax.get_title()
    with pytest.raises(ValueError, match="not numeric"):
        plot_throughput_against(df, "policy")
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        policy_sweep(model, policies, PROMPTS, repeats=0)


def test_throughput_plot_keeps_rows_of_the_same_name_apart():
    df = pd.DataFrame({"policy": ["transformers", "flexlab", "transformers"], "throughput_tok_s": [50.0, 54.0, 51.0]})
    bars = plot_throughput(df).axes[0]
    assert [p.get_width() for p in bars.patches] == [50.0, 54.0, 51.0]
    assert [t.get_text() for t in bars.get_yticklabels()] == list(df.policy)


def test_predicted_vs_measured_plot_has_a_point_per_row():
    df = pd.DataFrame(
        {
            "policy": ["a", "b", "c"],
            "measured_tok_s": [10.0, 20.0, 40.0],
            "predicted_tok_s": [12.0, 18.0, 41.0],
            "measured_peak_gpu": [1e6, 2e6, 0.0],
            "predicted_peak_gpu": [1e6, 2.1e6, 0.0],
        }
    )
    fig = plot_predicted_vs_measured(df)

    def points(ax):
        return sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))

    assert points(fig.axes[0]) == 3
    assert points(fig.axes[1]) == 2  # zero peaks are left out


def test_timeline_explorer_follows_its_controls(timeline):
    from flexlab.viz import TimelineExplorer

    ex = TimelineExplorer(timeline)
    first_image, first = ex.image.value, len(ex.visible())
    ex.tokens.value = (2, 2)
    assert 0 < len(ex.visible()) < first and all(e.token == 2 for e in ex.visible())
    assert ex.image.value != first_image
    ex.lanes.value = ("compute",)
    assert {e.lane for e in ex.visible()} == {"compute"}
    ex.event.value = ex.event.max
    last = ex.visible()[-1]
    assert last.kind in ex.details.value and f"token {last.token}" in ex.details.value


def test_timeline_explorer_zooms_onto_a_stall_and_shows_a_picture_when_saved(timeline):
    import base64

    from flexlab.viz import TimelineExplorer

    ex = TimelineExplorer(timeline)
    ex.tokens.value = (0, timeline.events[-1].token)
    whole = ex.window.value
    assert "longest stalls in this selection" in ex.table.value
    longest = timeline.stalls()[0]
    ex.stall.value = 0  # the longest
    lo = min(longest.after.start - longest.waited, longest.cause.start if longest.cause else longest.after.start)
    shown = ex.window.value
    assert shown[0] <= lo * ex.scale + 1e-6 and longest.after.end * ex.scale <= shown[1] + 1e-6  # the stall is in view
    assert whole[0] - 1e-6 <= shown[0] and shown[1] <= whole[1] + 1e-6  # and no more than the selection
    if 3 * (longest.after.end - lo) * ex.scale < whole[1] - whole[0]:  # its span and as much again either side
        assert shown[1] - shown[0] < whole[1] - whole[0]  # zoomed in
    ex.tokens.value = (longest.after.token, longest.after.token)  # a narrower selection holding the stall
    narrow = ex.window.value
    ex.stall.value = next(i for i, s in enumerate(ex._stalls) if s is longest)
    assert narrow[0] - 1e-6 <= ex.window.value[0] and ex.window.value[1] <= narrow[1] + 1e-6
    ex.tokens.value = (0, timeline.events[-1].token)
    ex.stall.value = 0
    assert ex.visible()[ex.event.value] is longest.after  # and the compute that waited is picked
    assert f"token {longest.after.token}" in ex.details.value
    ex.window.value = (whole[0], (whole[0] + whole[1]) / 2)
    assert max(e.start for e in ex.visible()) <= ex.window.value[1] / 1e3
    bundle = ex._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]) == ex.image.value and ex.image.value[:4] == b"\x89PNG"
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == ex.widget.model_id


def test_compression_explorer_follows_its_controls_and_generates(model):
    from flexlab.eval import ablation_settings, setting_generator
    from flexlab.viz import CompressionExplorer

    rows = []
    for s in ablation_settings(bits=(4, 2), group_sizes=(32,), targets=("weights", "cache")):
        rows.append(
            dict(
                setting=s.name,
                target=s.target,
                bits=s.bits,
                group_size=s.group_size,
                kv_layout=s.kv_layout if s.target != "weights" and s.target != "none" else None,
                perplexity=10.0 + (8 - (s.bits or 8)),
                perplexity_change_pct=(8 - (s.bits or 8)) * 10.0,
                weight_bits_per_element=(s.bits or 32) + 1.0,
                cache_bits_per_element=(s.bits or 32) + 1.0,
                peak_bytes_gpu=100.0,
                peak_bytes_cpu=0.0,
                peak_bytes_disk=0.0,
                saved_gpu_pct=50.0,
                saved_cpu_pct=0.0,
                saved_disk_pct=0.0,
            )
        )
    ex = CompressionExplorer(pd.DataFrame(rows), generate=setting_generator(model, [2, 5, 6], max_new_tokens=4))
    assert "weights 4-bit g32" in ex.details.value and "+40.0%" in ex.details.value
    before = ex.image.value
    ex.bits.value = 2
    assert "weights 2-bit g32" in ex.details.value and ex.image.value != before
    ex.target.value = "cache"
    ex.layout.value = "per-channel"
    assert "cache 2-bit g32 per-channel keys" in ex.details.value
    ex.button.click()
    assert ex.texts.value.count("<td") == 2 and "per-channel keys" in ex.texts.value


def test_figures_save_for_a_paper_as_png_and_svg_at_200_dpi(timeline, tmp_path):
    from PIL import Image

    from flexlab.viz import save_figure

    written = save_figure(plot_timeline(timeline), tmp_path / "figures" / "timeline.pdf")
    assert written == [tmp_path / "figures" / "timeline.png", tmp_path / "figures" / "timeline.svg"]
    with Image.open(written[0]) as png:
        assert png.info["dpi"] == pytest.approx((200, 200), abs=0.5)
    assert "<svg" in written[1].read_text()[:2000]
    assert sorted(p.name for p in written[0].parent.iterdir()) == ["timeline.png", "timeline.svg"]  # no temp files
    with pytest.raises(ValueError, match="formats is empty"):
        save_figure(plot_timeline(timeline), tmp_path / "x", formats=())


def test_accuracy_against_memory_draws_the_pareto_front_on_a_symlog_axis_where_two_bits_would_squash_the_rest():
    from flexlab.viz import plot_accuracy_vs_bits, plot_accuracy_vs_memory
    from flexlab.viz.compression import pareto_front

    mib = 2**20
    df = pd.DataFrame(
        {
            "setting": ["none", "w8", "w4", "w2", "c4", "c2"],
            "target": ["none", "weights", "weights", "weights", "cache", "cache"],
            "bits": [None, 8, 4, 2, 4, 2],
            "group_size": [None, 64, 64, 64, 64, 64],
            "kv_layout": [None, None, None, None, "per-token", "per-token"],
            "weight_bits_per_element": [16, 8.5, 4.5, 2.5, 16, 16],
            "cache_bits_per_element": [16, 16, 16, 16, 4.5, 2.5],
            "perplexity_change_pct": [0.0, 0.1, 2.0, 150.0, 0.5, 3.0],
            "token_agreement": [1.0, 0.99, 0.9, 0.2, 0.95, 0.93],
            "peak_bytes_gpu": [10 * mib, 6 * mib, 4 * mib, 3 * mib, 9 * mib, 8.5 * mib],
            "peak_bytes_cpu": [0.0] * 6,
            "peak_bytes_disk": [0.0] * 6,
        }
    )
    memory = df.peak_bytes_gpu
    # c4 and c2 cost more memory than w4 and do worse: off the front; w2 is the smallest
    assert list(df.setting[pareto_front(memory, df.perplexity_change_pct)]) == ["w2", "w4", "w8", "none"]
    assert list(df.setting[pareto_front(memory, df.token_agreement, higher_is_better=True)]) == [
        "w2",
        "w4",
        "w8",
        "none",
    ]
    ax = plot_accuracy_vs_memory(df).axes[0]
    assert ax.get_yscale() == "symlog" and "symlog" in ax.get_ylabel()  # 150% would flatten 0.1-3%
    assert [t.get_text() for t in ax.texts] == ["w2", "w4", "w8", "none"]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "compressed: weights",
        "compressed: cache",
        "uncompressed",
        "Pareto front",
    }
    bits = plot_accuracy_vs_bits(df).axes[0]
    assert bits.get_yscale() == "symlog" and "symlog" in bits.get_ylabel()
    gentle = df.assign(perplexity_change_pct=[0.0, 0.1, 2.0, 5.0, 0.5, 3.0])  # nothing to squash: linear
    assert plot_accuracy_vs_memory(gentle).axes[0].get_yscale() == "linear"
    assert plot_accuracy_vs_bits(gentle).axes[0].get_yscale() == "linear"


def test_the_expected_ipywidgets_is_the_one_imported():
    """Inside the run below: the widget tests ran against the ipywidgets they were meant to."""
    import os

    import ipywidgets

    expected = os.environ.get("FLEXLAB_EXPECT_IPYWIDGETS")
    if not expected:
        pytest.skip("only inside test_the_explorers_work_with_ipywidgets_7")
    assert ipywidgets.__version__.startswith(expected)


def test_the_explorers_work_with_ipywidgets_7(tmp_path):
    """Colab ships ipywidgets 7; the explorers' tests pass with it (installed beside this
    environment's 8, first on the path, in a separate pytest run)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "ipywidgets7"
    pins = ["ipywidgets==7.8.5", "widgetsnbextension==3.6.10", "jupyterlab_widgets==1.1.11", "ipython_genutils==0.2.0"]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *pins]
    got = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    if got.returncode != 0:
        pytest.skip(f"ipywidgets 7 could not be installed (no package index?): {got.stderr.strip()[-300:]}")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(root)]), "FLEXLAB_EXPECT_IPYWIDGETS": "7."}
    select = "(explorer and not work_with_ipywidgets) or expected_ipywidgets"  # not this test again
    inner = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", select]
    done = subprocess.run(inner, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "4 passed" in done.stdout  # three explorer tests and the version check, none skipped
