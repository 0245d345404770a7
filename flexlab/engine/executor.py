"""Runs schedule steps: computes on the calling thread, transfers on lane threads, all timed.

Each transfer kind has a lane: one worker thread (and, on CUDA, its own stream), so transfers of
one kind keep their order while different kinds and the compute run at the same time. A step
waits only for its ``deps``. With ``overlap=False`` every transfer is waited for as soon as it is
issued, so nothing runs beside the compute.

Timing: on a CPU, wall-clock marks; on CUDA, CUDA events recorded on the issuing stream and
resolved after the run, so measuring does not serialise the overlap it measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from flexlab.engine.schedule import Key, Step
from flexlab.timeline import COMPUTE_LANE, Event

LANES = {
    "load_weight": "load weight",
    "load_cache": "load cache",
    "load_act": "load act",
    "store_cache": "store cache",
    "store_act": "store act",
    "recv": "recv",  # from the previous pipeline rank
    "send": "send",  # to the next pipeline rank
}
OUTPUTS = ("store_cache", "store_act", "send")  # steps that take a compute's value away
# Hand-offs to other processes wait on them, and touch no buffer of the engine (a recv makes its own
# tensor, a send holds its own reference): after an error they are not waited for, since the
# neighbour they wait on may be waiting on this process; its exit is what ends them.
DETACHED = ("recv", "send")


class Clock:
    """Marks on the current stream (CUDA) or wall-clock marks (CPU), resolved to seconds later."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base_wall = time.perf_counter()
        if self.cuda:
            self.base = torch.cuda.Event(enable_timing=True)
            self.base.record()

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def resolve(self, mark) -> float:
        if self.cuda:
            return self.base.elapsed_time(mark) / 1000.0
        return mark - self.base_wall


def _never(step: Step) -> bool:
    return False


