"""A pipeline rank's hand-offs to its neighbours, on ``torch.distributed`` point-to-point messages.

The ranks form a ring: rank r receives from r-1 and sends to r+1, and the last rank sends the
head's next tokens back to rank 0. Each message is a small header (what follows, its dtype and
shape) and then the tensor, so a receiver needs to know nothing in advance; gloo and NCCL keep
the messages between two ranks in order, which is what pairs each ``send`` step of one rank with
the matching ``recv`` step of the next.

Stopping early (every sequence of a block has met its stop rule) is a message too: the last rank
sends *stop* in place of the next tokens, and each rank, when it receives it, ends its run and
passes it on (see :class:`flexlab.engine.context.Peers`), so that every message sent is received
and no rank waits for one that will not come.
"""

from __future__ import annotations

import socket
import zlib

import torch
import torch.distributed as dist

from flexlab.devices import cgroup_memory_limit, machine_available, resident_bytes
from flexlab.engine.memory_guard import host_share
from flexlab.engine.tiers import nbytes

_DATA, _STOP = 0, 1
_DTYPES = [torch.int64, torch.float32, torch.bfloat16, torch.float16]
_HEADER = 2 + 4  # kind, dtype, then up to four dimensions (unused ones are -1)


class Channel:
    """The :class:`~flexlab.engine.context.Peers` of ``rank`` in a ring of ``world`` ranks."""

    def __init__(self, rank: int, world: int, wire: torch.device) -> None:
        if world < 2:
            raise ValueError("a channel needs two or more ranks")
        self.rank, self.world, self.wire = rank, world, wire
        self.prev, self.next = (rank - 1) % world, (rank + 1) % world
        self.is_last = rank == world - 1
        self.reset()

    def reset(self) -> None:
        self.stopped = False  # stop received: no more messages will come from prev this block
        self.sent_stop = False  # stop sent: next expects nothing more this block

    def send(self, x: torch.Tensor | None) -> int:
        """Send ``x`` to the next rank (None: stop); returns the bytes sent."""
        if self.sent_stop:  # the next rank has finished: what the head computes meanwhile is dropped
            return 0
        if x is None:
            dist.send(self._header(_STOP), self.next)
            self.sent_stop = True
            return 0
        x = x.to(self.wire).contiguous()
        dist.send(self._header(_DATA, _DTYPES.index(x.dtype), *x.shape), self.next)
        dist.send(x, self.next)
        return nbytes(x)

    def recv(self, device: torch.device) -> tuple[torch.Tensor | None, int]:
        """The previous rank's next message on ``device`` and its bytes; ``(None, 0)`` once stopped."""
        if self.stopped:
            return None, 0
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.wire)
        dist.recv(header, self.prev)
        kind, dtype, *shape = header.tolist()
        if kind == _STOP:
            self.stopped = True
            return None, 0
        x = torch.empty([d for d in shape if d >= 0], dtype=_DTYPES[dtype], device=self.wire)
        dist.recv(x, self.prev)
        return x.to(device, non_blocking=True), nbytes(x)

    def memory_share(self, need: float, limit: float | None) -> tuple[float | None, str]:
        """This rank's share of its machine's memory (see :func:`~flexlab.engine.memory_guard.host_share`):
        every rank sends every other what it sees of its machine and its predicted peak ``need``.
        Sent as one float64 tensor per rank, so NCCL carries it as gloo does (a host name's CRC
        and byte counts below 2**53 are exact in float64)."""
        cgroup, free = cgroup_memory_limit(), machine_available()
        mine = [
            float(zlib.crc32(socket.gethostname().encode())),
            -1.0 if cgroup is None else float(cgroup),
            -1.0 if free is None else float(free),
            float(resident_bytes() or 0),
            float(need),
        ]
        every = [torch.empty(len(mine), dtype=torch.float64, device=self.wire) for _ in range(self.world)]
        dist.all_gather(every, torch.tensor(mine, dtype=torch.float64, device=self.wire))
        return host_share([row.tolist() for row in every], self.rank, limit)

    def _header(self, kind: int, dtype: int = 0, *shape: int) -> torch.Tensor:
        if len(shape) > _HEADER - 2:
            raise ValueError(f"a hand-off of {len(shape)} dimensions; at most {_HEADER - 2}")
        dims = [*shape, *[-1] * (_HEADER - 2 - len(shape))]
        return torch.tensor([kind, dtype, *dims], dtype=torch.int64, device=self.wire)
