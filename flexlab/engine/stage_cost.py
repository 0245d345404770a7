"""What a placement's weights cost, stage by stage: bytes per tier, matmul sizes, dequantization,
read buffers and the copies a load makes. Pure and cached: the search prices thousands of
policies that share a placement (:func:`price_weights`); the engine's memory
(:mod:`flexlab.engine.footprint`) and the cost model's times both start from it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from flexlab.compress import QuantConfig
from flexlab.engine.placement import (
    TIERS,
    align_up,
    compresses,
    looks_up_rows,
    packs_matrix,
    place_weights,
    read_region,
    reads_in_place,
    streams_rows,
)
from flexlab.engine.schedule import Stage
from flexlab.models.config import ModelConfig
from flexlab.models.registry import get_family


@dataclass(frozen=True)
class StageCost:
    name: str
    parts: tuple[str, ...]
    matmul_params: int  # elements of the matrices its matmuls read
    flops_per_token: float
    w_bytes: dict[str, int]  # stored bytes of its weights per tier
    w_device_bytes: int  # its matrices in the compute dtype (what a decode matmul streams)
    dequant_elems: int  # compressed elements dequantized once per token (kept until the stage is done)
    row_table: int = 0  # a compressed token table looked up by rows: its row length (dequantized per batch)
    batch_dequant_elems: int = 0  # with a row table, the stage's other matrices (dequantized per batch)
    elementwise: float = 0  # hidden-sized vectors read or written per token by its elementwise ops
    # what a load of the stage copies (with a GPU: every weight not on it, as loaded, fresh tensors;
    # on a CPU: disk weights read in place whose dtype is not the compute dtype, converted into a
    # conversion buffer, each at an aligned offset)
    copies: tuple[int, int] = (0, 0)  # (with a link, without)
    dequant_mats: int = 0  # the matrices behind dequant_elems (each costs a fixed time too: its kernels' launches)
    # the token table the embedding reads rows of instead of loading it (placement.looks_up_rows):
    # its tier, stored bytes and bytes per row; ("", 0, 0) for none. From host memory only with a GPU.
    looked_up: tuple[str, int, int] = ("", 0, 0)
    converted_elems: int = 0  # on a CPU: elements a load converts from a narrower checkpoint (its lane's work)
    # the head's vocabulary matrix read from disk in slices by its compute (placement.streams_rows):
    # its stored bytes, bytes per row, and bytes per row converted into the compute dtype (0: none)
    streamed: tuple[int, int, int] = (0, 0, 0)
    # elements of its matmuls' matrices a CPU computing in bfloat16 holds packed (those kept in
    # memory uncompressed: placement.packs_matrix); their decode products read faster
    packed_params: int = 0

    def read_s(self, itemsize: int, plain_bw: float, packed_bw: float) -> float:
        """Seconds a decode's few rows take to read its matrices at ``plain_bw`` (0: unmeasured,
        0 s), those held packed at ``packed_bw``."""
        if not plain_bw:
            return 0.0
        packed = self.packed_params * itemsize
        return (self.w_device_bytes - packed) / plain_bw + (packed / packed_bw if packed else 0.0)


@functools.lru_cache(maxsize=256)
def price_weights(
    config: ModelConfig,
    stages: tuple[Stage, ...],
    w_gpu_percent: float,
    w_cpu_percent: float,
    cw: QuantConfig | None,
    itemsize: int,
    checkpoint_itemsize: int | None = None,
    stream_head: bool = False,
    packs: bool = False,
) -> tuple[list[StageCost], dict[str, int], list[int]]:
    """Per stage: what its weights cost (bytes per tier, matmul sizes, dequantization); the
    model's stored weight bytes per tier; per stage the bytes of its packed disk file.

    Pure in its arguments and cached: the search prices thousands of policies that share a
    weight placement and differ only in batches or the cache (callers must not mutate it).
    ``stream_head``: :func:`~flexlab.engine.placement.head_streams` of the run; ``packs``: the
    engine holds its memory tiers' matrices packed (:func:`~flexlab.models.layers.packs`)."""
    family = get_family(config.family)
    placement = place_weights(family.weight_specs(config), list(stages), w_gpu_percent, w_cpu_percent)
    priced, weight_bytes, packed_bytes = [], {t: 0 for t in TIERS}, []
    for stage, items in zip(stages, placement):
        w_bytes, packed, copies, looked_up, converted = {t: 0 for t in TIERS}, 0, [0, 0], ("", 0, 0), 0
        streamed = (0, 0, 0)
        for spec, tier, first in items:
            qcfg = cw if compresses(spec, cw) else None
            # read in place from the checkpoint, in its dtype; else written by the engine
            in_place = tier == "disk" and qcfg is None and checkpoint_itemsize is not None
            parts = (
                qcfg.part_nbytes(spec.shape)
                if qcfg is not None
                else [spec.numel * (checkpoint_itemsize if checkpoint_itemsize and in_place else itemsize)]
            )
            w_bytes[tier] += sum(parts)
            if first:
                weight_bytes[tier] += sum(parts)
            if looks_up_rows(spec, stage, tier, family.token_table, cw):
                # not part of the stage's load, read buffer or copies: the compute reads its rows
                looked_up = (tier, sum(parts), sum(parts) // spec.shape[0])
                continue
            if streams_rows(spec, stage, tier, config.vocab_size, config.hidden_size, cw, stream_head):
                # likewise: the head's compute reads it a slice at a time
                convert = spec.shape[1] * itemsize if in_place and checkpoint_itemsize != itemsize else 0
                streamed = (sum(parts), sum(parts) // spec.shape[0], convert)
                continue
            if tier == "disk":  # the read buffer: the stage's packed file, plus room for each read elsewhere
                packed += sum(align_up(n) if first and not in_place else read_region(n) for n in parts)
            if tier != "gpu":  # loaded: plain weights in the compute dtype, compressed ones as stored
                copies[0] += spec.numel * itemsize if qcfg is None else sum(parts)
            if in_place and checkpoint_itemsize != itemsize:  # converted into the stage's conversion buffer
                copies[1] += align_up(spec.numel * itemsize)
                converted += spec.numel
        mats = [s for s, _, _ in items if len(s.shape) >= 2]
        matmul = [s for s in mats if not ("embed" in stage.parts and s.layer is None)]  # a lookup, no matmul
        if "head" in stage.parts:
            matmul = [s for s in mats if s.shape[0] == config.vocab_size]
        params = sum(s.numel for s in matmul)
        tier_of = {s.name: t for s, t, _ in items}
        packed_params = sum(
            s.numel for s in matmul if packs and packs_matrix(s, tier_of[s.name], cw, family.token_table)
        )
        deq = sum(s.numel for s in mats) if cw is not None else 0
        row_table = per_batch = 0
        if cw is not None and "embed" in stage.parts and cw.group_dim % 2 == 1:
            # the engine dequantizes only the looked-up rows of the token table, per batch
            table = next(s for s in mats if s.shape[0] == config.vocab_size)
            deq, row_table, per_batch = 0, table.shape[1], sum(s.numel for s in mats if s is not table)
        elementwise = sum(family.elementwise(config, part) for part in stage.parts)
        priced.append(
            StageCost(
                stage.name,
                stage.parts,
                params,
                2.0 * params,
                w_bytes,
                params * itemsize,
                deq,
                row_table,
                per_batch,
                elementwise,
                (copies[0], copies[1]),
                dequant_mats=len(mats) if deq else 0,
                looked_up=looked_up,
                converted_elems=converted,
                streamed=streamed,
                packed_params=packed_params,
            )
        )
        packed_bytes.append(packed)
    return priced, weight_bytes, packed_bytes


def checkpoint_itemsize(model) -> int | None:
    """For :class:`CostModel`: the bytes per element of the safetensors the engine reads ``model``'s
    disk weights from in place, or None where it writes them itself (random weights, ``.bin``, a
    dtype a CPU converts once: :func:`~flexlab.engine.placement.reads_in_place`)."""
    specs = model.family.weight_specs(model.config)
    where = [model.weights.location(s.name) for s in specs]
    on_cuda = model.device.type == "cuda"
    if any(loc is None or not reads_in_place(loc.dtype, model.dtype, on_cuda) for loc in where):
        return None
    sizes = {loc.dtype.itemsize for loc in where}
    return sizes.pop() if len(sizes) == 1 else None
