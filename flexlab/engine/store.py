"""Where each weight, KV-cache row and activation lives, and how it reaches the compute device.

Each store places its data on the tiers once, then moves it on request. Moves return the bytes
that crossed each link, which the executor records in the timeline. Layouts:

* weights: per stage, on the tiers :func:`~flexlab.engine.placement.place_weights` says;
  disk-resident weights are read straight from the checkpoint's safetensors file when it has
  one, else converted once into the offload directory;
* the embedding's rows of a token table left on disk or in host memory, read as it looks them up;
* KV cache: see ``cache.py``; activations: ``acts.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from flexlab.compress import QTensor, dequantize, quantize
from flexlab.engine.placed import LoadedWeights, PlacedWeight, conversion_bytes, dequantized_bytes, layout
from flexlab.engine.placement import (
    ROW_BUFFER,
    align_up,
    compresses,
    head_streams,
    looks_up_rows,
    near_tiers,
    packs_matrix,
    place_weights,
    read_region,
    reads_in_place,
    streams_rows,
    weight_read_buffers,
)
from flexlab.engine.schedule import Stage
from flexlab.engine.table_rows import HeadStream, table_rows
from flexlab.engine.tiers import (
    BufferPool,
    DiskFiles,
    MemoryTracker,
    nbytes,
    return_freed_memory,
    staging_tier,
    write_packed,
)
from flexlab.models.family import WeightSpec
from flexlab.models.layers import packed
from flexlab.models.loading import TensorLocation


class WeightStore:
    """Every weight placed on its tier; ``load(stage)`` brings a stage's weights to the device.

    With ``policy.compress_weight`` every matrix is quantized once, here, and stays compressed
    on its tier, on disk and in transit; it is dequantized by the compute that uses it.
    """

    def __init__(
        self,
        model,
        stages: list[Stage],
        policy,
        device: torch.device,
        dtype: torch.dtype,
        weight_dir: Path,
        files: DiskFiles,
        tracker: MemoryTracker,
        progress=None,
        pack: bool = False,
    ) -> None:
        self.device, self.dtype, self.files, self.tracker = device, dtype, files, tracker
        # hold the matrices kept in memory in oneDNN's layout (the engine decides: models.layers.packs)
        self.packs = pack
        self.quant = policy.compress_weight
        specs = model.family.weight_specs(model.config)
        pin = policy.pin_weight and device.type == "cuda"
        self.placed: dict[str, PlacedWeight] = {}
        # Per stage index (a pipeline rank places only its own stages):
        self.stage_weights: dict[int, list[PlacedWeight]] = {}
        self.stage_files: dict[int, tuple[Path, int] | None] = {}  # a stage's own packed file and its size
        # The embedding's token table where its load would move all of it for a few rows: the
        # compute reads just those (:meth:`rows`), so it is not part of the stage's load.
        self.looked_up: dict[int, PlacedWeight] = {}
        # Likewise the head's vocabulary matrix on disk (on a CPU): read a slice at a time.
        self.streamed: dict[int, PlacedWeight] = {}
        table, cfg = model.family.token_table, model.config
        stream = head_streams(device.type == "cuda", policy.num_gpu_batches, policy.block_size, cfg.hidden_size)

        def streams(spec: WeightSpec, stage: Stage, tier: str) -> bool:
            return streams_rows(spec, stage, tier, cfg.vocab_size, cfg.hidden_size, self.quant, stream)

        for stage, placement in zip(stages, place_weights(specs, stages, policy.w_gpu_percent, policy.w_cpu_percent)):
            to_pack = []
            for spec, tier in ((s, t) for s, t, first in placement if first):  # a tied weight is placed once
                loc = model.weights.location(spec.name)
                in_place = (
                    loc is not None
                    and not compresses(spec, self.quant)
                    and reads_in_place(loc.dtype, dtype, device.type == "cuda")
                )
                # (host memory is read in place on a CPU-only machine: nothing to save there)
                looked_up = looks_up_rows(spec, stage, tier, table, self.quant) and (
                    tier == "disk" or device.type == "cuda"
                )
                if tier == "disk" and not in_place and (looked_up or streams(spec, stage, tier)):
                    # a file of its own: the stage's load skips it
                    name = "token_table" if looked_up else "head"
                    self._pack(model, [spec], weight_dir / f"stage{stage.index}_{name}.bin")
                elif tier == "disk" and not in_place:
                    to_pack.append(spec)
                else:
                    self.placed[spec.name] = self._place(model, spec, tier, pin)
                if looked_up:
                    self.looked_up[stage.index] = self.placed[spec.name]
                if progress is not None:
                    progress.update(1)
            own = self._pack(model, to_pack, weight_dir / f"stage{stage.index}.bin") if to_pack else None
            # glibc keeps the blocks of the weights read and converted so far (how many depends on
            # which threads freed them): hand them back per stage, so placing peaks where the
            # footprint says, at the largest weight read
            return_freed_memory()
            self.stage_files[stage.index] = own
            self.stage_weights[stage.index] = [self.placed[s.name] for s, _, _ in placement]
            for spec, tier, _ in placement:  # a tied table is placed with the embedding, streamed by the head
                if streams(spec, stage, tier):
                    self.streamed[stage.index] = self.placed[spec.name]
        model.weights.release_pages()  # placed: the memory tiers hold copies, the disk tier reads files
        # Resident: read where it lies (on a CPU-only machine the cpu tier is the compute's RAM).
        near = near_tiers(device.type == "cuda")
        self.resident = {j: all(w.tier in near for w in ws) for j, ws in self.stage_weights.items()}
        self._in_place: dict[int, dict[str, torch.Tensor | QTensor]] = {}  # resident stages' weights, as loaded
        # What a load of each stage brings: all of its weights but a looked-up token table.
        apart = {j: (self.looked_up.get(j), self.streamed.get(j)) for j in self.stage_weights}
        self._loads = {j: [w for w in ws if all(w is not a for a in apart[j])] for j, ws in self.stage_weights.items()}
        # The disk weights read one by one (not in the stage's packed file), in load order.
        self._apart = {
            j: [p for w in self._loads[j] for p in w.locations if not (own and p.path == own[0])]
            for j, own in self.stage_files.items()
        }
        # Disk reads land in aligned read buffers, held by the stage computing and the one prefetched
        # (sized by weight_read_buffers). On a CPU the weights are used in place there: no copy after the read.
        self.stage_disk_bytes = {
            j: (own[1] if own else 0) + sum(read_region(p.nbytes) for p in self._apart[j])
            for j, own in self.stage_files.items()
        }
        self._views: dict[tuple[int, int], tuple[list[int], dict, dict[str, int]]] = {}  # see _load_into
        sizes = weight_read_buffers(list(self.stage_disk_bytes.values()))
        self.pool = BufferPool(sizes, pin)
        self.buffer_bytes = sum(sizes)
        self.buffer_tier = staging_tier(device)
        tracker.add(self.buffer_tier, "weight read buffers", self.buffer_bytes)
        # A CPU reads a checkpoint in a narrower dtype than the compute's in place and converts every
        # read (placement.reads_in_place): into buffers of its own, held like the read buffers. A fresh
        # tensor above glibc's mmap threshold (32 MiB) faults in every page on each use: float16 to
        # float32 ran at 0.8 G elements/s into fresh tensors, 8 into memory already touched.
        on_cpu = device.type == "cpu"  # (a GPU's copies to the device convert them)
        self.stage_converted_bytes = {j: conversion_bytes(ws, dtype) if on_cpu else 0 for j, ws in self._loads.items()}
        sizes = weight_read_buffers(list(self.stage_converted_bytes.values()))
        self.convert_pool = BufferPool(sizes)
        tracker.add("gpu", "weight conversion buffers", sum(sizes))
        # Compressed weights are dequantized by the stage's first compute and dropped after its last;
        # on a CPU into one buffer (one stage at a time), for the same reason (4-bit opt-1.3b's fc1
        # in float32: 43 ms into a fresh tensor, 25 into the same memory again). A GPU's caching
        # allocator reuses its blocks already.
        # (an embedding whose table is grouped along its rows dequantizes only the rows it looks up)
        rows_apart = self.quant is not None and self.quant.group_dim % 2 == 1
        self.stage_dequant_bytes = {
            s.index: dequantized_bytes(self._loads[s.index], dtype)
            if on_cpu and not ("embed" in s.parts and rows_apart)
            else 0
            for s in stages
        }
        most = max(self.stage_dequant_bytes.values(), default=0)
        self.dequant_pool = BufferPool([most] if most else [])
        tracker.add("gpu", "weight dequantization buffer", most)
        # Looked-up rows come off the disk through a small buffer of their own (the two above may
        # both be held, by the computing stage and the prefetched one).
        from_disk = any(w.tier == "disk" for w in self.looked_up.values())
        self.row_buffer = BufferPool([ROW_BUFFER]) if from_disk else None
        self.row_buffer_bytes = ROW_BUFFER if from_disk else 0
        tracker.add(self.buffer_tier, "row read buffer", self.row_buffer_bytes)
        # A streamed head's slices come through buffers of their own.
        self.streams = {j: HeadStream(w.locations[0], files, dtype) for j, w in self.streamed.items()}
        for head in self.streams.values():
            tracker.add(self.buffer_tier, "head read buffers", sum(b.numel() for b in head.buffers))
            tracker.add("gpu", "head conversion buffers", sum(b.numel() for b in head.converted))

    def _stored(self, model, spec: WeightSpec) -> tuple[list[torch.Tensor], QTensor | None]:
        """A weight as it is stored: the tensor, or its quantized parts."""
        t = model.weights.get(spec.name, self.dtype)
        if not compresses(spec, self.quant):
            return [t], None
        qt = quantize(t, self.quant)
        return qt.tensors(), qt

    def _pack(self, model, specs: list[WeightSpec], path: Path) -> tuple[Path, int]:
        """Convert weights with no readable place on disk (random, .bin, compressed) into one
        file per stage, so that the stage comes back in one read."""
        stored = [self._stored(model, s) for s in specs]
        packed = iter(write_packed(path, (t for parts, _ in stored for t in parts)))
        for spec, (parts, qt) in zip(specs, stored):
            disk = [
                TensorLocation(path, offset, nbytes(t), t.dtype, tuple(t.shape))
                for offset, t in (next(packed) for _ in parts)
            ]
            self.placed[spec.name] = w = PlacedWeight(spec, "disk", locations=disk, qt=layout(qt))
            self.tracker.add("disk", "weights", w.nbytes)
        return path, path.stat().st_size

    def _place(self, model, spec: WeightSpec, tier: str, pin: bool) -> PlacedWeight:
        if tier == "disk":  # read straight from the checkpoint: no second copy on disk
            loc = model.weights.location(spec.name)
            w = PlacedWeight(spec, tier, locations=[loc])
        else:
            device = self.device if tier == "gpu" else torch.device("cpu")
            parts, qt = self._stored(model, spec)
            parts = [p.to(device) for p in parts]
            if self.packs and packs_matrix(spec, tier, self.quant, model.family.token_table):
                parts = [packed(parts[0])]  # memory of its own, out of any file's map
                return_freed_memory()  # glibc kept the block read into, unused by the next read (+30 MB)
            elif tier == "cpu" and pin:
                parts = [p.pin_memory() for p in parts]
            elif parts[0].device.type == "cpu" and model.weights.maps(spec.name):
                parts = [p.clone() for p in parts]  # out of the file's map, into memory that stays put
            w = PlacedWeight(spec, tier, tensors=parts, qt=layout(qt))
        self.tracker.add(tier, "weights", w.nbytes)
        return w

    def disk_reads(self) -> list[tuple[Path, int, int]]:
        """The disk reads one token's weights take, as :meth:`load` issues them: ``(file,
        offset, bytes)`` in stage order (a stage's packed file whole; weights read in place from
        a checkpoint one by one; a streamed head's slices, per batch). Empty when no weight lives
        on disk."""
        reads = []
        for j, own in self.stage_files.items():
            if own is not None:
                reads.append((own[0], 0, own[1]))
            reads += [(loc.path, loc.offset, loc.nbytes) for loc in self._apart[j]]
            reads += self.streams[j].reads() if j in self.streams else []  # a streamed head's slices
        return reads

    def load(self, stage: int) -> tuple[LoadedWeights, dict[str, int]]:
        """The stage's weights on the compute device, and the bytes moved from each tier."""
        if stage in self._in_place:  # resident: the same tensors every time, nothing moved
            return LoadedWeights(self._in_place[stage], None, 0), {"cpu": 0, "disk": 0}
        buf = self.pool.acquire(self.stage_disk_bytes[stage]) if self.stage_disk_bytes[stage] else None
        conv = (
            self.convert_pool.acquire(self.stage_converted_bytes[stage]) if self.stage_converted_bytes[stage] else None
        )
        try:
            loaded, moved = self._load_into(stage, buf, conv)
            loaded.converted = conv
            return loaded, moved
        except BaseException:  # a failed read must not keep the buffers from the next load
            if buf is not None:
                self.pool.release(buf)
            if conv is not None:
                self.convert_pool.release(conv)
            raise

    def _read_all(self, stage: int, buf: torch.Tensor | None) -> list[torch.Tensor]:
        """Issue a stage's disk reads into ``buf``: its packed file whole (each tensor lands at
        its file offset), then each weight read in place from a checkpoint; returns the bytes of
        the latter, in order (views of ``buf``)."""
        own, pos, raws = self.stage_files[stage], 0, []
        if own is not None:
            assert buf is not None, "a stage with a packed file loads into a read buffer"
            self.files.read(own[0], 0, own[1], buf)
            pos = own[1]
        for loc in self._apart[stage]:
            assert buf is not None, "a stage with disk weights loads into a read buffer"
            size = read_region(loc.nbytes)
            raws.append(self.files.read(loc.path, loc.offset, loc.nbytes, buf[pos : pos + size]))
            pos += size
        return raws

    def _load_into(
        self, stage: int, buf: torch.Tensor | None, conv: torch.Tensor | None
    ) -> tuple[LoadedWeights, dict[str, int]]:
        raws = self._read_all(stage, buf)
        # On a CPU, weights read in place are views of the read buffer, the same ones at every
        # load into the same buffer: made once (a stage's dozens of views cost a lane ~50 us of
        # Python a load, which the compute thread waits for at the GIL).
        key = (stage, buf.data_ptr()) if buf is not None and conv is None and self.device.type == "cpu" else None
        ptrs = [r.data_ptr() for r in raws]
        if key in self._views and self._views[key][0] == ptrs:
            _, out, moved = self._views[key]
            return LoadedWeights(out, buf, 0), dict(moved)
        out, moved, copied = {}, {"cpu": 0, "disk": 0}, 0
        own, at, apart = self.stage_files[stage], 0, iter(raws)
        for w in self._loads[stage]:
            parts = []
            for p in w.tensors:  # the gpu tier's stay; the cpu tier's move (on a CPU: the same RAM, no copy)
                t = p if w.tier == "gpu" else p.to(self.device, non_blocking=True)
                if t is not p:
                    moved["cpu"] += nbytes(p)
                    copied += nbytes(t)
                parts.append(t)
            for loc in w.locations:
                assert buf is not None, "a stage with disk weights loads into a read buffer"
                raw = buf[loc.offset : loc.offset + loc.nbytes] if own and loc.path == own[0] else next(apart)
                # Compressed parts keep their own dtypes; a plain weight becomes the compute dtype.
                dtype = loc.dtype if w.qt is not None else self.dtype
                into = None
                if conv is not None and dtype != loc.dtype:  # converted on a CPU: into the stage's buffer
                    size = loc.nbytes // loc.dtype.itemsize * dtype.itemsize
                    into, at = conv[at : at + size].view(dtype).view(loc.shape), at + align_up(size)
                t = self._as_weight(raw, loc, dtype, into)
                moved["disk"] += loc.nbytes
                if into is None and (t.data_ptr() < buf.data_ptr() or t.data_ptr() >= buf.data_ptr() + buf.numel()):
                    copied += nbytes(t)  # moved to the GPU: a fresh tensor
                parts.append(t)
            out[w.spec.short] = parts[0] if w.qt is None else w.qt.with_tensors(parts)
        if key is not None and copied == 0:
            self._views[key] = (ptrs, out, moved)
        if buf is not None and self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the copies have left the buffer: reuse it
            self.pool.release(buf)
            buf = None
        self.tracker.add("gpu", "working weights", copied)
        if self.resident[stage]:
            self._in_place[stage] = out
        return LoadedWeights(out, buf, copied), moved

    def rows(self, stage: int, ids: torch.Tensor) -> tuple[torch.Tensor | QTensor, int]:
        """Rows ``ids`` (unique, ascending) of the stage's looked-up token table on the compute
        device, and the bytes read for them (:func:`~flexlab.engine.table_rows.table_rows`)."""
        return table_rows(self.looked_up[stage], ids, self.files, self.row_buffer, self.device, self.dtype)

    def dequantized(self, loaded: LoadedWeights) -> dict[str, torch.Tensor]:
        """A loaded stage's weights with every compressed one dequantized (once per load)."""
        if loaded.dequantized is not None:
            return loaded.dequantized
        compressed = [t for t in loaded.tensors.values() if isinstance(t, QTensor)]
        buf, at = None, 0
        if self.dequant_pool.count and compressed:
            # one stage computes at a time, and releases its load before the next dequantizes
            assert self.dequant_pool.free, "the dequantization buffer is held by a stage no longer computing"
            buf = loaded.dequant_buffer = self.dequant_pool.acquire()
        out: dict[str, torch.Tensor] = {}
        for name, t in loaded.tensors.items():
            if not isinstance(t, QTensor):
                out[name] = t
                continue
            into = None
            if buf is not None:
                size = math.prod(t.shape) * self.dtype.itemsize
                into, at = buf[at : at + size].view(self.dtype).view(t.shape), at + size
            out[name] = dequantize(t, self.dtype, out=into)
        if buf is None:  # fresh tensors (a GPU's)
            extra = sum(nbytes(out[name]) for name, t in loaded.tensors.items() if isinstance(t, QTensor))
            loaded.copied_bytes += extra
            self.tracker.add("gpu", "working weights", extra)
        loaded.dequantized = out
        return out

    def release(self, loaded: LoadedWeights) -> None:
        """Give a loaded stage's buffer back (after its last compute)."""
        self.tracker.sub("gpu", "working weights", loaded.copied_bytes)
        if loaded.buffer is not None:
            self.pool.release(loaded.buffer)
        if loaded.converted is not None:
            self.convert_pool.release(loaded.converted)
        if loaded.dequant_buffer is not None:
            self.dequant_pool.release(loaded.dequant_buffer)
            loaded.dequant_buffer = loaded.dequantized = None

    def reset(self) -> None:
        """Every read buffer free and no working copy counted, as between runs. For after a failed
        run (once its transfers have ended): the loads it took may not all have been released."""
        self.pool.reclaim()
        self.convert_pool.reclaim()
        self.dequant_pool.reclaim()
        self.tracker.clear("gpu", "working weights")

    def _as_weight(
        self, raw: torch.Tensor, d: TensorLocation, dtype: torch.dtype, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bytes read from disk as a tensor on the compute device (a view where possible; converted
        ``into`` a given tensor where there is one)."""
        if raw.data_ptr() % d.dtype.itemsize:  # a checkpoint tensor at an odd offset: copy to align it
            raw = raw.clone()
        view = raw.view(d.dtype).view(d.shape)
        if into is not None:
            return into.copy_(view)
        if view.device == self.device and view.dtype == dtype:
            return view
        return view.to(device=self.device, dtype=dtype, non_blocking=True)

    def tier_bytes(self) -> dict[str, int]:
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for w in self.placed.values():
            out[w.tier] += w.nbytes
        return out