class _Done:
    """A value already at hand, answering as a finished Future does (a real Future costs a lock
    and a condition per step, which on a small model is much of the step)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def result(self, timeout: float | None = None):
        return self.value

    def done(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def exception(self, timeout: float | None = None) -> None:
        return None


class Executor:
    """Executes steps with the given handlers and records one event per step that did work.

    Handlers: ``load_*(step) -> (value, bytes)``, ``compute(step, inputs) -> value`` where
    ``inputs`` maps dependency keys to values, ``store_*(step, computed) -> bytes`` (``recv`` is
    a load, ``send`` a store); optional
    ``release_weight(key, value)`` / ``release_cache(key, value)`` once the last compute that
    reads a load is done (its buffers may be reused), and ``inline(step) -> bool`` for
    transfers that move nothing and so run on the calling thread.
    """

    def __init__(self, device: torch.device, overlap: bool, describe: Callable[[int], str] = str) -> None:
        self.device, self.overlap, self.describe = device, overlap, describe
        self.handlers: dict[str, Callable] = {}
        self.releasers: dict[str, Callable] = {}
        self.lanes = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"flexlab-{lane}") for lane in set(LANES.values())}
        self.streams = {lane: torch.cuda.Stream(device) for lane in self.lanes} if device.type == "cuda" else {}
        self.futures: dict[Key, Future | _Done] = {}
        self.failed: BaseException | None = None  # a hand-off's error (nothing waits on a send's future)
        self.pending_events: list[tuple] = []
        self.clock = Clock(device)

    def run(
        self,
        steps: Iterable[Step],
        handlers: dict[str, Callable],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Issue every step in order; stop issuing once ``should_stop()`` (checked after computes).

        However the run ends (done, stopped early, an error, Ctrl-C), nothing of it outlives the
        call: every transfer has finished, every load still held (prefetched for a compute that
        never ran, or taken by a failed run) is released, and no step's value is kept.
        """
        self.handlers = handlers
        # the release handler of each load kind that has one (looked up per released key otherwise)
        self.releasers = {
            kind: handlers["release_" + kind.removeprefix("load_")]
            for kind in LANES
            if kind.startswith("load_") and "release_" + kind.removeprefix("load_") in handlers
        }
        self.futures.clear()
        self.failed = None
        try:
            with torch.inference_mode():  # no autograd bookkeeping per op (thread-local: lanes too)
                self._issue_all(steps, should_stop)
            self.drain()
        except BaseException:  # an error or Ctrl-C: no transfer may outlive the data it touches
            self._abandon()
            self._release_held(ignore_errors=True)  # the first error is the one to report
            self.handlers, self.releasers = {}, {}
            raise
        self._release_held()
        self.handlers, self.releasers = {}, {}

    def _abandon(self) -> None:
        """Cancel transfers not yet started and wait for the running ones (but hand-offs),
        ignoring their errors."""
        for f in self.futures.values():
            f.cancel()
        for key, f in self.futures.items():
            if not f.cancelled() and key[0] not in DETACHED:
                try:
                    f.result()
                except BaseException:
                    pass
        self.pending_events.clear()  # a failed run's events would be mixed into the next run's

    def _release_held(self, ignore_errors: bool = False) -> None:
        """Give back every load still held: its buffers would otherwise stay taken, and the next
        run's load would wait for one forever. Then drop every step's value."""
        for key, f in list(self.futures.items()):
            release = self.releasers.get(key[0])
            if release is not None and f.done() and not f.cancelled() and f.exception() is None:
                try:
                    release(key, f.result()[0])
                except Exception:
                    if not ignore_errors:
                        raise
            del self.futures[key]

    @property
    def settled(self) -> bool:
        """Whether no transfer of an earlier run can still be running (a run interrupted while it
        cleaned up after an error may have left some)."""
        return all(f.done() for f in self.futures.values())

    def _issue_all(self, steps: Iterable[Step], should_stop: Callable[[], bool]) -> None:
        for step in steps:
            if step.kind == "compute":
                self._compute(step)
                if should_stop():
                    break
            else:
                self._issue(step)
            if self.failed is not None:  # now, not at the end of the run, while the next rank waits for it
                raise self.failed

    def _note_failure(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is not None and self.failed is None:
            self.failed = future.exception()

    def _issue(self, step: Step) -> None:
        lane = LANES[step.kind]
        handler = self.handlers[step.kind]
        deps = [self.futures[d] for d in step.deps]
        for d, f in zip(step.deps, deps):
            if d[0] in OUTPUTS and f.done():  # this load is a store's only reader: drop the finished
                del self.futures[d]  # one now, or every store of the run would be kept until its end
        if step.kind in OUTPUTS:
            computed = deps[0].result()  # the compute ran on this thread: its value is ready
            for key in step.releases:  # this store is its last reader: let it go once stored
                self.futures.pop(key, None)
            work = lambda: (None, handler(step, computed))  # noqa: E731
        else:

            def work():
                for d in deps:  # e.g. a cache load waits for the store of the previous token
                    d.result()
                return handler(step)

        if self.handlers.get("inline", _never)(step):
            # A transfer that moves nothing (its data already on the compute device) runs right here,
            # on the compute stream, in the run's inference mode: a thread hand-off and a stream sync
            # would cost more than it does (and on a small model, so would anything more than the call).
            start = self.clock.mark()
            value, moved = work()
            if moved:
                self.pending_events.append((lane, step, start, self.clock.mark(), moved, step.kind))
            self.futures[step.key] = _Done((value, None))
            return
        stream = self.streams.get(lane)
        if stream is not None and step.kind in OUTPUTS:
            stream.wait_stream(torch.cuda.current_stream())  # don't copy before it is computed

        def task():
            # inference mode is per thread: a lane thread must turn it on
            with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                start = self.clock.mark()
                value, moved = work()
                end = self.clock.mark()
                ready = None
                if stream is not None:
                    ready = torch.cuda.Event()
                    ready.record()
                    if step.kind in OUTPUTS:
                        # A later load waits on this task's future: make "done" mean done on the device.
                        stream.synchronize()
            if moved:
                self.pending_events.append((lane, step, start, end, moved, step.kind))
            return value, ready

        future = self.lanes[lane].submit(task)
        self.futures[step.key] = future
        if step.kind == "send":
            future.add_done_callback(self._note_failure)
        if not self.overlap:
            future.result()

    def _compute(self, step: Step) -> None:
        inputs = {}
        for d in step.deps:
            value = self.futures[d].result()
            if d[0] != "compute":
                value, ready = value
                if ready is not None:
                    torch.cuda.current_stream().wait_event(ready)  # device-side wait, host runs on
                    _record_stream(value, torch.cuda.current_stream())
            inputs[d] = value
        start = self.clock.mark()
        value = self.handlers["compute"](step, inputs)
        end = self.clock.mark()
        self.pending_events.append((COMPUTE_LANE, step, start, end, 0, step.kind))
        self.futures[step.key] = _Done(value)
        del value
        for key in step.releases:
            released = self.futures.pop(key, None)
            release = self.releasers.get(key[0])
            if released is not None and release is not None:
                release(key, released.result()[0])

    def timed(self, kind: str, step: Step, fn: Callable[[], Any], *, moves_bytes: bool = False) -> Any:
        """Run ``fn`` inside a compute and record it as its own event on the compute lane: the
        (de)compression a compute does, or a read it must wait for (sparse attention's value
        rows). With ``moves_bytes``, ``fn`` returns ``(value, bytes moved)``."""
        start = self.clock.mark()
        value, moved = fn() if moves_bytes else (fn(), 0)
        self.pending_events.append((COMPUTE_LANE, step, start, self.clock.mark(), moved, kind))
        return value

    def ahead(self, lane: str, kind: str, step: Step, fn: Callable[[], tuple[Any, int]]) -> Future:
        """Run ``fn`` (returning ``(value, bytes moved)``) on ``lane``'s thread, behind what the
        lane has queued, while the compute of ``step`` goes on, recorded as an event ``kind`` of
        that lane: a read a compute asks for ahead of its own use (a streamed head's next slice
        of rows, on a CPU). Without overlap the compute runs it itself, an event of its lane."""
        if not self.overlap:
            done: Future = Future()
            done.set_result(self.timed(kind, step, fn, moves_bytes=True))
            return done

        def task():
            with torch.inference_mode():
                start = self.clock.mark()
                value, moved = fn()
                self.pending_events.append((lane, step, start, self.clock.mark(), moved, kind))
                return value

        return self.lanes[lane].submit(task)

    def restart_clock(self) -> None:
        """Make the next events' times count from now."""
        self.clock = Clock(self.device)

    def drain(self) -> None:
        """Wait for every issued transfer (stores still running after the last compute)."""
        for f in list(self.futures.values()):
            f.result()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def events(self) -> list[Event]:
        """Resolve the recorded marks into timeline events (after :meth:`drain`)."""
        out = [
            Event(
                lane,
                kind,
                step.token,
                step.stage,
                step.batch,
                self.clock.resolve(a),
                self.clock.resolve(b),
                int(moved),
                self.describe(step.stage),
            )
            for lane, step, a, b, moved, kind in self.pending_events
        ]
        self.pending_events.clear()
        return out

    def close(self) -> None:
        for lane, pool in self.lanes.items():
            pool.shutdown(wait=lane not in (LANES[k] for k in DETACHED), cancel_futures=True)


def _record_stream(value, stream) -> None:
    """Mark tensors made on a lane's stream as used by ``stream``, so the caching allocator does
    not hand their memory out again before the compute reading them has finished. Walks tensors
    inside lists, dicts and dataclasses (LoadedWeights, LoadedCache, QTensor)."""
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            value.record_stream(stream)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _record_stream(v, stream)
    elif isinstance(value, dict):
        for v in value.values():
            _record_stream(v, stream)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _record_stream(getattr(value, f.name), stream)
