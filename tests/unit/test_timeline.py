import json

import pytest

from flexlab.timeline import Event, MemorySample, Timeline


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


def check_trace_event_format(trace: dict) -> list[dict]:
    """The parts of the Trace Event Format (Chrome's, which Perfetto reads) a flexlab trace uses."""
    events = trace["traceEvents"]
    assert trace.get("displayTimeUnit") in ("ms", "ns")
    flows: dict[int, list[str]] = {}
    for e in events:
        assert isinstance(e["name"], str) and isinstance(e["pid"], int), e
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name") and isinstance(e["args"]["name"], str), e
            assert e["name"] == "process_name" or isinstance(e["tid"], int), e
        elif e["ph"] == "X":
            assert isinstance(e["tid"], int) and e["ts"] >= 0 and e["dur"] > 0 and isinstance(e["cat"], str), e
        elif e["ph"] == "C":  # a counter: numbers by series name
            assert e["ts"] >= 0 and e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values()), e
        elif e["ph"] in ("s", "f"):
            assert isinstance(e["id"], int) and isinstance(e["tid"], int) and e["ts"] >= 0 and e["cat"], e
            assert e["ph"] == "s" or e.get("bp") == "e", e  # a flow's end binds to the slice it enters
            flows.setdefault(e["id"], []).append(e["ph"])
        else:
            raise AssertionError(f"phase {e['ph']!r} is not one a flexlab trace writes: {e}")
    assert all(sorted(v) == ["f", "s"] for v in flows.values()), flows  # every arrow has both ends
    return events


