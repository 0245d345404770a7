"""Fault injection: an Engine survives its own errors and interrupts, and leaves no memory behind.

Every injected fault is followed by a second ``generate`` on the same Engine, run with a timeout
so that a hang fails the test instead of stalling CI, and compared with the first run's tokens.
"""

from __future__ import annotations

import errno
import gc
import threading
import weakref
from concurrent.futures import Future

import pytest
import torch

import flexlab
from flexlab import Policy
from flexlab.engine.block import BlockRun

PROMPTS = [[2, 5, 6, 9], [2, 7], [2, 11, 12], [2, 13, 14, 15, 16], [2, 17]]
NEW = 5

POLICIES = {
    "weights on disk": Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2),
    "everything on disk": Policy.from_percent([0, 0, 0, 0, 0, 0], gpu_batch_size=2, num_gpu_batches=2),
    "split, overlap off": Policy.from_percent([20, 30, 30, 30, 0, 100], gpu_batch_size=3, overlap=False),
}


def within(seconds: float, fn):
    """``fn()``'s value, or a test failure if it has not returned after ``seconds`` (a hang)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"hung: no return after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def model():
    return flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def expected(model):
    return model.generate(PROMPTS, max_new_tokens=NEW).token_ids


def fail_on_call(monkeypatch, method: str, n: int, error: BaseException):
    """Make ``BlockRun.<method>`` raise ``error`` on its ``n``-th call (then behave again)."""
    original = getattr(BlockRun, method)
    calls = {"n": 0}

    def patched(self, *args):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return original(self, *args)

    monkeypatch.setattr(BlockRun, method, patched)
    return calls


def assert_released(engine) -> None:
    """Between runs: every read buffer free, nothing counted as working copies, no step kept."""
    assert engine.weights.pool.free == engine.weights.pool.count
    assert engine.tracker.current.get(("gpu", "working weights"), 0) == 0
    assert not engine.executor.futures and not engine.executor.pending_events
    left = {p.relative_to(engine.offload_dir).parts[0] for p in engine.offload_dir.rglob("*") if p.is_file()}
    assert left <= {"weights", ".flexlab-owner"}  # no cache or activation file outlives its run


FAULTS = [  # (handler, on which call, what it raises)
    ("compute", 1, RuntimeError("maths failed")),
    ("compute", 9, RuntimeError("maths failed")),
    ("compute", 23, KeyboardInterrupt()),
    ("load_weight", 2, OSError(errno.EIO, "I/O error")),
    ("load_weight", 7, KeyboardInterrupt()),  # on a lane thread: surfaces at the compute that waits for it
    ("store_cache", 4, OSError(errno.ENOSPC, "No space left on device")),
    ("load_cache", 3, RuntimeError("cache read failed")),
    ("release_weight", 2, RuntimeError("release failed")),
]


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("method, n, error", FAULTS, ids=[f"{m}#{n}-{type(e).__name__}" for m, n, e in FAULTS])
def test_a_failed_run_leaves_the_engine_as_it_was(
    model, expected, monkeypatch, tmp_path, policy_name, method, n, error
):
    policy = POLICIES[policy_name]
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        calls = fail_on_call(monkeypatch, method, n, error)
        with pytest.raises(type(error)):
            within(60, lambda: engine.generate(PROMPTS, max_new_tokens=NEW))
        assert calls["n"] >= n
        monkeypatch.undo()
        assert_released(engine)
        again = within(60, lambda: engine.generate(PROMPTS, max_new_tokens=NEW))
        assert again.token_ids == expected
        assert_released(engine)
    assert list(tmp_path.iterdir()) == []


def test_interrupts_in_every_block_and_token(model, expected, monkeypatch, tmp_path):
    """Ctrl-C at each of the first 40 computes in turn, each followed by a clean run."""
    policy = POLICIES["everything on disk"]
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        for n in range(1, 41, 3):
            fail_on_call(monkeypatch, "compute", n, KeyboardInterrupt())
            with pytest.raises(KeyboardInterrupt):
                within(60, lambda: engine.generate(PROMPTS, max_new_tokens=NEW))
            monkeypatch.undo()
            assert_released(engine)
        assert within(60, lambda: engine.generate(PROMPTS, max_new_tokens=NEW)).token_ids == expected
    assert list(tmp_path.iterdir()) == []


def test_score_after_a_failed_score(model, monkeypatch, tmp_path):
    policy = POLICIES["everything on disk"]
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        good = engine.score(PROMPTS, teacher_forced=True)
        fail_on_call(monkeypatch, "compute", 5, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            within(60, lambda: engine.score(PROMPTS, teacher_forced=True))
        monkeypatch.undo()
        again = within(60, lambda: engine.score(PROMPTS, teacher_forced=True))
        assert all(torch.equal(a, b) for a, b in zip(good, again))


def test_stopping_early_gives_back_the_prefetched_weights(model, tmp_path):
    """A block that ends at its stop tokens has prefetched the next stage's weights: they are
    released, so the next run does not wait for their buffer."""
    policy = POLICIES["weights on disk"]
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        first = engine.generate(PROMPTS, max_new_tokens=NEW).token_ids
        stops = [[row[1]] for row in first]  # every sequence stops at its second new token
        engine.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=stops)
        assert_released(engine)
        assert within(60, lambda: engine.generate(PROMPTS, max_new_tokens=NEW)).token_ids == first


def test_a_full_disk_mid_run_is_one_clear_error_and_the_engine_goes_on(model, expected, monkeypatch, tmp_path):
    import flexlab.engine.tiers as tiers

    real = tiers.os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    policy = POLICIES["everything on disk"]
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        monkeypatch.setattr(tiers.os, "pwrite", pwrite)
        with pytest.raises(flexlab.OffloadError, match=r"the disk holding '.*/(cache|act)' is full: writing \d+.* to "):
            within(60, lambda: engine.generate(PROMPTS, max_new_tokens=NEW))
        monkeypatch.undo()
        assert within(60, lambda: engine.generate(PROMPTS, max_new_tokens=NEW)).token_ids == expected
    assert list(tmp_path.iterdir()) == []


def test_a_run_interrupted_while_it_cleans_up_asks_to_recreate_the_engine(model, monkeypatch, tmp_path):
    from flexlab.engine.executor import Executor

    policy = POLICIES["weights on disk"]
    with flexlab.Engine(model, policy, offload_dir=tmp_path) as engine:
        fail_on_call(monkeypatch, "compute", 3, RuntimeError("first"))

        def abandon(self):  # a second Ctrl-C while waiting for the transfers to end
            self.futures[("load_weight", 99, 0, None)] = Future()  # a transfer still running
            raise KeyboardInterrupt

        monkeypatch.setattr(Executor, "_abandon", abandon)
        with pytest.raises(KeyboardInterrupt):
            engine.generate(PROMPTS, max_new_tokens=NEW)
        monkeypatch.undo()
        with pytest.raises(flexlab.FlexlabError, match="close it and create a new Engine"):
            engine.generate(PROMPTS, max_new_tokens=NEW)
    assert list(tmp_path.iterdir()) == []


# ---- memory held by a run -----------------------------------------------------------------------
def track_hidden_states(monkeypatch):
    """Weak references to every hidden state a compute returns, and the most alive at once."""
    refs: list[weakref.ref] = []
    most = {"alive": 0}
    original = BlockRun.compute

    def compute(self, step, inputs):
        out = original(self, step, inputs)
        if "h" in out:  # the head returns next tokens
            refs.append(weakref.ref(out["h"]))
        most["alive"] = max(most["alive"], sum(r() is not None for r in refs))
        return out

    monkeypatch.setattr(BlockRun, "compute", compute)
    return refs, most


@pytest.mark.parametrize(
    "policy",
    [
        Policy.from_percent([100, 0, 100, 0, 0, 100], gpu_batch_size=2, num_gpu_batches=2),  # activations on cpu
        Policy.from_percent([100, 0, 100, 0, 0, 0], gpu_batch_size=2, num_gpu_batches=2),  # on disk
        Policy.from_percent([100, 0, 100, 0, 100, 0], gpu_batch_size=2, num_gpu_batches=2),  # in memory
    ],
    ids=["act cpu", "act disk", "act gpu"],
)
def test_hidden_states_are_freed_as_the_run_goes_and_none_survive_it(model, monkeypatch, policy):
    with flexlab.Engine(model, policy) as engine:
        peaks = []
        for new in (2, 8):
            refs, most = track_hidden_states(monkeypatch)
            result = engine.generate(PROMPTS, max_new_tokens=new)
            monkeypatch.undo()
            gc.collect()
            assert not [r for r in refs if r() is not None]  # nothing of the run survives but its result
            assert result.token_ids
            peaks.append(most["alive"])
        # Alive at once: a few per batch, however many tokens (it grew with every step before). How
        # many exactly depends on when a lane's store lets go of its input, so the two runs' counts
        # may differ by one; the 8-token run has 4x the steps, and a leak would show as a multiple.
        assert max(peaks) <= 3 * policy.num_gpu_batches
