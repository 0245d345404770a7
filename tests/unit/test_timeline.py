import json

import pytest

from flexlab.timeline import Event, Timeline


def make():
    return Timeline(
        [
            Event("compute", "compute", 0, 1, 0, 0.0, 1.0),
            Event("compute", "compute", 0, 1, 1, 1.5, 2.0),
            Event("load weight", "load_weight", 0, 2, None, 0.5, 1.5, 2_000_000_000),
            Event("store cache", "store_cache", 0, 1, 0, 3.0, 4.0, 1_000),
        ]
    )


def test_summary_measures_hidden_and_exposed_io():
    s = make().summary()
    assert s["wall_s"] == 4.0
    assert s["compute_busy_s"] == 1.5
    assert s["io_busy_s"] == 2.0
    assert s["io_hidden_s"] == pytest.approx(0.5)
    assert s["io_exposed_s"] == pytest.approx(1.5)
    assert s["io_hidden_fraction"] == pytest.approx(0.25)
    assert s["compute_idle_fraction"] == pytest.approx(1 - 1.5 / 4)
    assert s["GB_per_s[load weight]"] == pytest.approx(2.0)


def test_pandas_save_load_and_chrome_trace(tmp_path):
    tl = make()
    df = tl.to_pandas()
    assert list(df["lane"]) == ["compute", "load weight", "compute", "store cache"]
    assert df["duration"].sum() == pytest.approx(3.5)
    tl.save(tmp_path / "t.json")
    assert Timeline.load(tmp_path / "t.json").events == tl.events
    tl.to_chrome_trace(tmp_path / "trace.json")
    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    assert len(spans) == 4 and spans[1]["dur"] == pytest.approx(1e6)
    assert {e["args"]["name"] for e in trace if e["name"] == "thread_name"} == {"compute", "load weight", "store cache"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_a_pipeline_timeline_groups_lanes_by_rank(tmp_path):
    """Each rank's lanes are rows of their own (compute first), summed apart, and a process each
    in the Chrome trace; a saved file without ranks (older versions) loads as rank 0."""
    tl = Timeline(
        [
            Event("compute", "compute", 0, 1, 0, 0.0, 1.0, rank=0),
            Event("send", "send", 0, 1, 0, 1.0, 1.2, 100, rank=0),
            Event("recv", "recv", 0, 2, 0, 0.0, 1.3, 100, rank=1),
            Event("compute", "compute", 0, 2, 0, 1.3, 2.0, rank=1),
        ]
    )
    assert tl.lanes == ["rank 0 compute", "rank 0 send", "rank 1 compute", "rank 1 recv"]
    s = tl.summary()
    assert s["busy_s[rank 0 compute]"] == pytest.approx(1.0) and s["busy_s[rank 1 compute]"] == pytest.approx(0.7)
    assert s["compute_busy_s"] == pytest.approx(1.7)  # the time some rank computes
    tl.to_chrome_trace(tmp_path / "trace.json")
    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert {e["args"]["name"] for e in trace if e["name"] == "process_name"} == {"rank 0", "rank 1"}
    assert {(e["pid"], e["args"]["name"]) for e in trace if e["name"] == "thread_name"} == {
        (0, "compute"),
        (0, "send"),
        (1, "recv"),
        (1, "compute"),
    }
    old = {"version": 1, "events": [{k: v for k, v in vars(e).items() if k != "rank"} for e in tl.events]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert {e.rank for e in Timeline.load(tmp_path / "old.json").events} == {0}