def test_pandas_save_load_and_chrome_trace(tmp_path):
    tl = make()
    df = tl.to_pandas()
    assert list(df["lane"]) == ["compute", "load weight", "compute", "store cache"]
    assert df["duration"].sum() == pytest.approx(3.5)
    tl.save(tmp_path / "t.json")
    assert Timeline.load(tmp_path / "t.json").events == tl.events
    tl.to_chrome_trace(tmp_path / "trace.json")
    trace = check_trace_event_format(json.loads((tmp_path / "trace.json").read_text()))
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
    trace = check_trace_event_format(json.loads((tmp_path / "trace.json").read_text()))
    assert {e["args"]["name"] for e in trace if e["name"] == "process_name"} == {"rank 0", "rank 1"}
    base = min(e["pid"] for e in trace)
    assert {(e["pid"] - base, e["args"]["name"]) for e in trace if e["name"] == "thread_name"} == {
        (0, "compute"),
        (0, "send"),
        (1, "recv"),
        (1, "compute"),
    }
    # the receive on rank 1 is waited on by rank 1's compute: one arrow, on rank 1's rows
    arrows = [e for e in trace if e["ph"] in ("s", "f")]
    assert [(e["ph"], e["pid"] - base) for e in arrows] == [("s", 1), ("f", 1)]
    old = {"version": 1, "events": [{k: v for k, v in vars(e).items() if k != "rank"} for e in tl.events]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert {e.rank for e in Timeline.load(tmp_path / "old.json").events} == {0}


def test_trace_arrows_lead_from_each_load_to_the_compute_that_waits_and_runs_merge(tmp_path):
    tl = Timeline(
        [
            Event("load weight", "load_weight", 0, 1, None, 0.0, 0.5, 100),
            Event("load cache", "load_cache", 0, 1, 1, 0.2, 0.9, 10),
            Event("compute", "compute", 0, 1, 0, 0.5, 1.0),
            Event("compute", "compute", 0, 1, 1, 1.0, 1.5),
            Event("compute", "compute", 0, 2, 0, 1.5, 2.0),  # nothing loaded for it: no arrow
        ]
    )
    tl.to_chrome_trace(tmp_path / "a.json", run="policy A")
    tl.to_chrome_trace(tmp_path / "b.json", run="policy B")
    a, b = (check_trace_event_format(json.loads((tmp_path / f"{n}.json").read_text())) for n in "ab")
    spans = {(e["args"]["batch"], e["args"]["stage"], e["cat"]): e for e in a if e["ph"] == "X"}
    ends = {(e["id"], e["ph"]): e for e in a if e["ph"] in ("s", "f")}
    assert len(ends) == 4  # two arrows
    weight, cache = spans[(None, 1, "load_weight")], spans[(1, 1, "load_cache")]
    first, second = spans[(0, 1, "compute")], spans[(1, 1, "compute")]
    for (start, end), (load, compute) in zip(
        sorted(((ends[(i, "s")], ends[(i, "f")]) for i in (0, 1)), key=lambda p: p[0]["ts"]),
        [(weight, first), (cache, second)],  # the weights serve the stage's first batch first
    ):
        assert load["ts"] <= start["ts"] <= load["ts"] + load["dur"] and start["tid"] == load["tid"]
        assert end["ts"] == compute["ts"] and end["tid"] == compute["tid"]
    assert {e["args"]["name"] for e in a if e["name"] == "process_name"} == {"rank 0 (policy A)"}
    assert {e["pid"] for e in a}.isdisjoint({e["pid"] for e in b})  # two runs merge without clashing


def test_stalls_name_what_compute_waited_on():
    tl = Timeline(
        [
            Event("load weight", "load_weight", 0, 1, None, 0.0, 0.5, 100),  # the first compute waits for it
            Event("compute", "compute", 0, 1, 0, 0.6, 1.0),
            Event("load cache", "load_cache", 0, 1, 1, 0.8, 1.4, 10),  # ends 0.4 s after compute is free
            Event("load cache", "load_cache", 0, 1, 1, 0.2, 0.9, 10),  # ended earlier: not the cause
            Event("compute", "compute", 0, 1, 1, 1.5, 2.0),
            Event("dequantize_weight", "dequantize_weight", 0, 1, 1, 1.6, 1.7),  # inside a compute: no gap
            Event("compute", "compute", 0, 2, 0, 2.25, 2.5),  # nothing loaded for it: the host
            Event("compute", "compute", 0, 2, 1, 2.5, 3.0),  # no gap at all
        ]
    )
    stalls = tl.stalls()
    assert [(s.after.stage, s.after.batch, round(s.waited, 6), s.cause_kind) for s in stalls] == [
        (1, 0, 0.6, "load_weight"),  # longest first
        (1, 1, 0.5, "load_cache"),
        (2, 0, 0.25, "host"),
    ]
    assert stalls[1].cause.start == 0.8 and stalls[1].before.batch == 0
    assert [s.cause_kind for s in tl.stalls(min_wait=0.3)] == ["load_weight", "load_cache"]
    s = tl.summary()
    # waits split where the transfer ended: 0.5 s of the first on weights, 0.4 s of the second on
    # the cache, and the host the rest (0.1 s after each transfer ended, and all of the third)
    assert [round(x.transfer_s, 6) for x in stalls] == [0.5, 0.4, 0.0]
    assert s["waited_s[load_weight]"] == pytest.approx(0.5) and s["waited_s[load_cache]"] == pytest.approx(0.4)
    assert s["waited_s[host]"] == pytest.approx(0.45)
    table = tl.stall_table(top=2)
    assert list(table.waited_on) == ["load_weight", "load_cache"] and list(table.bytes) == [100, 10]
    assert table.waited_ms.iloc[0] == pytest.approx(600.0) and table.host_ms.iloc[0] == pytest.approx(100.0)


def test_memory_samples_save_load_and_make_counter_tracks(tmp_path):
    samples = [MemorySample(0.0, "gpu", 100), MemorySample(0.5, "cpu", 7), MemorySample(1.0, "gpu", 40)]
    tl = Timeline(make().events, memory=samples[::-1])
    assert tl.memory == samples  # in time order
    tl.save(tmp_path / "t.json")
    assert Timeline.load(tmp_path / "t.json").memory == samples
    tl.to_chrome_trace(tmp_path / "trace.json")
    counters = [
        e for e in check_trace_event_format(json.loads((tmp_path / "trace.json").read_text())) if e["ph"] == "C"
    ]
    assert [(c["ts"], c["args"]) for c in counters] == [
        (0.0, {"gpu": 100}),
        (0.5e6, {"gpu": 100, "cpu": 7}),  # every tier's level at each change
        (1e6, {"gpu": 40, "cpu": 7}),
    ]
