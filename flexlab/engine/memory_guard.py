"""The engine's guard on host memory: a run's predicted peak against what the process may use.

Before the engine allocates anything (its weights; then each run's shapes) it predicts the whole
process's peak (:class:`~flexlab.engine.footprint.Footprint`) and refuses a run that would break
the limit, with one line saying by how much and what to move. Where only glibc's retained heap
would break it, the guard first makes the allocator lean (for good: the setting is process-wide).

Pipeline ranks on one machine share its memory: alone, each would see the whole machine as its
own. So each rank predicts its own peak, the ranks of a machine split what it may use in
proportion to their peaks (:func:`host_share`; a rank's ``Peers.memory_share`` gathers the
numbers), and each is held to its share.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flexlab.engine.footprint import LEAN_ABOVE, LEAN_SLACK, Footprint, lean_allocator
from flexlab.errors import MemoryLimitError

GiB = 2**-30


def host_share(rows: Sequence[Sequence[float]], rank: int, limit: float | None = None) -> tuple[float | None, str]:
    """Rank ``rank``'s share of its machine's memory, and (where ranks share the machine) the words
    that say so, to lead a refusal. ``rows``: per rank, its machine's id, its cgroup's limit (or
    -1), the machine's available memory as it saw it (or -1), its resident bytes and its
    predicted peak. What the machine may use is ``limit`` when given (for all its ranks), else the
    cgroup's limit, else the least available memory any of its ranks saw plus what they hold
    (None where that cannot be read)."""
    mine = rows[rank]
    same = [r for r, row in enumerate(rows) if row[0] == mine[0]]
    pool: float | None = limit
    if pool is None and mine[1] >= 0:
        pool = mine[1]
    elif pool is None and all(rows[r][2] >= 0 for r in same):
        pool = min(rows[r][2] for r in same) + sum(rows[r][3] for r in same)
    if pool is None or len(same) == 1:
        return pool, ""
    needs = sum(rows[r][4] for r in same)
    share = pool * mine[4] / needs if needs > 0 else pool / len(same)
    others = ", ".join(str(r) for r in same if r != rank)
    return share, (
        f"pipeline rank {rank} shares this machine's {pool * GiB:.2f} GiB with rank(s) {others}; together they "
        f"need {needs * GiB:.2f} GiB, and each is held to its share in proportion to its own peak (a plan from "
        "`flexlab search --pipeline N --one-machine` fits the stages of one machine together): "
    )


@dataclass
class MemoryGuard:
    """``limit``: bytes the process may use (``math.inf``: no check); for a pipeline rank with
    ``share`` (its ``Peers.memory_share``), what its machine may use (None: found out there)."""

    limit: float | None
    share: Callable[[float, float | None], tuple[float | None, str]] | None = None
    lean: bool = False  # this guard made the allocator lean

    @property
    def active(self) -> bool:
        """Whether :meth:`check` has anything to do (a pipeline rank's always does: its peers wait)."""
        return self.share is not None or (self.limit is not None and not math.isinf(self.limit))

    def check(self, fp: Footprint) -> None:
        """Raise :class:`~flexlab.errors.MemoryLimitError` if ``fp``'s host peak breaks the limit
        (or this rank's share of it); make the allocator lean where only glibc's slack would.
        A pipeline rank's check is a collective: every rank makes it at the same point."""
        limit, whose = (self.limit, "") if self.share is None else self.share(fp.host, self.limit)
        if limit is None or math.isinf(limit):
            return
        # glibc's default heap keeps freed blocks for reuse, beyond what the slack model says on
        # long runs (see LEAN_ABOVE): where that could reach the limit, blocks go back at once.
        # A run refused even so is refused first: the lean allocator is for good, and a refusal
        # must leave the process (a notebook's kernel, a test session) as it was.
        if not self.lean and fp.host > LEAN_ABOVE * limit:
            refusal = fp.with_slack(LEAN_SLACK).over_limit(limit)
            if refusal is not None:
                raise MemoryLimitError(whose + refusal)
            self.lean = lean_allocator()
            if self.lean:
                warnings.warn(
                    f"memory is tight ({fp.host * GiB:.2f} GiB predicted, limit {limit * GiB:.2f} GiB): flexlab "
                    "now returns freed memory to the system at once (glibc's M_MMAP_THRESHOLD fixed at 1 MiB; "
                    "runs ~10-30% slower on a CPU)",
                    stacklevel=4,
                )
        problem = (fp.with_slack(LEAN_SLACK) if self.lean else fp).over_limit(limit)
        if problem is not None:
            raise MemoryLimitError(whose + problem)
