"""Transparent huge pages for torch's large CPU tensors, in the processes flexlab starts.

With ``THP_MEM_ALLOC_ENABLE=1`` in its environment, torch aligns every CPU tensor of 2 MiB or more
to 2 MiB and asks the kernel for huge pages for it (``madvise``), so a fresh tensor faults its
memory in 2 MiB at a time instead of 4 KiB. torch reads the variable once, at its first
allocation, so only a process that has not imported torch yet can set it for itself: the command
line does (:func:`enable_before_torch`), local pipeline ranks get it from their parent
(:func:`for_children`), and a notebook's first cell can call :func:`enable_before_torch`.

Measured (``experiments/allocator_modes.py``, opt-125m on two cores, each run a fresh process):
9–19% faster runs with glibc's default allocator; the lean allocator (a fixed mmap threshold:
fresh pages for every large tensor) took 1.14–1.31x the default allocator's time without huge
pages, and with them 0.87–1.03x of that (0.96–1.23x of the default allocator with them). The lean
allocator's peaks moved by at most 4 MiB; the default allocator's stayed as variable as without.
A kernel with THP ``never`` ignores the request. A value the user set (``0`` included) is kept.

    >>> import os
    >>> users = os.environ.pop(VARIABLE, None)
    >>> with for_children():  # processes started in here ask for huge pages
    ...     os.environ[VARIABLE]
    '1'
    >>> VARIABLE in os.environ  # and this process's environment is as it was
    False
    >>> if users is not None:
    ...     os.environ[VARIABLE] = users
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def enable_before_torch() -> bool:
    """Ask for huge pages in this process (and the ones it starts) if torch has not allocated yet
    and the user has not chosen; returns whether the request was made."""
    if "torch" in sys.modules or VARIABLE in os.environ:
        return False
    os.environ[VARIABLE] = "1"
    return True


@contextlib.contextmanager
def for_children() -> Iterator[None]:
    """Within the block, processes started (``multiprocessing``'s spawn copies ``os.environ`` at
    ``start()``) ask for huge pages, unless the user chose otherwise; this process's own
    environment is as before afterwards (its torch, loaded already, is not affected)."""
    if VARIABLE in os.environ:
        yield
        return
    os.environ[VARIABLE] = "1"
    try:
        yield
    finally:
        os.environ.pop(VARIABLE, None)
