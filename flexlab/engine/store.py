"""Where each weight, KV-cache row and activation lives, and how it reaches the compute device.

Each store places its data on the tiers once, then moves it on request. Moves return the bytes
that crossed each link, which the executor records in the timeline. Layouts:

* weights: per stage, tensors assigned to tiers by cumulative size (FlexGen's midpoint rule);
  disk-resident weights are read straight from the checkpoint's safetensors file when it has
  one, else converted once into the offload directory;
* KV cache: token-major ``[sequences, capacity, heads, head_dim]`` per layer, batch and tier,
  so one sequence's prefix is one contiguous read and a decode step appends one row;
* activations: a batch's hidden state, whole, on its one tier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flexlab.engine.schedule import Stage
from flexlab.engine.tiers import ALIGN, BufferPool, DiskFiles, MemoryTracker, nbytes, preallocate, write_packed
from flexlab.models.family import WeightSpec, part_weights


@dataclass
class DiskTensor:
    """A tensor's bytes in a file."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class LoadedWeights:
    """A stage's weights on the compute device; ``buffer`` is the read buffer they may live in."""

    tensors: dict[str, torch.Tensor]
    buffer: torch.Tensor | None
    copied_bytes: int


@dataclass
class LoadedCache:
    """A batch's cache prefix: rows on the device, and (with CPU attention) rows left on the host.

    ``host_span`` is ``(first row, count)`` of the host rows in the batch; the device rows are the
    others, in batch order.
    """

    k: torch.Tensor | None
    v: torch.Tensor | None
    host_k: torch.Tensor | None = None
    host_v: torch.Tensor | None = None
    host_span: tuple[int, int] | None = None


