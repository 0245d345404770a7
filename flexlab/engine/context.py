"""What a block of sequences sees of the engine that runs it: a narrow context, and, in a pipeline,
the rank's neighbours."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from flexlab.engine.executor import Executor
from flexlab.engine.policy import Policy
from flexlab.engine.schedule import Stage
from flexlab.engine.store import WeightStore
from flexlab.engine.tiers import DiskFiles, MemoryTracker
from flexlab.models.config import ModelConfig
from flexlab.models.family import ModelFamily


class Peers(Protocol):
    """A pipeline rank's neighbours in the ring of ranks (see :mod:`flexlab.distributed`).

    Messages go in order, one per ``send`` step, to the next rank; ``send(None)`` tells it that
    the pipeline stops (the last rank decides when every sequence has stopped; each other rank
    passes the word on), and ``recv`` then returns ``(None, 0)``.
    """

    is_last: bool

    def reset(self) -> None: ...  # a new block: nobody has stopped

    def recv(self, device: torch.device) -> tuple[torch.Tensor | None, int]: ...

    def send(self, x: torch.Tensor | None) -> int: ...

    # this rank's share of its machine's memory, given its predicted peak and the machine's limit
    # (None: found out); a collective (see flexlab.engine.memory_guard)
    def memory_share(self, need: float, limit: float | None) -> tuple[float | None, str]: ...


@dataclass(frozen=True)
class BlockContext:
    """What a block needs of the engine that runs it (and nothing more)."""

    family: ModelFamily
    config: ModelConfig
    policy: Policy
    stages: list[Stage]
    device: torch.device
    dtype: torch.dtype
    weights: WeightStore
    executor: Executor
    tracker: MemoryTracker
    files: DiskFiles
    subdir: Callable[[str], Path]  # a folder of the engine's offload directory
    check_space: Callable[[float, str], None]  # raises OffloadError if the disk lacks the bytes
    peers: Peers | None = None  # a pipeline rank's neighbours; ``stages`` are then its share
    groups: int = 1  # groups of batches that take turns (see block_schedule)
    lean: bool = False  # hand freed heap memory back after every token (see footprint.lean_allocator)
