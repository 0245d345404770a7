"""Hidden states between stages when the activations leave the compute device: one slot per
batch, on the cpu tier or in a preallocated file on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from flexlab.engine.placement import ALIGN
from flexlab.engine.tiers import BufferPool, DiskFiles, MemoryTracker, nbytes, preallocate


class ActStore:
    """Hidden states between stages, one slot per batch, on the cpu or disk tier.

    Disk slots are preallocated files of ``slot_bytes`` overwritten in place (a new file per
    store would leave open descriptors reading the old one).
    """

    def __init__(
        self, tier: str, device: torch.device, slot_bytes: int, act_dir: Path, files: DiskFiles, tracker: MemoryTracker
    ) -> None:
        self.tier, self.device, self.slot_bytes = tier, device, slot_bytes
        self.dir, self.files, self.tracker = act_dir, files, tracker
        self.slots: dict[int, tuple[torch.Tensor | Path, tuple[int, ...], torch.dtype]] = {}
        self.pool = BufferPool([slot_bytes + 2 * ALIGN] if tier == "disk" else [])

    def store(self, batch: int, h: torch.Tensor) -> int:
        """Keep ``h`` as batch ``batch``'s hidden state; returns the bytes written."""
        if batch not in self.slots:
            if self.tier == "disk":
                preallocate(self.dir / f"act_b{batch}.bin", self.slot_bytes)
            self.tracker.add(self.tier, "activations", self.slot_bytes)
        slot: torch.Tensor | Path
        if self.tier == "cpu":
            slot = h.to("cpu", copy=True)
        else:
            slot = self.dir / f"act_b{batch}.bin"
            self.files.write(slot, 0, h.to("cpu"))
        self.slots[batch] = (slot, tuple(h.shape), h.dtype)
        return nbytes(h)

    def load(self, batch: int) -> tuple[torch.Tensor, int]:
        data, shape, dtype = self.slots[batch]
        if isinstance(data, torch.Tensor):  # the cpu tier
            return data.to(self.device, non_blocking=True), nbytes(data)
        size = torch.Size(shape).numel() * dtype.itemsize
        buf = self.pool.acquire()
        try:
            out = torch.empty(shape, dtype=dtype, device=self.device)
            out.copy_(self.files.read(data, 0, size, buf).view(dtype).view(shape))
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            return out, size
        finally:
            self.pool.release(buf)

    def close(self) -> None:
        for data, _, _ in self.slots.values():
            self.tracker.sub(self.tier, "activations", self.slot_bytes)
            if isinstance(data, Path):
                self.files.remove(data)
        self.slots.clear()
