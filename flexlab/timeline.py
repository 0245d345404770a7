"""Every transfer and every compute as an event; summaries, files and Chrome traces from them.

A :class:`Timeline` is plain data: it can be saved on a GPU machine and re-plotted on a laptop.

    >>> from flexlab.timeline import Event, Timeline
    >>> tl = Timeline([Event("compute", "compute", 0, 1, 0, 0.0, 1.0),
    ...                Event("load weight", "load_weight", 0, 2, None, 0.5, 1.5, 1_000_000)])
    >>> round(tl.summary()["io_hidden_fraction"], 2)   # half of the load ran under compute
    0.5
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from flexlab.files import atomic_write

COMPUTE_LANE = "compute"
WAITED_ON = ("load_weight", "load_cache", "load_act", "recv")  # what a compute step waits for


@dataclass(frozen=True)
class Event:
    """One interval on one lane. Times are seconds from the start of the run."""

    lane: str  # "compute", "load weight", "load cache", "store cache", ...
    kind: str  # the step kind: "compute", "load_weight", ...
    token: int
    stage: int
    batch: int | None
    start: float
    end: float
    bytes: int = 0
    stage_name: str = ""
    rank: int = 0  # the pipeline rank that ran it (0 in one process)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class MemorySample:
    """The bytes the engine holds on one tier from ``time`` (seconds from the start of the run)
    until the next sample of that tier and rank."""

    time: float
    tier: str  # "gpu", "cpu", "disk"
    bytes: int
    rank: int = 0


@dataclass(frozen=True)
class Stall:
    """A gap on a compute lane: the compute ``before`` (None: the run's start) ended, ``after``
    began ``waited`` seconds later. ``cause`` is the transfer ``after`` waited on that finished
    last (its end is where the critical path ran), or None when none was still running: the
    host itself (the schedule, Python, a synchronisation) held compute up."""

    after: Event
    waited: float
    cause: Event | None
    before: Event | None = None

    @property
    def cause_kind(self) -> str:
        return self.cause.kind if self.cause is not None else "host"

    @property
    def transfer_s(self) -> float:
        """The part of the wait until the transfer waited on ended; the rest is the host's."""
        if self.cause is None:
            return 0.0
        return max(0.0, min(self.cause.end, self.after.start) - (self.after.start - self.waited))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


class Timeline:
    """An ordered list of :class:`Event` with views for analysis and plotting."""

    def __init__(self, events: list[Event] | None = None, memory: list[MemorySample] | None = None) -> None:
        self.events: list[Event] = sorted(events or [], key=lambda e: (e.start, e.lane))
        self.memory: list[MemorySample] = sorted(memory or [], key=lambda m: m.time)  # empty: not recorded
        self._stalls: list[Stall] | None = None  # every stall, found once (the events do not change)
        self._several_ranks = len({e.rank for e in self.events}) > 1  # asked once per event by plots

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ranks(self) -> list[int]:
        return sorted({e.rank for e in self.events})

    def lane_of(self, e: Event) -> str:
        """The row an event is drawn on: its lane, per rank when the run had several."""
        return f"rank {e.rank} {e.lane}" if self._several_ranks else e.lane

    @property
    def lanes(self) -> list[str]:
        """Rows, a group per rank, compute first in each."""
        rows = {(e.rank, e.lane != COMPUTE_LANE, e.lane): self.lane_of(e) for e in self.events}
        return [rows[key] for key in sorted(rows)]

    def to_pandas(self):
        """One row per event: lane, kind, token, stage, batch, start, end, duration, bytes."""
        import pandas as pd

        df = pd.DataFrame(
            [asdict(e) for e in self.events],
            columns=["lane", "kind", "token", "stage", "batch", "start", "end", "bytes", "stage_name", "rank"],
        )
        df["duration"] = df["end"] - df["start"]
        return df

    def summary(self) -> dict[str, float]:
        """Wall time, busy time per lane, how much I/O hid under compute, achieved bandwidth.

        ``io_hidden_fraction``: share of the time some transfer was running that compute was
        running too. ``compute_idle_fraction``: share of the wall time compute waited;
        ``waited_s[kind]``: how long it waited on transfers of each kind until they ended, and
        ``waited_s[host]`` the rest of its waits (no transfer running: the host held it up).
        """
        if not self.events:
            return {}
        wall = max(e.end for e in self.events) - min(e.start for e in self.events)
        compute = _union([(e.start, e.end) for e in self.events if e.lane == COMPUTE_LANE])
        io = _union([(e.start, e.end) for e in self.events if e.lane != COMPUTE_LANE])
        hidden = _intersection(compute, io)
        out = {
            "wall_s": wall,
            "compute_busy_s": _length(compute),
            "io_busy_s": _length(io),
            "io_hidden_s": hidden,
            "io_exposed_s": _length(io) - hidden,
            "io_hidden_fraction": hidden / _length(io) if io else 0.0,
            "compute_idle_fraction": 1 - _length(compute) / wall if wall > 0 else 0.0,
        }
        for lane in self.lanes:
            evs = [e for e in self.events if self.lane_of(e) == lane]
            busy = _length(_union([(e.start, e.end) for e in evs]))
            out[f"busy_s[{lane}]"] = busy
            moved = sum(e.bytes for e in evs)
            if moved and lane != COMPUTE_LANE:
                out[f"bytes[{lane}]"] = float(moved)
                out[f"GB_per_s[{lane}]"] = moved / busy / 1e9 if busy > 0 else float("nan")
        # Work inside computes ((de)compression, sparse attention's reads): its time, per kind.
        for kind in sorted({e.kind for e in self.events if e.lane == COMPUTE_LANE and e.kind != "compute"}):
            evs = [e for e in self.events if e.kind == kind]
            out[f"busy_s[{kind}]"] = _length(_union([(e.start, e.end) for e in evs]))
            if any(e.bytes for e in evs):
                out[f"bytes[{kind}]"] = float(sum(e.bytes for e in evs))
        # What compute waited on, summed over its stalls: the critical path's transfers, or the host.
        for stall in self.stalls():
            for key, seconds in ((stall.cause_kind, stall.transfer_s), ("host", stall.waited - stall.transfer_s)):
                if seconds > 0:
                    out[f"waited_s[{key}]"] = out.get(f"waited_s[{key}]", 0.0) + seconds
        return out

    def stalls(self, min_wait: float = 0.0) -> list[Stall]:
        """Every gap longer than ``min_wait`` seconds before a compute, per rank, longest first,
        with the transfer that compute waited on (see :class:`Stall`)."""
        if self._stalls is None:
            self._stalls = self._find_stalls()
        return [s for s in self._stalls if s.waited > min_wait]

    def _find_stalls(self) -> list[Stall]:
        loads: dict[int, list[Event]] = {}
        for load, compute in self._waits():
            loads.setdefault(id(compute), []).append(load)
        out = []
        for rank in self.ranks:
            mine = [e for e in self.events if e.rank == rank]
            free, before = min(e.start for e in mine), None  # compute is free from the run's start
            for e in mine:
                if e.kind != "compute":
                    continue
                if e.start > free:
                    running = [x for x in loads.get(id(e), []) if x.end > free]
                    cause = max(running, key=lambda x: x.end) if running else None
                    out.append(Stall(e, e.start - free, cause, before))
                free, before = max(free, e.end), e
        return sorted(out, key=lambda s: -s.waited)

    def stall_table(self, top: int | None = 10):
        """The longest stalls as a table: where compute waited, how long, and on what."""
        import pandas as pd

        rows = [
            {
                "rank": s.after.rank,
                "token": s.after.token,
                "stage": s.after.stage,
                "stage_name": s.after.stage_name,
                "batch": s.after.batch,
                "at_s": s.after.start - s.waited,
                "waited_ms": s.waited * 1e3,
                "waited_on": s.cause_kind,
                "host_ms": (s.waited - s.transfer_s) * 1e3,
                "bytes": s.cause.bytes if s.cause is not None else 0,
            }
            for s in self.stalls()[:top]
        ]
        return pd.DataFrame(rows, columns=["rank", "token", "stage", "stage_name", "batch", "at_s", "waited_ms",
                                           "waited_on", "host_ms", "bytes"])  # fmt: skip

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the events and memory samples as JSON (atomically: a crash never leaves half a file)."""
        data = {"version": 2, "events": [asdict(e) for e in self.events], "memory": [asdict(m) for m in self.memory]}
        atomic_write(Path(path), json.dumps(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Timeline:
        """Read a file :meth:`save` wrote (version 1, before memory samples, too)."""
        data = json.loads(Path(path).read_text())
        return cls([Event(**e) for e in data["events"]], [MemorySample(**m) for m in data.get("memory", [])])

    def to_chrome_trace(self, path: str | os.PathLike, *, run: str | None = None) -> None:
        """A Chrome trace (open in https://ui.perfetto.dev or chrome://tracing): a process per
        rank, a row per lane, an arrow from each load to the compute that waited on it, and a
        counter track of the engine's bytes per tier.

        Process ids are this run's own (from ``run``, a label shown in the process names, or
        else from the events), so traces of two runs merge in Perfetto side by side."""
        key = run if run is not None else json.dumps([asdict(e) for e in self.events[:64]])
        base = zlib.crc32(key.encode()) % 100_000 * 100
        label = f" ({run})" if run else ""
        tids = {(e.rank, e.lane): i for i, e in enumerate({(e.rank, e.lane): e for e in self.events}.values())}
        trace = [
            {"name": "process_name", "ph": "M", "pid": base + r, "args": {"name": f"rank {r}{label}"}}
            for r in self.ranks
        ]
        trace += [
            {"name": "thread_name", "ph": "M", "pid": base + rank, "tid": tid, "args": {"name": lane}}
            for (rank, lane), tid in tids.items()
        ]
        for e in self.events:
            trace.append(
                {
                    "name": f"{e.kind} {e.stage_name}".strip(),
                    "cat": e.kind,
                    "ph": "X",
                    "pid": base + e.rank,
                    "tid": tids[(e.rank, e.lane)],
                    "ts": e.start * 1e6,
                    "dur": max(e.duration * 1e6, 0.001),
                    "args": {"token": e.token, "stage": e.stage, "batch": e.batch, "bytes": e.bytes},
                }
            )
        held: dict[int, dict[str, int]] = {}  # a counter track per rank: every tier's bytes at each change
        for m in self.memory:
            held.setdefault(m.rank, {})[m.tier] = m.bytes
            counter = {"name": "memory (bytes)", "ph": "C", "pid": base + m.rank, "ts": m.time * 1e6}
            trace.append({**counter, "args": dict(held[m.rank])})
        for n, (load, compute) in enumerate(self._waits()):
            ends = [(load, "s", load.end - 0.01 * load.duration), (compute, "f", compute.start)]
            for e, ph, at in ends:  # a flow binds to the slice around its time: inside each end
                flow = {"name": "waits on", "cat": "flow", "ph": ph, "id": n, "pid": base + e.rank, "ts": at * 1e6}
                trace.append({**flow, "tid": tids[(e.rank, e.lane)], **({"bp": "e"} if ph == "f" else {})})
        atomic_write(Path(path), json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}))

    def _waits(self) -> list[tuple[Event, Event]]:
        """(load, compute) pairs: each load or receive of a (token, stage, batch) and the compute of
        it on the same rank; a weight load serves every batch, and goes to the stage's first."""
        computes: dict[tuple, list[Event]] = {}
        for e in self.events:
            if e.kind == "compute":
                computes.setdefault((e.rank, e.token, e.stage), []).append(e)
        pairs = []
        for e in self.events:
            if e.kind not in WAITED_ON:
                continue
            mine = computes.get((e.rank, e.token, e.stage), [])
            if e.batch is not None:
                mine = [c for c in mine if c.batch == e.batch]
            if mine:
                pairs.append((e, min(mine, key=lambda c: c.start)))
        return pairs

    def _repr_html_(self) -> str:
        s = self.summary()
        rows = "".join(f"<tr><td>{k}</td><td>{v:.4g}</td></tr>" for k, v in s.items())
        return f"<b>Timeline</b>: {len(self)} events on {len(self.lanes)} lanes<table>{rows}</table>"
