"""The executor's handling of a transfer no compute waits on: a failed send ends the run at the
next step, not at its end (a pipeline's next rank would wait on that message meanwhile)."""

from __future__ import annotations

import time

import pytest
import torch

from flexlab.engine.executor import Executor
from flexlab.engine.schedule import Step


def test_a_failed_send_ends_the_run_at_once():
    def send(step, computed):
        raise ConnectionError("the next rank is gone")

    steps = [Step("compute", 0, 0, 0), Step("send", 0, 0, 0, deps=(("compute", 0, 0, 0),))]
    steps += [Step("compute", t, 0, 0) for t in range(1, 60)]  # 3 s of computes after it
    executor = Executor(torch.device("cpu"), overlap=True)
    handlers = {"compute": lambda step, inputs: time.sleep(0.05), "send": send}
    start = time.perf_counter()
    try:
        with pytest.raises(ConnectionError, match="the next rank is gone"):
            executor.run(steps, handlers)
    finally:
        executor.close()
    assert time.perf_counter() - start < 1.0
