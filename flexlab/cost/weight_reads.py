"""What the reads a compute asks for itself cost (not a stage's load): the embedding's rows of a
looked-up token table and a streamed head's slices (:mod:`flexlab.engine.table_rows`); and the
conversion of a narrower checkpoint's reads."""

from __future__ import annotations

from flexlab.cost.hardware import HardwareProfile
from flexlab.engine.placement import ALIGN, ROW_BUFFER, ROW_GAP, head_slices


def row_reads(hw: HardwareProfile, tier: str, table_bytes: int, row_bytes: int, rows: int) -> float:
    """Seconds to read ``rows`` rows of a looked-up token table (:meth:`WeightStore.rows`).
    From host memory to a GPU: the rows over the link. From disk, an estimate (which rows
    depends on the text): ids spread evenly, one read each, unless they lie closer than
    ``ROW_GAP`` apart on average, when the reads stream the whole table a buffer at a time."""
    if tier == "cpu":
        return hw.transfer_overhead_s + rows * row_bytes / hw.link_pageable_bw
    if table_bytes / row_bytes / rows <= ROW_GAP + 1:
        return table_bytes / hw.disk_read_bw + -(-table_bytes // ROW_BUFFER) * hw.disk_latency_s
    return rows * (max(row_bytes, ALIGN) / hw.disk_read_bw + hw.disk_latency_s)


def convert_rate(hw: HardwareProfile, checkpoint_itemsize: int | None, itemsize: int) -> float:
    """Elements/s a CPU converts a narrower checkpoint's reads at, into ``itemsize``-byte
    elements: measured (:func:`~flexlab.cost.probes.convert_rate`), else a copy at the memory's
    bandwidth."""
    if hw.convert_elems:
        return hw.convert_elems
    return hw.weight_read_bw / ((checkpoint_itemsize or itemsize) + itemsize)


def head_reads(
    hw: HardwareProfile, streamed: tuple[int, int, int], itemsize: int, convert_rate: float
) -> tuple[float, float]:
    """Seconds for a streamed head to read its matrix from disk (``StageCost.streamed``), one
    read per :func:`~flexlab.engine.placement.head_slices` slice, and to convert it at
    ``convert_rate`` elements/s where the checkpoint is narrower; and of that, the first slice's
    share: the compute waits for it, and projects onto each slice while the next is read."""
    stored, row_bytes, convert = streamed
    rows = stored // row_bytes
    slices = len(head_slices(rows, row_bytes))
    seconds = stored / hw.disk_read_bw + slices * hw.disk_latency_s
    seconds += rows * convert // itemsize / convert_rate if convert else 0.0
    return seconds, seconds / slices
