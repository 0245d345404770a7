"""Pipeline ranks on one machine share its memory: each is held to a share of it."""

from __future__ import annotations

import math

import pytest

from flexlab.engine.footprint import Footprint
from flexlab.engine.memory_guard import MemoryGuard, host_share
from flexlab.errors import MemoryLimitError

GiB = 2**30


def row(host, need, *, cgroup=-1.0, free=4 * GiB, resident=0.5 * GiB):
    return [float(host), float(cgroup), float(free), float(resident), float(need)]


def test_ranks_of_one_machine_split_what_it_has_in_proportion_to_their_peaks():
    rows = [row(7, 1 * GiB, free=4 * GiB), row(7, 3 * GiB, free=3 * GiB)]  # the later saw less free
    pool = 3 * GiB + 2 * 0.5 * GiB  # the least free memory seen, plus what both ranks hold
    shares = [host_share(rows, r) for r in range(2)]
    assert [s for s, _ in shares] == pytest.approx([pool / 4, 3 * pool / 4])
    assert "pipeline rank 1 shares this machine's 4.00 GiB with rank(s) 0; together they need 4.00 GiB" in shares[1][1]


def test_a_rank_alone_on_its_machine_has_all_of_it_and_a_given_limit_or_cgroup_is_the_pool():
    rows = [row(1, 1 * GiB), row(2, 1 * GiB, free=2 * GiB), row(2, 1 * GiB, free=2 * GiB)]
    assert host_share(rows, 0) == (4.5 * GiB, "")  # as available_memory() says for one process
    assert host_share(rows, 1)[0] == pytest.approx((2 + 1) * GiB / 2)
    assert host_share(rows, 2, limit=8 * GiB)[0] == pytest.approx(4 * GiB)
    cgroup = [row(3, 1 * GiB, cgroup=6 * GiB), row(3, 2 * GiB, cgroup=6 * GiB)]
    assert host_share(cgroup, 1)[0] == pytest.approx(4 * GiB)
    assert host_share([row(1, GiB, free=-1), row(1, GiB)], 1) == (None, "")  # cannot be read: no check


def _footprint(host_bytes: float) -> Footprint:
    tracked = {"gpu": host_bytes - 0.25 * GiB, "cpu": 0.0, "disk": 0.0}
    return Footprint(tracked, 0.0, 0.0, 0.25 * GiB, on_cuda=False, weights=dict(tracked))


def test_the_guard_refuses_a_rank_over_its_share_with_the_share_named(monkeypatch):
    monkeypatch.setattr("flexlab.engine.memory_guard.lean_allocator", lambda: pytest.fail("made lean"))
    seen = []

    def share(need, limit):  # two ranks needing 2 GiB each on a 3 GiB machine
        seen.append((need, limit))
        return 1.5 * GiB, "pipeline rank 1 shares this machine's 3.00 GiB with rank(s) 0; "

    guard = MemoryGuard(None, share)
    assert guard.active
    with pytest.raises(MemoryLimitError, match=r"^pipeline rank 1 shares this machine's 3.00 GiB .*over the limit"):
        guard.check(_footprint(2 * GiB))
    assert seen == [(2 * GiB, None)]
    MemoryGuard(None, lambda need, limit: (math.inf, "")).check(_footprint(100 * GiB))  # no check: passes
    assert not MemoryGuard(math.inf).active and MemoryGuard(GiB).active