def _region(nbytes: int) -> int:
    """Room for an O_DIRECT read of ``nbytes`` at any offset, rounded to keep the next one aligned."""
    return -(-(nbytes + 2 * ALIGN) // ALIGN) * ALIGN


@dataclass
class PlacedWeight:
    spec: WeightSpec
    tier: str
    data: torch.Tensor | DiskTensor


def split_by_share(sizes: list[int], gpu_percent: float, cpu_percent: float) -> list[str]:
    """Tier of each item: an item goes where the midpoint of its cumulative byte range falls."""
    total = sum(sizes) or 1
    tiers, start = [], 0
    for size in sizes:
        mid = 100 * (start + size / 2) / total
        tiers.append("gpu" if mid < gpu_percent else "cpu" if mid < gpu_percent + cpu_percent else "disk")
        start += size
    return tiers


class WeightStore:
    """Every weight placed on its tier; ``load(stage)`` brings a stage's weights to the device."""

    def __init__(self, model, stages: list[Stage], policy, device: torch.device, dtype: torch.dtype,
                 weight_dir: Path, files: DiskFiles, tracker: MemoryTracker, progress=None) -> None:
        self.device, self.dtype, self.files, self.tracker = device, dtype, files, tracker
        specs = model.family.weight_specs(model.config)
        pin = policy.pin_weight and device.type == "cuda"
        self.placed: dict[str, PlacedWeight] = {}
        self.stage_weights: list[list[PlacedWeight]] = []
        self.stage_files: list[tuple[Path, int] | None] = []  # a stage's own packed file and its size
        for stage in stages:
            mine = [s for part in stage.parts for s in part_weights(specs, part, stage.layer)]
            new = [s for s in mine if s.name not in self.placed]  # a tied weight is placed once
            tiers = split_by_share([s.numel for s in new], policy.w_gpu_percent, policy.w_cpu_percent)
            to_pack = []
            for spec, tier in zip(new, tiers):
                if tier == "disk" and model.weights.location(spec.name) is None:
                    to_pack.append(spec)
                else:
                    self.placed[spec.name] = self._place(model, spec, tier, pin)
                if progress is not None:
                    progress.update(1)
            self.stage_files.append(self._pack(model, to_pack, weight_dir / f"stage{stage.index}.bin")
                                    if to_pack else None)
            self.stage_weights.append([self.placed[s.name] for s in mine])
        self.resident = [all(w.tier == "gpu" for w in ws) for ws in self.stage_weights]
        # Disk reads land in one of two stage-sized aligned buffers (the stage computing and the one
        # prefetched). On a CPU the weights are used in place there: no copy after the read.
        self.stage_disk_bytes = [(own[1] if own else 0) + sum(_region(w.data.nbytes) for w in ws if w.tier == "disk"
                                                              and not (own and w.data.path == own[0]))
                                 for ws, own in zip(self.stage_weights, self.stage_files)]
        largest = max(self.stage_disk_bytes, default=0)
        self.pool = BufferPool(largest, 2, pin) if largest else None
        self.buffer_bytes = 2 * largest
        self.buffer_tier = "cpu" if device.type == "cuda" else "gpu"
        tracker.add(self.buffer_tier, "weight read buffers", self.buffer_bytes)

    def _pack(self, model, specs: list[WeightSpec], path: Path) -> tuple[Path, int]:
        """Convert weights with no readable place on disk (random, .bin) into one file per stage,
        so that the stage comes back in one read."""
        packed = write_packed(path, (model.weights.get(s.name, self.dtype) for s in specs))
        for spec, (offset, t) in zip(specs, packed):
            self.placed[spec.name] = PlacedWeight(spec, "disk", DiskTensor(path, offset, nbytes(t), t.dtype,
                                                                           tuple(t.shape)))
            self.tracker.add("disk", "weights", nbytes(t))
        return path, path.stat().st_size

    def _place(self, model, spec: WeightSpec, tier: str, pin: bool) -> PlacedWeight:
        if tier == "disk":  # read straight from the checkpoint: no second copy on disk
            loc = model.weights.location(spec.name)
            data = DiskTensor(loc.path, loc.offset, loc.nbytes, loc.dtype, loc.shape)
            self.tracker.add("disk", "weights", data.nbytes)
            return PlacedWeight(spec, tier, data)
        device = self.device if tier == "gpu" else torch.device("cpu")
        tensor = model.weights.get(spec.name, self.dtype, device)
        if tier == "cpu" and pin:
            tensor = tensor.pin_memory()
        self.tracker.add(tier, "weights", nbytes(tensor))
        return PlacedWeight(spec, tier, tensor)

    def load(self, stage: int) -> tuple[LoadedWeights, dict[str, int]]:
        """The stage's weights on the compute device, and the bytes moved from each tier."""
        out, moved, copied = {}, {"cpu": 0, "disk": 0}, 0
        buf = self.pool.acquire() if self.stage_disk_bytes[stage] else None
        own, pos = self.stage_files[stage], 0
        if own is not None:  # the stage's packed file: one read, each tensor lands at its file offset
            self.files.read(own[0], 0, own[1], buf)
            pos = own[1]
        for w in self.stage_weights[stage]:
            if w.tier == "gpu":
                t = w.data
            elif w.tier == "cpu":
                t = w.data.to(self.device, non_blocking=True)  # same RAM on a CPU: no copy
                if w.data.device != self.device:
                    moved["cpu"] += nbytes(w.data)
                    copied += nbytes(t)
            else:
                if own is not None and w.data.path == own[0]:
                    t = self._as_weight(buf[w.data.offset:w.data.offset + w.data.nbytes], w.data)
                else:
                    size = _region(w.data.nbytes)
                    t = self._as_weight(self.files.read(w.data.path, w.data.offset, w.data.nbytes,
                                                        buf[pos:pos + size]), w.data)
                    pos += size
                moved["disk"] += w.data.nbytes
                if t.data_ptr() < buf.data_ptr() or t.data_ptr() >= buf.data_ptr() + buf.numel():
                    copied += nbytes(t)  # converted or moved to the GPU: a fresh tensor
            out[w.spec.short] = t
        if buf is not None and self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the copies have left the buffer: reuse it
            self.pool.release(buf)
            buf = None
        self.tracker.add("gpu", "working weights", copied)
        return LoadedWeights(out, buf, copied), moved

    def release(self, loaded: LoadedWeights) -> None:
        """Give a loaded stage's buffer back (after its last compute)."""
        self.tracker.sub("gpu", "working weights", loaded.copied_bytes)
        if loaded.buffer is not None:
            self.pool.release(loaded.buffer)

    def _as_weight(self, raw: torch.Tensor, d: DiskTensor) -> torch.Tensor:
        """Bytes read from disk as the weight tensor on the compute device (a view where possible)."""
        if raw.data_ptr() % d.dtype.itemsize:  # a checkpoint tensor at an odd offset: copy to align it
            raw = raw.clone()
        view = raw.view(d.dtype).view(d.shape)
        if view.device == self.device and view.dtype == self.dtype:
            return view
        return view.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def tier_bytes(self) -> dict[str, int]:
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for w in self.placed.values():
            out[w.tier] += w.data.nbytes if isinstance(w.data, DiskTensor) else nbytes(w.data)
        return out


class CacheStore:
    """The KV cache of one block: whole sequences per tier, token-major, preallocated."""

    def __init__(self, config, policy, batch_sizes: list[int], capacity: int, device: torch.device,
                 dtype: torch.dtype, cache_dir: Path, files: DiskFiles, tracker: MemoryTracker) -> None:
        self.device, self.dtype, self.files, self.tracker = device, dtype, files, tracker
        self.capacity = capacity
        self.row_shape = (config.num_heads, config.head_dim)
        self.row_bytes = config.hidden_size * torch.empty((), dtype=dtype).element_size()
        n = sum(batch_sizes)
        seq_tiers = split_by_share([1] * n, policy.cache_gpu_percent, policy.cache_cpu_percent)
        # per batch: [(tier, first row in batch, count)] in row order
        self.layout: list[list[tuple[str, int, int]]] = []
        start = 0
        for size in batch_sizes:
            tiers = seq_tiers[start:start + size]
            self.layout.append([(t, tiers.index(t), tiers.count(t)) for t in ("gpu", "cpu", "disk") if t in tiers])
            start += size
        self.slots: dict[tuple[int, int, str, str], torch.Tensor | Path] = {}
        self.cache_dir, self.config = cache_dir, config
        self.resident = [all(t == "gpu" for t, _, _ in parts) for parts in self.layout]
        self.pool: BufferPool | None = None

    def _slot(self, layer: int, batch: int, tier: str, kv: str, count: int):
        key = (layer, batch, tier, kv)
        if key not in self.slots:
            size = count * self.capacity * self.row_bytes
            if tier == "disk":
                path = self.cache_dir / f"kv_l{layer}_b{batch}_{kv}.bin"
                preallocate(path, size)
                self.slots[key] = path
                if self.pool is None:
                    self.pool = BufferPool(size + ALIGN, 2)
            else:
                device = self.device if tier == "gpu" else torch.device("cpu")
                pin = tier == "cpu" and self.device.type == "cuda"  # pinned: host<->GPU copies at full speed
                self.slots[key] = torch.empty((count, self.capacity, *self.row_shape), dtype=self.dtype,
                                              device=device, pin_memory=pin)
            self.tracker.add(tier, "kv cache", size)
        return self.slots[key]

    def store(self, layer: int, batch: int, k: torch.Tensor, v: torch.Tensor, start: int) -> dict[str, int]:
        """Write rows ``start..start+s`` of ``k``, ``v`` (``[b, heads, s, d]``); bytes moved per tier."""
        moved = {"cpu": 0, "disk": 0}
        s = k.shape[2]
        for kv, x in (("k", k), ("v", v)):
            rows = x.transpose(1, 2)  # [b, s, heads, d]: token-major, as stored
            for tier, first, count in self.layout[batch]:
                part = rows[first:first + count]
                slot = self._slot(layer, batch, tier, kv, count)
                if tier == "disk":
                    host = part.to("cpu").contiguous()
                    for i in range(count):
                        self.files.write(slot, (i * self.capacity + start) * self.row_bytes, host[i])
                    moved["disk"] += nbytes(part)
                else:
                    slot[:, start:start + s].copy_(part, non_blocking=True)
                    if slot.device != part.device:
                        moved[tier] += nbytes(part)
        return moved

    def load(self, layer: int, batch: int, length: int, cpu_rows_stay: bool = False) -> tuple[LoadedCache, dict]:
        """Rows ``0..length`` of a batch's cache, each ``[b, heads, length, d]``, and bytes moved.

        With ``cpu_rows_stay`` the cpu tier's sequences are left in host memory (for attention
        on the CPU) and only the other tiers' rows are brought to the device.
        """
        moved = {"cpu": 0, "disk": 0}
        device_parts: dict[str, list] = {"k": [], "v": []}
        host: dict[str, torch.Tensor] = {}
        host_span = None
        for kv in ("k", "v"):
            for tier, first, count in self.layout[batch]:
                slot = self._slot(layer, batch, tier, kv, count)
                if tier == "gpu":
                    device_parts[kv].append(slot[:, :length])
                elif tier == "cpu" and cpu_rows_stay:
                    host[kv], host_span = slot[:, :length].transpose(1, 2), (first, count)
                elif tier == "cpu":
                    device_parts[kv].append(slot[:, :length].to(self.device, non_blocking=True))
                    if slot.device != self.device:  # a CPU-only machine has no cpu->gpu link
                        moved["cpu"] += count * length * self.row_bytes
                else:
                    device_parts[kv].append(self._read_disk(slot, count, length))
                    moved["disk"] += count * length * self.row_bytes

        def join(parts: list) -> torch.Tensor | None:
            if not parts:
                return None
            rows = parts[0] if len(parts) == 1 else torch.cat(parts)  # [b, length, heads, d]
            return rows.transpose(1, 2)

        loaded = LoadedCache(join(device_parts["k"]), join(device_parts["v"]), host.get("k"), host.get("v"), host_span)
        return loaded, moved

    def _read_disk(self, path: Path, count: int, length: int) -> torch.Tensor:
        out = torch.empty((count, length, *self.row_shape), dtype=self.dtype, device=self.device)
        buf = self.pool.acquire()
        try:
            for i in range(count):
                raw = self.files.read(path, i * self.capacity * self.row_bytes, length * self.row_bytes, buf)
                out[i].copy_(raw.view(self.dtype).view(length, *self.row_shape))
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
        finally:
            self.pool.release(buf)
        return out

    def close(self) -> None:
        for (layer, batch, tier, kv), slot in self.slots.items():
            count = next(c for t, _, c in self.layout[batch] if t == tier)
            self.tracker.sub(tier, "kv cache", count * self.capacity * self.row_bytes)
            if isinstance(slot, Path):
                slot.unlink(missing_ok=True)
        self.slots.clear()


class ActStore:
    """Hidden states between stages, one slot per batch, on the cpu or disk tier.

    Disk slots are preallocated files of ``slot_bytes`` overwritten in place (a new file per
    store would leave open descriptors reading the old one).
    """

    def __init__(self, tier: str, device: torch.device, slot_bytes: int, act_dir: Path, files: DiskFiles,
                 tracker: MemoryTracker) -> None:
        self.tier, self.device, self.slot_bytes = tier, device, slot_bytes
        self.dir, self.files, self.tracker = act_dir, files, tracker
        self.slots: dict[int, tuple[torch.Tensor | Path, tuple[int, ...], torch.dtype]] = {}
        self.pool = BufferPool(slot_bytes + 2 * ALIGN, 1) if tier == "disk" else None

    def store(self, batch: int, h: torch.Tensor) -> int:
        """Keep ``h`` as batch ``batch``'s hidden state; returns the bytes written."""
        if batch not in self.slots:
            if self.tier == "disk":
                preallocate(self.dir / f"act_b{batch}.bin", self.slot_bytes)
            self.tracker.add(self.tier, "activations", self.slot_bytes)
        if self.tier == "cpu":
            data = h.to("cpu", copy=True)
        else:
            data = self.dir / f"act_b{batch}.bin"
            self.files.write(data, 0, h.to("cpu"))
        self.slots[batch] = (data, tuple(h.shape), h.dtype)
        return nbytes(h)

    def load(self, batch: int) -> tuple[torch.Tensor, int]:
        data, shape, dtype = self.slots[batch]
        if self.tier == "cpu":
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
        for batch, (data, _, _) in self.slots.items():
            self.tracker.sub(self.tier, "activations", self.slot_bytes)
            if isinstance(data, Path):
                data.unlink(missing_ok=True)
        self.slots.clear()
