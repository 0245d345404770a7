"""What sparse attention's value reads cost (``attn_sparsity < 1``), for the cost model.

A sparse decode step reads every cached key (the cache's load, charged as dense), then, inside
its compute step, only the value rows some head kept (:mod:`flexlab.engine.sparse`): from a
gpu-tier slot in place, from a cpu-tier slot per sequence (over the link beside a GPU), and from
disk one read per run of positions kept by any head of any of the batch's disk sequences (a
disk slot is position-major: a position is read for all of them).

Which rows are kept depends on the text. The model takes every head's (and, on disk, every
sequence's) choice of its ``ceil(keep · L)`` rows out of ``L`` as independent, so a row is read
with probability ``1 − (1 − f)^n`` for ``n`` choosers keeping a share ``f`` each: within a few
percent of what a random OPT or LLaMA model reads (tested). Heads that agree read fewer rows
(recent tokens, the first one: a random BLOOM's ALiBi heads read a third of this), so for real
attention it is an upper bound; with many heads it is nearly every row, sparse or not.

    >>> expected_union(0.25, 1), round(expected_union(0.25, 4), 3)
    (0.25, 0.684)
"""

from __future__ import annotations

import math

from flexlab.cost.hardware import HardwareProfile
from flexlab.engine.kvcodec import KVCodec
from flexlab.engine.policy import Policy


def expected_union(share: float, choosers: int) -> float:
    """The expected share of rows chosen by at least one of ``choosers`` independent choosers
    that each keep ``share`` of them."""
    return 1.0 - (1.0 - share) ** choosers


def value_gather(
    hw: HardwareProfile, policy: Policy, codec: KVCodec, heads: int, seqs: dict[str, int], cached: int
) -> tuple[float, float, float, float]:
    """Gathering one batch's kept value rows in one layer's decode step over ``cached`` tokens
    (``seqs``: its sequences per tier; ``heads``: query heads, each choosing its own rows): the
    seconds of the device's own work, of the disk and of the link, and the bytes moved from
    another tier. The compute step waits for all three (the gather is inside it); the disk and
    the link are also busy for theirs, which the lanes' own transfers share."""
    assert codec.chunk == 1, "values are stored a token per row"
    stored = codec.stored_tokens(cached)  # the rest (a compressed cache's window) is read from the tail
    if not stored:
        return 0.0, 0.0, 0.0, 0.0
    share = max(1, math.ceil(policy.attn_sparsity * cached)) / cached
    per_sequence = stored * expected_union(share, heads)  # rows one sequence reads from its slot
    host_attends = hw.has_link and policy.cpu_cache_compute
    seconds = disk = link = moved = 0.0
    for tier, n in seqs.items():
        if not n:
            continue
        if tier == "disk":
            union = expected_union(share, heads * n)
            nbytes = stored * union * n * codec.row_bytes
            runs = union + (stored - 1) * union * (1 - union)  # a run starts where a read row follows an unread one
            disk += nbytes / hw.disk_read_bw + runs * hw.disk_latency_s
            link += nbytes / hw.link_pinned_bw if hw.has_link else 0.0
            moved += nbytes
            continue
        nbytes = n * per_sequence * codec.row_bytes
        if tier == "cpu" and hw.has_link and not host_attends:  # indexed rows: copied from pageable memory
            link += nbytes / hw.link_pageable_bw
            moved += nbytes
        elif not hw.sparse_value_bw:  # gathered where they lie (measured, this is part of the work below)
            seconds += nbytes / (hw.cpu_attention_bw if tier == "cpu" and host_attends else hw.attention_bw)
    kept = sum(seqs.values()) * per_sequence  # the rows the batch's attention weighs, wherever they came from
    if hw.sparse_value_bw:  # choosing, gathering and weighting them, beyond dense attention's work
        seconds += hw.sparse_call_s + kept * codec.heads * codec.head_dim * codec.dtype.itemsize / hw.sparse_value_bw
    if codec.config is not None:  # the gathered rows are decoded, one call per batch
        seconds += kept * codec.heads * codec.head_dim / hw.kv_codec_elems + hw.kv_codec_call_s
    return seconds, disk, link, moved
