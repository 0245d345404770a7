"""The rows of a looked-up token table (:func:`~flexlab.engine.placement.looks_up_rows`): the
embedding reads only the rows of the ids at hand from a table not in the compute's memory,
instead of loading all of it every token; and a streamed head's matrix, read a slice of rows at
a time (:func:`~flexlab.engine.placement.streams_rows`)."""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Protocol

import torch

from flexlab.compress import QTensor
from flexlab.engine.placement import ALIGN, HEAD_BUFFERS, head_slice_buffers, head_slices, row_spans
from flexlab.engine.tiers import BufferPool, DiskFiles, aligned_empty, nbytes
from flexlab.models.loading import TensorLocation


class PlacedTable(Protocol):
    """A placed token table as :class:`~flexlab.engine.placed.PlacedWeight` holds it."""

    tier: str
    tensors: list[torch.Tensor]
    locations: list[TensorLocation]
    qt: QTensor | None


def table_rows(
    w: PlacedTable,
    ids: torch.Tensor,
    files: DiskFiles,
    row_buffer: BufferPool | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | QTensor, int]:
    """Rows ``ids`` (unique, ascending) of the token table ``w`` on ``device`` (``[n, hidden]``
    in ``dtype``; a compressed table's as a ``QTensor`` of those rows, to dequantize), and the
    bytes read for them: from host memory, only those rows; from disk, through ``row_buffer``,
    each :func:`~flexlab.engine.placement.row_spans` span in one read, of every stored part
    (codes, scales)."""
    if w.tier != "disk":
        index = ids.to(w.tensors[0].device)
        picked = [t[index] for t in w.tensors]
        moved = sum(map(nbytes, picked))
        return _as_rows(w, [t.to(device, non_blocking=True) for t in picked], len(index), dtype), moved
    assert row_buffer is not None, "a disk table looked up without its row buffer"
    wanted = ids.tolist()
    row_bytes = [loc.nbytes // loc.shape[0] for loc in w.locations]
    parts = [torch.empty((len(wanted), *loc.shape[1:]), dtype=loc.dtype, device=device) for loc in w.locations]
    moved = 0
    buf = row_buffer.acquire()
    try:
        for first, n in row_spans(wanted, max(row_bytes)):
            start = bisect.bisect_left(wanted, first)
            stop = bisect.bisect_left(wanted, first + n, start)  # the wanted rows this span holds
            mine = [r - first for r in wanted[start:stop]]
            for loc, size, part in zip(w.locations, row_bytes, parts):
                raw = files.read(loc.path, loc.offset + first * size, n * size, buf)
                if raw.data_ptr() % loc.dtype.itemsize:  # a checkpoint tensor at an odd offset
                    raw = raw.clone()
                part[start:stop] = raw.view(loc.dtype).view(n, *loc.shape[1:])[mine].to(device)
                moved += n * size
        if device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the copies have left the buffer
    finally:
        row_buffer.release(buf)
    return _as_rows(w, parts, len(wanted), dtype), moved


def _as_rows(w: PlacedTable, parts: list[torch.Tensor], n: int, dtype: torch.dtype) -> torch.Tensor | QTensor:
    """Looked-up rows' stored parts as rows of the table: a compressed table's as a ``QTensor``
    of ``n`` rows, a plain one's in ``dtype``."""
    if w.qt is None:
        return parts[0].to(dtype)
    return dataclasses.replace(w.qt.with_tensors(parts), shape=(n, w.qt.shape[1]))


class HeadStream:
    """A streamed head's matrix on disk (:func:`~flexlab.engine.placement.streams_rows`) and the
    :data:`~flexlab.engine.placement.HEAD_BUFFERS` buffers its slices come through, in turn
    (the next is read while the compute projects onto one): each to read into, and one to
    convert into where the matrix is stored in another dtype than the compute's (on a CPU, the
    only device that streams)."""

    def __init__(self, loc: TensorLocation, files: DiskFiles, dtype: torch.dtype) -> None:
        self.loc, self.files, self.dtype = loc, files, dtype
        self.row_bytes = loc.nbytes // loc.shape[0]
        convert = loc.shape[1] * dtype.itemsize if loc.dtype != dtype else 0
        read, converted = head_slice_buffers((loc.nbytes, self.row_bytes, convert))
        self.buffers = [aligned_empty(read) for _ in range(HEAD_BUFFERS)]
        self.converted = [aligned_empty(converted) for _ in range(HEAD_BUFFERS)] if converted else []
        self.slices = head_slices(loc.shape[0], self.row_bytes)  # the row ranges read in turn

    def reads(self) -> list[tuple[Path, int, int]]:
        """The slices' reads: ``(file, offset, bytes)``."""
        return [
            (self.loc.path, self.loc.offset + r.start * self.row_bytes, len(r) * self.row_bytes) for r in self.slices
        ]

    def read(self, rows: range, slot: int) -> tuple[torch.Tensor, int]:
        """Rows ``rows`` in one request into buffer ``slot``, as ``[n, columns]`` in the compute
        dtype, and the bytes read. A view of that slot's buffers: valid until its next read."""
        loc, n = self.loc, len(rows)
        start = loc.offset + rows.start * self.row_bytes
        # from an aligned offset: a large read is then split over the disk's threads
        size = start % ALIGN + n * self.row_bytes
        raw = self.files.read(loc.path, start - start % ALIGN, size, self.buffers[slot])[start % ALIGN :]
        if raw.data_ptr() % loc.dtype.itemsize:  # a checkpoint tensor at an odd offset
            raw = raw.clone()
        view = raw.view(loc.dtype).view(n, *loc.shape[1:])
        if loc.dtype == self.dtype:
            return view, n * self.row_bytes
        assert self.converted, f"a {loc.dtype} matrix streamed into {self.dtype} without its buffers"
        into = self.converted[slot][: view.numel() * self.dtype.itemsize].view(self.dtype).view(view.shape)
        return into.copy_(view), n * self.row_bytes


def streamed_slices(
    head: Callable[[dict, torch.Tensor], torch.Tensor],
    w: dict,
    name: str,
    vocab: int,
    slices: list[range],
    fetch: Callable[[range, int], Future],
    wait_for: Callable[[Future], torch.Tensor] = Future.result,
) -> Callable[[], Iterator[tuple[range, Callable[[torch.Tensor], torch.Tensor]]]]:
    """A head's projection onto its matrix ``name`` read a slice of rows at a time, as
    :class:`~flexlab.engine.projection.Projection` takes it: per slice its rows, and the family's own
    ``head`` on those rows (and on those of any vector over the vocabulary in ``w``: a bias).
    ``fetch(rows, slot)`` reads rows into buffer ``slot`` beside the compute (a future of the
    matrix); the next slice is asked for when one is handed over, into the other buffer, whose
    slice the compute has finished with. ``wait_for`` waits for a fetched slice (and may time it)."""

    def each() -> Iterator[tuple[range, Callable[[torch.Tensor], torch.Tensor]]]:
        pending: Future | None = fetch(slices[0], 0)
        try:
            for i, rows in enumerate(slices):
                assert pending is not None
                matrix = wait_for(pending)
                pending = fetch(slices[i + 1], (i + 1) % HEAD_BUFFERS) if i + 1 < len(slices) else None
                part = {n: v[rows.start : rows.stop] if v.dim() == 1 and len(v) == vocab else v for n, v in w.items()}
                part[name] = matrix
                yield rows, functools.partial(head, part)
        finally:  # left early (an error): no read may still be writing a buffer
            if pending is not None:
                wait([pending])

    return each
