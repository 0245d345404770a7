"""The KV cache of one block: whole sequences per tier, in preallocated row slots.

Per layer, batch, tier and key/value there is one slot. In memory it is ``[sequences, capacity
rows, *row]``. On disk it is ``[capacity rows, sequences, *row]``: row ``r`` of every sequence
side by side, so the first ``n`` rows of the whole batch are one contiguous read and a decode
step's new row of every sequence is one contiguous write (a disk pays per request; a layout by
sequence needed a request per sequence, or read unused rows). What a row holds (a token in the
compute dtype, or a quantized chunk as bytes) is the :class:`~flexlab.engine.kvcodec.KVCodec`'s
business; the store only moves rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexlab.engine.kvcodec import KVCodec
from flexlab.engine.placement import cache_layout, cache_read_buffers, near_tiers, split_by_share
from flexlab.engine.tiers import BufferPool, DiskFiles, MemoryTracker, nbytes, preallocate, staging_tier

KV = ("k", "v")


@dataclass
class LoadedCache:
    """A batch's stored rows: those brought to the device, and (with CPU attention) those left
    in host memory. ``host_span`` is ``(first sequence, count)`` of the host rows in the batch;
    the device rows are the others, in batch order. Rows are ``[sequences, rows, *row]``."""

    k: torch.Tensor | None
    v: torch.Tensor | None
    host_k: torch.Tensor | None = None
    host_v: torch.Tensor | None = None
    host_span: tuple[int, int] | None = None
    buffers: list[torch.Tensor] = field(default_factory=list)  # read buffers the rows still point into

    def host(self) -> tuple[int, int, torch.Tensor, torch.Tensor] | None:
        """``(first, count, host keys, host values)`` when rows stayed on the host, else None."""
        if self.host_span is None:
            return None
        assert self.host_k is not None and self.host_v is not None, "a host span without host rows"
        return (*self.host_span, self.host_k, self.host_v)


class CacheStore:
    """Rows of keys and values for every layer of one block, each sequence on one tier."""

    def __init__(
        self,
        policy,
        batch_sizes: list[int],
        capacity: int,
        codecs: dict[str, KVCodec],
        device: torch.device,
        cache_dir: Path,
        files: DiskFiles,
        tracker: MemoryTracker,
    ) -> None:
        self.device, self.files, self.tracker, self.codecs = device, files, tracker, codecs
        self.cache_dir = cache_dir
        self.capacity = {kv: -(-capacity // c.chunk) for kv, c in codecs.items()}  # in rows
        seq_tiers = split_by_share([1] * sum(batch_sizes), policy.cache_gpu_percent, policy.cache_cpu_percent)
        self.layout = cache_layout(seq_tiers, batch_sizes)  # per batch: (tier, first sequence, count)
        near = near_tiers(device.type == "cuda")
        self.resident = [all(t in near for t, _, _ in parts) for parts in self.layout]
        self.slots: dict[tuple[int, int, str, str], torch.Tensor | Path] = {}
        self.slot_bytes: dict[tuple[int, int, str, str], int] = {}
        per_sequence = max(self.capacity[kv] * c.row_bytes for kv, c in codecs.items())
        most = max((c for parts in self.layout for t, _, c in parts if t == "disk"), default=0)
        self.read_ahead, count, size = cache_read_buffers(device.type == "cpu", most, per_sequence)
        self.pool = BufferPool([size] * count)  # count 0: nothing on disk
        self.buffer_tier, self.buffer_bytes = staging_tier(device), count * size
        tracker.add(self.buffer_tier, "cache read buffers", self.buffer_bytes)

    def _slot(self, layer: int, batch: int, tier: str, kv: str, count: int):
        key = (layer, batch, tier, kv)
        if key not in self.slots:
            codec = self.codecs[kv]
            size = count * self.capacity[kv] * codec.row_bytes
            if tier == "disk":
                path = self.cache_dir / f"kv_l{layer}_b{batch}_{kv}.bin"
                preallocate(path, size)
                self.slots[key] = path
            else:
                device = self.device if tier == "gpu" else torch.device("cpu")
                pin = tier == "cpu" and self.device.type == "cuda"  # pinned: host<->GPU copies at full speed
                self.slots[key] = torch.empty(
                    (count, self.capacity[kv], *codec.row_shape), dtype=codec.row_dtype, device=device, pin_memory=pin
                )
            self.slot_bytes[key] = size
            self.tracker.add(tier, "kv cache", size)
        return self.slots[key]

    def store(self, layer: int, batch: int, kv: str, rows: torch.Tensor, start: int) -> dict[str, int]:
        """Write ``rows`` (``[b, n, *row]``) at rows ``start..start+n``; bytes moved per tier."""
        moved = {"cpu": 0, "disk": 0}
        n, row_bytes = rows.shape[1], self.codecs[kv].row_bytes
        parts = self.layout[batch]
        for tier, first, count in parts:
            part = rows if len(parts) == 1 else rows[first : first + count]
            slot = self._slot(layer, batch, tier, kv, count)
            if tier == "disk":  # rows start..start+n of every sequence: one stretch of the file
                self.files.write(slot, start * count * row_bytes, part.to("cpu").transpose(0, 1))
                moved["disk"] += nbytes(part)
            else:
                slot[:, start : start + n].copy_(part, non_blocking=True)
                if slot.device != part.device:
                    moved[tier] += nbytes(part)
        return moved

    def load(
        self, layer: int, batch: int, rows: dict[str, int], cpu_rows_stay: bool = False
    ) -> tuple[LoadedCache, dict[str, int]]:
        """The first ``rows[kv]`` rows of a batch's keys and values, and the bytes moved per tier.

        With ``cpu_rows_stay`` the cpu tier's sequences are left in host memory (for attention
        on the CPU) and only the other tiers' rows are brought to the device.
        """
        moved = {"cpu": 0, "disk": 0}
        device_parts: dict[str, list] = {"k": [], "v": []}
        host: dict[str, torch.Tensor] = {}
        host_span = None
        buffers: list[torch.Tensor] = []
        for kv in KV:
            n, row_bytes = rows[kv], self.codecs[kv].row_bytes
            for tier, first, count in self.layout[batch]:
                slot = self._slot(layer, batch, tier, kv, count)
                if tier == "gpu":
                    device_parts[kv].append(slot[:, :n])
                elif tier == "cpu" and cpu_rows_stay:
                    host[kv], host_span = slot[:, :n], (first, count)
                elif tier == "cpu":
                    device_parts[kv].append(_prefix_to(slot[:, :n], self.device))
                    if slot.device != self.device:  # a CPU-only machine has no cpu->gpu link
                        moved["cpu"] += count * n * row_bytes
                else:
                    device_parts[kv].append(self._read_disk(slot, kv, count, n, buffers))
                    moved["disk"] += count * n * row_bytes

        def join(parts: list) -> torch.Tensor | None:
            return None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)

        loaded = LoadedCache(
            join(device_parts["k"]), join(device_parts["v"]), host.get("k"), host.get("v"), host_span, buffers
        )
        if any(len(parts) > 1 for parts in device_parts.values()):
            self.release(loaded)  # the join copied the rows out: the buffers are free now
        return loaded, moved

    def release(self, loaded: LoadedCache) -> None:
        """Hand back the read buffers a load's rows point into (after the last compute reading them)."""
        for buf in loaded.buffers:
            self.pool.release(buf)
        loaded.buffers = []

    def gather(
        self, layer: int, batch: int, kv: str, positions: torch.Tensor, device: torch.device | None = None
    ) -> tuple[torch.Tensor, int]:
        """The rows at ``positions`` (``[batch, width]``: per sequence of the batch, -1 where it
        wants none), as ``[batch, width, *row]`` on ``device`` (default: the compute device), and
        the bytes read from other tiers. Where a sequence wants none the row is some row of its
        own (or zero, if its tier was not touched): weigh it zero. In memory each tier's rows are
        one indexed copy; on disk each run of consecutive positions that some sequence of the tier
        wants is one read of that position's rows of all of them. A tier none of whose sequences
        wants a row is not touched."""
        codec, device = self.codecs[kv], device or self.device
        out = torch.zeros((*positions.shape, *codec.row_shape), dtype=codec.row_dtype, device=device)
        moved = 0
        for tier, first, count in self.layout[batch]:
            mine = positions[first : first + count]
            wanted = mine >= 0
            if not wanted.any():
                continue
            slot = self._slot(layer, batch, tier, kv, count)
            seqs = torch.arange(count, device=mine.device)[:, None]
            # index_select on a flattened view: several times faster on a CPU than advanced indexing
            if tier != "disk":
                at = (seqs * slot.shape[1] + mine.clamp(min=0)).flatten().to(slot.device)
                rows = slot.view(-1, *codec.row_shape).index_select(0, at).view(*mine.shape, *codec.row_shape)
                out[first : first + count] = rows.to(device, non_blocking=True)
                moved += 0 if slot.device == device else rows.numel() * rows.element_size()
                continue
            mine, wanted = mine.cpu(), wanted.cpu()
            used = mine[wanted].unique()  # ascending: the rows read, of every sequence of the tier
            lines = torch.empty((len(used), count, *codec.row_shape), dtype=codec.row_dtype)
            buf, at = self.pool.acquire(), 0
            try:
                for start, n in _runs(used.tolist()):
                    raw = self.files.read(slot, start * count * codec.row_bytes, n * count * codec.row_bytes, buf)
                    lines[at : at + n] = raw.view(codec.row_dtype).view(n, count, *codec.row_shape)
                    at += n
            finally:
                self.pool.release(buf)
            line_of = torch.zeros(int(used[-1]) + 1, dtype=torch.long)
            line_of[used] = torch.arange(len(used))
            at = (line_of[mine.clamp(min=0)] * count + seqs.cpu()).flatten()
            rows = lines.view(-1, *codec.row_shape).index_select(0, at).view(*mine.shape, *codec.row_shape)
            out[first : first + count] = rows.to(device, non_blocking=True)
            moved += lines.numel() * lines.element_size()
        return out, moved

    def _read_disk(self, path: Path, kv: str, count: int, n: int, held: list[torch.Tensor]) -> torch.Tensor:
        """Rows ``0..n`` of each of the ``count`` sequences in a disk slot (one read), as
        ``[count, n, *row]`` on the device. On a CPU that is a view of the read buffer, which is
        appended to ``held`` (for :meth:`release`); on a GPU, a copy."""
        codec = self.codecs[kv]
        row = codec.row_bytes
        if n == 0:  # e.g. per-channel keys before their first whole chunk
            return torch.empty((count, 0, *codec.row_shape), dtype=codec.row_dtype, device=self.device)
        buf, kept = self.pool.acquire(), False
        try:
            raw = self.files.read(path, 0, n * count * row, buf)
            rows = raw.view(codec.row_dtype).view(n, count, *codec.row_shape).transpose(0, 1)
            if self.device.type == "cpu":
                held.append(buf)
                kept = True
                return rows
            out = rows.to(self.device, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            return out
        finally:
            if not kept:
                self.pool.release(buf)

    def close(self) -> None:
        self.tracker.sub(self.buffer_tier, "cache read buffers", self.buffer_bytes)
        self.buffer_bytes = 0
        for key, slot in self.slots.items():
            self.tracker.sub(key[2], "kv cache", self.slot_bytes[key])
            if isinstance(slot, Path):
                self.files.remove(slot)
        self.slots.clear()


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Ascending positions as runs of consecutive ones: ``(first position, length)``."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [(first, length) for first, length in runs]


def _prefix_to(prefix: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A slot's first rows (``[sequences, n, *row]``) on ``device``. Unless ``n`` is the slot's
    capacity the prefix has gaps between sequences, and PyTorch copies such a tensor to a GPU by
    first packing it into pageable host memory (a host copy, then a synchronous transfer: the
    engine moved its cache at about 5 GB/s so on an H200, whose link gives 54 pinned): so each
    sequence's rows, which are contiguous, are copied on their own, straight from the pinned slot."""
    if prefix.device == device:  # a CPU-only machine: the cpu tier is the compute device's memory
        return prefix
    if prefix.is_contiguous():
        return prefix.to(device, non_blocking=True)
    out = torch.empty(prefix.shape, dtype=prefix.dtype, device=device)
    for i in range(prefix.shape[0]):
        out[i].copy_(prefix[i], non_blocking=True)
    return out
