"""Where things go: the placement rules, pure functions of shapes and a policy.

The stores place and move tensors by these rules and the cost model counts bytes by the same
ones, so a prediction cannot drift from what the engine does. Nothing here holds a tensor.

    >>> split_by_share([1] * 4, 50, 25)        # four sequences, cache 50/25/25
    ['gpu', 'gpu', 'cpu', 'disk']
    >>> cache_layout(split_by_share([1] * 4, 50, 25), [3, 1])   # per batch: (tier, first, count)
    [[('gpu', 0, 2), ('cpu', 2, 1)], [('disk', 0, 1)]]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from flexlab.compress import QuantConfig
from flexlab.engine.schedule import Stage
from flexlab.models.family import WeightSpec, specs_by_part

TIERS = ("gpu", "cpu", "disk")
ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned to the block size
READ_AHEAD = 4  # on a CPU, batches whose disk cache is read ahead of the compute


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def read_region(nbytes: int) -> int:
    """Room for an O_DIRECT read of ``nbytes`` at any offset, rounded to keep the next one aligned."""
    return -(-(nbytes + 2 * ALIGN) // ALIGN) * ALIGN


def near_tiers(on_cuda: bool) -> tuple[str, ...]:
    """The tiers the compute reads in place: the GPU's memory; on a CPU-only machine the cpu
    tier too (it is the compute's own RAM). Data on them is resident: no transfer moves it."""
    return ("gpu",) if on_cuda else ("gpu", "cpu")


def compresses(spec: WeightSpec, config: QuantConfig | None) -> bool:
    """Whether a weight is stored quantized: every matrix; vectors (biases, norms) stay exact."""
    return config is not None and len(spec.shape) >= 2


ROW_BUFFER = 1 << 20  # bytes of token-table rows read from disk at a time (see looks_up_rows)
ROW_GAP = 16  # looked-up rows this close on disk are read together, the rows between them too


def packs_matrix(spec: WeightSpec, tier: str, cw: QuantConfig | None, token_table: str) -> bool:
    """Whether an engine that packs (:func:`~flexlab.models.layers.packs`) holds this weight
    :func:`~flexlab.models.layers.packed`: kept in memory uncompressed, and one that families
    apply only through :func:`~flexlab.models.layers.project` (a layer's matrix, or a head's own:
    an untied ``lm_head``, OPT's ``project_out``); never the token table, which the embedding
    looks up, nor a weight on disk, read into a buffer at each load."""
    own = spec.layer is not None or spec.parts == ("head",)
    return tier != "disk" and not compresses(spec, cw) and len(spec.shape) == 2 and spec.short != token_table and own


def looks_up_rows(spec: WeightSpec, stage: Stage, tier: str, token_table: str, cw: QuantConfig | None) -> bool:
    """Whether the embedding reads only the rows of ``spec`` it looks up, instead of loading it
    whole: the token table (uncompressed, or compressed in groups along its rows, so that a row's
    codes and scales are its own), where a load would move all of it for a few rows (from disk;
    from host memory, which only a GPU must move, so callers check the link). The head still
    loads a tied table whole: its matmul reads every row."""
    rows_apart = not compresses(spec, cw) or (cw is not None and cw.group_dim % 2 == 1)
    return "embed" in stage.parts and spec.short == token_table and rows_apart and tier != "gpu"


# A streamed head's matrix is read from disk a slice of this many bytes at a time (see streams_rows)
# into one of HEAD_BUFFERS buffers: the next slice is read while the compute projects onto this one.
HEAD_SLICE = 32 << 20
HEAD_BUFFERS = 2


def head_streams(on_cuda: bool, num_gpu_batches: int, block_size: int, hidden_size: int) -> bool:
    """Whether a run's head reads a vocabulary matrix on disk in slices (:func:`streams_rows`):
    on a CPU. With several GPU batches one pass over the slices answers all of a group's batches,
    as one load of the whole matrix does, but holds the block's logits until the last batch's
    compute; that is less than the matrix (``vocab x hidden``) while the block has fewer rows
    than ``hidden_size``. On a GPU each slice would cross the link (not measured: it loads the
    matrix whole)."""
    return not on_cuda and (num_gpu_batches == 1 or block_size < hidden_size)


def streams_rows(
    spec: WeightSpec, stage: Stage, tier: str, vocab_size: int, hidden_size: int, cw: QuantConfig | None, stream: bool
) -> bool:
    """Whether the head reads ``spec``, its projection onto the vocabulary (a tied token table or
    its own), from disk a slice of rows at a time (:func:`head_slices`), projecting onto each in
    turn, instead of loading it whole: a load needs a read buffer of the whole matrix (1 GB for
    BLOOM's 250k rows), a slice one of :data:`HEAD_SLICE`. Uncompressed only; ``stream``:
    :func:`head_streams` of the run."""
    return (
        stream
        and "head" in stage.parts
        and tier == "disk"
        and len(spec.shape) == 2
        and spec.shape[0] == vocab_size != hidden_size
        and not compresses(spec, cw)
    )


def head_slices(rows: int, row_bytes: int) -> list[range]:
    """The row ranges a streamed head reads in turn: each within :data:`HEAD_SLICE` bytes."""
    step = max(1, HEAD_SLICE // row_bytes)
    return [range(a, min(a + step, rows)) for a in range(0, rows, step)]


def head_slice_buffers(streamed: tuple[int, int, int]) -> tuple[int, int]:
    """Bytes of each of a streamed head's :data:`HEAD_BUFFERS` (read buffer, conversion buffer)
    pairs, for its matrix as :class:`~flexlab.engine.stage_cost.StageCost` describes it (stored
    bytes, bytes per row, bytes per row in the compute dtype where converted, else 0): room for
    one slice's read, and the slice converted."""
    stored, row_bytes, convert = streamed
    rows = len(head_slices(stored // row_bytes, row_bytes)[0])
    return read_region(rows * row_bytes), rows * convert


def row_spans(ids: list[int], row_bytes: int) -> list[tuple[int, int]]:
    """Ascending unique row ids as the reads that fetch them: ``(first row, rows)``, rows at most
    :data:`ROW_GAP` apart read together (a read costs more than a few KB), each read within
    :data:`ROW_BUFFER`. ``row_spans([1, 2, 30, 31], 8)`` is ``[(1, 2), (30, 2)]``."""
    most = max(1, (ROW_BUFFER - 2 * ALIGN) // row_bytes)
    spans: list[list[int]] = []
    for r in ids:
        if spans and r - (spans[-1][0] + spans[-1][1]) <= ROW_GAP and r - spans[-1][0] < most:
            spans[-1][1] = r - spans[-1][0] + 1
        else:
            spans.append([r, 1])
    return [(first, n) for first, n in spans]


def split_by_share(sizes: list[int], gpu_percent: float, cpu_percent: float) -> list[str]:
    """Tier of each item: an item goes where the midpoint of its cumulative byte range falls."""
    total = sum(sizes) or 1
    tiers, start = [], 0
    for size in sizes:
        mid = 100 * (start + size / 2) / total
        tiers.append("gpu" if mid < gpu_percent else "cpu" if mid < gpu_percent + cpu_percent else "disk")
        start += size
    return tiers


def cache_layout(seq_tiers: list[str], batch_sizes: list[int]) -> list[list[tuple[str, int, int]]]:
    """Per GPU batch, its sequences' cache tiers as ``(tier, first sequence, count)`` runs in
    sequence order (``seq_tiers``: every sequence of the block, by :func:`split_by_share`)."""
    out, start = [], 0
    for size in batch_sizes:
        tiers = seq_tiers[start : start + size]
        out.append([(t, tiers.index(t), tiers.count(t)) for t in TIERS if t in tiers])
        start += size
    return out


def cache_read_buffers(on_cpu: bool, disk_sequences: int, sequence_bytes: int) -> tuple[int, int, int]:
    """The disk cache's read buffers as ``(batches read ahead, buffer count, bytes each)``.
    ``disk_sequences``: the most a batch keeps on disk.

    On a CPU the compute reads disk rows in the buffer they were read into (no copy) and hands
    it back after, so each batch read ahead holds a keys and a values buffer. Reading four
    ahead keeps the disk busy through MLP stages, which read no cache (with one, the disk sat
    idle through them while the next attention stage's batches waited). On a GPU a read is
    copied to the device at once: two buffers, one batch ahead.
    """
    if not disk_sequences:
        return 1, 0, 0
    ahead = READ_AHEAD if on_cpu else 1
    return ahead, 2 * (ahead + 1) if on_cpu else 2, disk_sequences * sequence_bytes + 2 * ALIGN


def reads_in_place(stored: torch.dtype, compute: torch.dtype, on_cuda: bool) -> bool:
    """Whether a disk-tier weight stored in a checkpoint as ``stored`` is read from it in place,
    converted to ``compute`` on every read, rather than converted once, when placed, into a file of
    the engine's own. On a GPU the conversion runs there at little cost. On a CPU it runs on every
    read beside the maths, on the same cores: opt-1.3b-shaped, every weight on disk, bfloat16
    compute, a float16 checkpoint ran at 7.15 tok/s against 10.7 from a bfloat16 one (2026-12-07,
    ``experiments/checkpoint_dtype.py``), its load lane busy twice as long. So a CPU converts once
    into a dtype of the same size or a narrower one (fewer bytes to read every token too); the copy
    takes disk space, which the engine checks for before it writes. Into a wider dtype (float16
    into float32) it reads in place, half the bytes off the disk, and pays the conversion: the
    better choice where the disk is slower than the conversion (~1.5 GB/s on one core here); on
    this host's 1.4 GB/s disk a float32 checkpoint ran 7% faster than a float16 one (4.18 against
    3.92 tok/s) but needs twice the disk: ``flexlab convert --dtype float32`` makes one."""
    return stored == compute or on_cuda or stored.itemsize < compute.itemsize


def weight_read_buffers(stage_disk_bytes: Sequence[int]) -> list[int]:
    """The sizes of the weight read buffers for stages that read ``stage_disk_bytes`` each from
    disk, in their load order (one pipeline rank's, repeating every token).

    Two loads are held at once: the stage computing and the next one, prefetched. Two buffers of
    the largest stage serve any pair, but where one stage outweighs the rest (a tied token table
    of 250k rows against layers of a few MB) that holds twice the table. Then one buffer of the
    largest and two of the next largest cost less, and still serve any pair: each load takes a
    buffer of the smallest size that holds it, and two of those are never both taken by another
    load (:class:`~flexlab.engine.tiers.BufferPool`). A rank of one stage holds that stage twice.
    """
    sizes = sorted((b for b in stage_disk_bytes if b), reverse=True)
    if not sizes:
        return []
    first = sizes[0]
    second = sizes[1] if len(sizes) > 1 else (first if len(stage_disk_bytes) == 1 else 0)
    if 2 * second >= first:
        return [first, first]
    return [first] + [second] * (2 if second else 0)


def _readers(
    specs: list[WeightSpec], stages: Sequence[Stage]
) -> tuple[list[list[WeightSpec]], dict[str, WeightSpec], list[WeightSpec]]:
    """Per stage the weights it reads; every weight by name; those read by several stages."""
    by_part = specs_by_part(specs)
    per_stage = [[s for part in stage.parts for s in by_part.get((part, stage.layer), [])] for stage in stages]
    unique = {s.name: s for mine in per_stage for s in mine}
    readers = Counter(name for mine in per_stage for name in {s.name for s in mine})
    return per_stage, unique, [s for s in unique.values() if readers[s.name] > 1]


def tied_front(specs: list[WeightSpec], stages: Sequence[Stage]) -> float | None:
    """The weight percent that the weights read by several stages take at the front of the
    model's bytes (see :func:`place_weights`), when they outweigh every other stage; else None.

    With ``w_cpu_percent`` at this value (and none on the gpu) the tied weights sit on the cpu
    tier and everything else on disk. That matters when a token table is the largest thing a
    stage reads (BLOOM's 250k rows, tied): on disk it sizes both read buffers, so all-disk needs
    more memory than the table on the cpu tier with the layers on disk.
    """
    per_stage, unique, tied = _readers(specs, stages)
    if not tied:
        return None
    names = {s.name for s in tied}
    largest_other = max((sum(s.numel for s in mine if s.name not in names) for mine in per_stage), default=0)
    tied_numel = sum(s.numel for s in tied)
    if tied_numel <= largest_other:
        return None
    # just past the tied weights' bytes, rounded up to the 0.1% a policy's percents are kept to
    return math.ceil(1000 * tied_numel / sum(s.numel for s in unique.values()) + 1e-9) / 10


def place_weights(
    specs: list[WeightSpec], stages: list[Stage], w_gpu_percent: float, w_cpu_percent: float
) -> list[list[tuple[WeightSpec, str, bool]]]:
    """Per stage, ``(spec, tier, first)`` for every weight it reads; ``first`` is False for a tied
    weight placed by an earlier stage.

    A weight read by several stages (OPT's token embedding, also the LM head) is read that many
    times per token, so it is placed first, on the fastest tiers: it takes the front of the
    model's bytes, split by the midpoint rule, and the rest of the weights meet what it leaves
    of each share. The layers' tensors are taken in order and each goes to the tier furthest
    behind its share of the layer bytes placed so far (error diffusion): every layer gets its
    share to within one tensor, and so does the whole stack, where a split inside each stage
    alone (FlexGen's rule) can miss by a whole tensor per stage (with 25% on the gpu, an MLP
    stage of two equal matrices would put nothing there, in every layer). Other stages outside
    the layers (position embeddings, final norm) are split on their own by the midpoint rule, so
    their large tensors do not unbalance the layers.
    """
    per_stage, unique, tied = _readers(specs, stages)
    everything = sum(s.numel for s in unique.values())
    rest = everything - sum(s.numel for s in tied)
    placed = dict(
        zip((s.name for s in tied), split_by_share([s.numel for s in tied] + [rest], w_gpu_percent, w_cpu_percent))
    )
    # The shares of the rest: what the tied weights left of each tier's bytes.
    share: dict[str, float] = {}
    for tier, percent in (("gpu", w_gpu_percent), ("cpu", w_cpu_percent)):
        left = everything * percent / 100 - sum(s.numel for s in tied if placed[s.name] == tier)
        share[tier] = min(max(0.0, left / rest), 1 - sum(share.values())) if rest else 0.0
    share["disk"] = 1 - share["gpu"] - share["cpu"]
    assigned = dict.fromkeys(share, 0)
    total = 0
    seen: set[str] = set()
    out = []
    for stage, mine in zip(stages, per_stage):
        new = [s for s in mine if s.name not in placed]
        if stage.layer is None:
            placed.update(
                zip(
                    (s.name for s in new),
                    split_by_share([s.numel for s in new], 100 * share["gpu"], 100 * share["cpu"]),
                )
            )
        for spec in new if stage.layer is not None else ():
            total += spec.numel
            tier = max(share, key=lambda t: share[t] * total - assigned[t])  # ties: gpu, then cpu
            assigned[tier] += spec.numel
            placed[spec.name] = tier
        out.append([(s, placed[s.name], s.name not in seen) for s in mine])
        seen.update(s.name for s in mine)
    return out
