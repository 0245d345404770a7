"""What a policy holds in memory, as pure functions of shapes: per tier the engine's peak bytes,
and the whole process's peak as the operating system sees it (per stage, what its weights cost is
:mod:`flexlab.engine.stage_cost`).

The engine checks a policy against a memory limit with these before it allocates anything, and
the cost model and the search predict with the same functions, so a searched policy passes the
engine's check. A process's peak resident memory is the sum of

* the engine's **tracked** bytes (:func:`engine_peak`: weights, read buffers, working copies,
  KV cache, activation slots) — exact, from the placement rules;
* the **workspace** of its largest step (:func:`workspace`: tensors a stage's maths makes and
  drops — hidden-sized vectors, a chunk of attention scores, the head's logits), from the
  shapes, times the allocator's slack: glibc keeps freed blocks for reuse, so a run's resident
  memory grows by about twice its workspace (measured; once with :func:`lean_allocator`);
* the **runtime base**: interpreter, torch, the model's metadata (the engine measures the process
  as it is; the cost model takes ``HardwareProfile.runtime_base_bytes``, which ``calibrate()``
  measures in a fresh process).

    >>> from flexlab import Policy, get_preset
    >>> fp = footprint(get_preset("opt-125m"), Policy(gpu_batch_size=8), on_cuda=False, itemsize=2,
    ...                prompt_len=512, gen_len=8, runtime_base=0.25 * 2**30)
    >>> round(fp.tracked["gpu"] / 2**20), round(fp.workspace / 2**20), round(fp.host / 2**30, 2)
    (385, 202, 1.02)
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from dataclasses import dataclass

import torch

from flexlab.compress.quant import QuantConfig, quantize_workspace
from flexlab.engine.kvcodec import KVCodec
from flexlab.engine.placement import (
    HEAD_BUFFERS,
    ROW_BUFFER,
    TIERS,
    cache_read_buffers,
    compresses,
    head_slice_buffers,
    head_streams,
    packs_matrix,
    place_weights,
    split_by_share,
    weight_read_buffers,
)
from flexlab.engine.policy import Policy
from flexlab.engine.schedule import Stage, stages_of
from flexlab.engine.stage_cost import StageCost, price_weights
from flexlab.models.attention import SCORE_BYTES
from flexlab.models.config import ModelConfig
from flexlab.models.family import part_weights
from flexlab.models.registry import get_family


# ---- the engine's tracked bytes ------------------------------------------------------------
def engine_peak(
    config: ModelConfig,
    policy: Policy,
    priced: list[StageCost],
    weight_bytes: dict[str, int],
    packed: list[int],
    *,
    on_cuda: bool,
    itemsize: int,
    prompt_len: int,
    gen_len: int,
    num_prompts: int,
    num_layers: int,
) -> dict[str, float]:
    """Peak bytes per tier as the engine's tracker counts them: weights, read buffers, working
    weights, KV cache, its full-precision tail, activation slots (``priced``, ``weight_bytes``,
    ``packed``: :func:`price_weights` of the stages run)."""
    p, cfg = policy, config
    out = {t: float(v) for t, v in weight_bytes.items()}
    out["cpu" if on_cuda else "gpu"] += sum(weight_read_buffers(packed))  # the stages' files are read into
    if any(st.looked_up[0] == "disk" for st in priced):  # the token table's rows come through one more
        out["cpu" if on_cuda else "gpu"] += ROW_BUFFER
    for st in priced:  # a streamed head's slices come through two more (and two to convert them into)
        if st.streamed[0]:
            out["cpu" if on_cuda else "gpu"] += HEAD_BUFFERS * sum(head_slice_buffers(st.streamed))
    # On the compute device: the computing stage's copies of weights from other tiers and its
    # dequantized matrices, and the next stage's copies (prefetched; after the last stage comes
    # the first, for the next token or group). A CPU uses its reads in place, or converts them
    # to the compute dtype into conversion buffers held like the read buffers, and dequantizes
    # into one buffer of the largest stage's matrices.
    if on_cuda:
        copied = [st.copies[0] for st in priced]
        after = copied[1:] + (copied[:1] if gen_len > 1 or p.num_gpu_batches > 1 else [0])
        working = [c + st.dequant_elems * itemsize + nxt for c, st, nxt in zip(copied, priced, after)]
        out["gpu"] += max(working, default=0)
    else:
        out["gpu"] += sum(weight_read_buffers([st.copies[1] for st in priced]))
        out["gpu"] += max((st.dequant_elems * itemsize for st in priced), default=0)
    capacity = prompt_len + gen_len - 1
    n = min(num_prompts, p.block_size)
    tiers = split_by_share([1] * n, p.cache_gpu_percent, p.cache_cpu_percent)
    codecs = kv_codecs(cfg, p, itemsize)
    for codec in codecs:
        per_seq = num_layers * -(-capacity // codec.chunk) * codec.row_bytes
        for t in TIERS:
            out[t] += tiers.count(t) * per_seq
        out["gpu"] += num_layers * n * codec.max_tail * cfg.kv_dim * itemsize
    most = max((tiers[i : i + p.gpu_batch_size].count("disk") for i in range(0, n, p.gpu_batch_size)), default=0)
    row = max(-(-capacity // c.chunk) * c.row_bytes for c in codecs)
    _, count, size = cache_read_buffers(not on_cuda, most, row)
    out["cpu" if on_cuda else "gpu"] += count * size
    if p.act_tier != "gpu":
        out[p.act_tier] += p.num_gpu_batches * p.gpu_batch_size * prompt_len * cfg.hidden_size * itemsize
    return out


def kv_codecs(config: ModelConfig, policy: Policy, itemsize: int) -> tuple[KVCodec, KVCodec]:
    """The keys' and the values' codec, as the cache stores them."""
    dtype = {2: torch.bfloat16, 4: torch.float32}[itemsize]
    return (
        KVCodec(policy.compress_cache, config.num_kv_heads, config.head_dim, dtype, keys=True),
        KVCodec(policy.compress_cache, config.num_kv_heads, config.head_dim, dtype, keys=False),
    )


# ---- the transients of a step --------------------------------------------------------------
SCORE_LIVE = 2  # float32 copies of a chunk's attention scores alive at once (the scores, their softmax)


def workspace(
    config: ModelConfig, policy: Policy, *, itemsize: int, prompt_len: int, gen_len: int, block_logits: bool = False
) -> float:
    """Bytes of the largest step's transient tensors on the compute device: the prefill of one GPU
    batch (hidden-sized vectors, q/k/v, a chunk of attention scores and the mask bias; the MLP's
    intermediate activations), the head's last-position logits, or a decode step's decoded
    compressed cache. Counted from the shapes as the maths makes them; the allocator's slack on
    top is :class:`Footprint`'s. ``block_logits``: the whole block's last-position logits are
    held at once (a streamed head's, with several GPU batches)."""
    cfg, b, s = config, policy.gpu_batch_size, prompt_len
    h, heads, kv_dim = cfg.hidden_size, cfg.num_heads, cfg.kv_dim
    vector = b * s * h * itemsize  # one hidden-sized tensor of the prefill
    qkv = b * s * (heads * cfg.head_dim + 2 * kv_dim) * itemsize
    rows = min(s, max(1, SCORE_BYTES // (4 * b * heads * s)))  # attend's chunk of queries
    scores = SCORE_LIVE * 4 * b * heads * rows * s + (vector if rows < s else 0)  # the chunks' output
    family = get_family(cfg.family)
    bias = 4 * b * s * s + (4 * b * heads * s if family.position_bias is not None else 0)  # the mask, per-key biases
    expanded = 2 * b * s * heads * cfg.head_dim * itemsize if cfg.num_kv_heads < heads else 0  # GQA's k, v repeated
    # the norm's output, the attention's output and projection, the residual; q/k/v and their head-major copies
    attention = 4 * vector + 2 * qkv + scores + bias + expanded
    mlp = 3 * vector + b * s * (_mlp_width(cfg) + cfg.ffn_dim) * itemsize  # the up-projections and their activation
    head = b * cfg.vocab_size * (itemsize + 2 * 4)  # the last position's logits, as float32, their log-softmax
    head += (policy.block_size - b) * cfg.vocab_size * itemsize if block_logits else 0  # the other batches'
    decoded = 0
    if policy.compress_cache is not None:  # a decode step attends over a batch's keys and values, decoded
        decoded = 2 * b * (prompt_len + gen_len) * kv_dim * itemsize
    return float(max(attention, mlp, head, decoded))


@functools.lru_cache(maxsize=64)
def _mlp_width(config: ModelConfig) -> int:
    """Output features of a layer's up-projections (OPT's fc1; LLaMA's gate and up): the
    intermediate activations an MLP makes per token."""
    specs = part_weights(get_family(config.family).weight_specs(config), "mlp", 0)
    return sum(w.shape[0] for w in specs if w.shape[1:] == (config.hidden_size,))


# ---- the process ---------------------------------------------------------------------------
ALLOCATOR_SLACK = 2.0  # resident growth per byte of workspace with glibc's default thresholds (measured)
LEAN_SLACK = 1.0  # the same with lean_allocator()
# Above this share of a memory limit the engine makes the allocator lean. With the default one the
# heap's retained blocks grow over a run with the cache rows and activations moved through it, not
# only with the largest step: bloom-1b7 (float32, cache on disk, prompt 32) peaked at 3.8-4.0 GiB
# against 2.93 predicted at 64x1 and at 4.93 against 3.24 at 64x8 (killed under a 4 GB cgroup); with
# lean_allocator() at 2.65-2.68 against 2.75 (64x1), 2-15% slower (2026-12-03). The slack model holds
# for the lean allocator; for the default one it was off by up to +52%, hence about 1 / 1.65.
LEAN_ABOVE = 0.6


@dataclass(frozen=True)
class Footprint:
    """A run's peak memory: the engine's ``tracked`` bytes per tier, the largest step's
    ``workspace``, the host's peak while the weights are placed (``placing``:
    :func:`placing_peak`), the ``runtime_base``, and the allocator's ``slack`` on the workspace."""

    tracked: dict[str, float]
    workspace: float
    placing: float
    runtime_base: float
    on_cuda: bool
    weights: dict[str, float]  # stored weight bytes per tier
    slack: float = ALLOCATOR_SLACK

    @property
    def host(self) -> float:
        """Peak resident bytes of the process in host RAM (the cpu tier; without a GPU also the
        gpu tier and the workspace: one RAM): the run's or the placing's, whichever is more."""
        t = self.tracked
        run = t["cpu"] if self.on_cuda else t["gpu"] + t["cpu"] + self.slack * self.workspace
        return self.runtime_base + max(run, self.placing)

    @property
    def device(self) -> float:
        """Peak bytes on the GPU (its tier and the workspace); without one, :attr:`host`."""
        # torch's CUDA allocator keeps freed blocks for the next step's tensors of the same sizes:
        # the workspace once (an assumption: not yet measured on a GPU)
        return self.tracked["gpu"] + self.workspace if self.on_cuda else self.host

    def with_slack(self, slack: float) -> Footprint:
        return dataclasses.replace(self, slack=slack)

    def over_limit(self, limit: float) -> str | None:
        """None if the host peak fits ``limit`` bytes; else one line saying by how much, of what,
        and what to move."""
        if self.host <= limit:
            return None
        gib = 2**-30
        over = self.host - limit
        if limit <= self.runtime_base:
            return (
                f"the memory limit {limit * gib:.2f} GiB is below this process's runtime base "
                f"({self.runtime_base * gib:.2f} GiB: interpreter, torch, the model's metadata); no policy "
                "can run in it: raise the limit"
            )
        host = ("cpu",) if self.on_cuda else ("gpu", "cpu")
        engine = sum(self.tracked[t] for t in host)
        space = 0.0 if self.on_cuda else self.slack * self.workspace  # on a GPU the workspace is the device's
        weights = sum(self.weights[t] for t in host)
        cache = engine - weights  # and read buffers, working copies
        if self.placing >= engine + space:
            advice = (
                "that peak is placing the weights (the largest is read and converted whole): a checkpoint "
                "in the compute dtype needs less"
            )
        elif weights >= over:
            total = sum(self.weights.values()) or 1.0
            points = -(-100 * over // total)
            advice = (
                f"move at least {points:.0f} percentage points of the weights from the {'/'.join(host)} tier to disk"
            )
        elif cache >= over:
            advice = "put the KV cache on disk or compress it (compress_cache), or run fewer prompts per block"
        else:
            advice = "lower gpu_batch_size or the prompt length (the step's workspace), or offload more"
        return (
            f"the policy needs about {self.host * gib:.2f} GiB of host memory (runtime {self.runtime_base * gib:.2f}, "
            f"engine {engine * gib:.2f}, workspace {space * gib:.2f}; "
            f"placing weights peaks at {self.placing * gib:.2f}), {over * gib:.2f} GiB over the limit of "
            f"{limit * gib:.2f} GiB: {advice}, or raise the memory limit"
        )


def footprint(
    config: ModelConfig,
    policy: Policy,
    *,
    on_cuda: bool,
    itemsize: int,
    prompt_len: int,
    gen_len: int,
    num_prompts: int | None = None,
    layers: range | None = None,
    checkpoint_itemsize: int | None = None,
    runtime_base: float = 0.0,
    random_weights: bool = False,
    packs: bool = False,
) -> Footprint:
    """The :class:`Footprint` of running ``policy`` (arguments as :class:`~flexlab.cost.CostModel`'s;
    ``on_cuda``: whether the compute device is a GPU with its own memory; ``random_weights``: the
    weights are drawn, not read; ``packs``: the engine packs its memory tiers' matrices: see
    :func:`placing_peak`)."""
    stages = stages_of(config.num_layers, policy.sep_layer, layers)
    num_layers = config.num_layers if layers is None else len(layers)
    priced, weight_bytes, packed = price_weights(
        config,
        stages,
        policy.w_gpu_percent,
        policy.w_cpu_percent,
        policy.compress_weight,
        itemsize,
        checkpoint_itemsize,
        head_streams(on_cuda, policy.num_gpu_batches, policy.block_size, config.hidden_size),
    )
    tracked = engine_peak(
        config,
        policy,
        priced,
        weight_bytes,
        packed,
        on_cuda=on_cuda,
        itemsize=itemsize,
        prompt_len=prompt_len,
        gen_len=gen_len,
        num_prompts=num_prompts or policy.block_size,
        num_layers=num_layers,
    )
    if random_weights:  # drawn in float32, then scaled
        reading = 8
    elif checkpoint_itemsize is not None:  # safetensors read into a tensor, converted if its dtype differs
        reading = checkpoint_itemsize + (itemsize if checkpoint_itemsize != itemsize else 0)
    else:  # a .bin's map pages and the copy taken out of them (float32 where the dtype is unknown)
        reading = 4 + itemsize
    placing = placing_peak(
        config,
        tuple(stages),
        policy.w_gpu_percent,
        policy.w_cpu_percent,
        policy.compress_weight,
        on_cuda=on_cuda,
        itemsize=itemsize,
        reading=reading,
        in_place=checkpoint_itemsize is not None,
        packs=packs,
    )
    # a streamed head answers a group's batches together: their logits are held till the last one's
    held = policy.num_gpu_batches > 1 and any(st.streamed[0] for st in priced)
    return Footprint(
        tracked,
        workspace(config, policy, itemsize=itemsize, prompt_len=prompt_len, gen_len=gen_len, block_logits=held),
        placing,
        runtime_base,
        on_cuda,
        {t: float(v) for t, v in weight_bytes.items()},
    )


@functools.lru_cache(maxsize=256)
def placing_peak(
    config: ModelConfig,
    stages: tuple[Stage, ...],
    w_gpu_percent: float,
    w_cpu_percent: float,
    cw: QuantConfig | None,
    *,
    on_cuda: bool,
    itemsize: int,
    reading: int,
    in_place: bool = False,
    packs: bool = False,
) -> float:
    """Peak host bytes while the weights are placed, in the engine's order: those placed before
    on host tiers and the stage's weights waiting to be packed into its disk file, plus the
    weight being read — ``reading`` bytes per element (see :func:`footprint`: the tensor as read
    and its converted copy where the dtype differs) — and quantized (from the converted copy, into its
    codes, through :func:`quantize_workspace`'s temporaries).
    ``in_place``: uncompressed disk weights are read in place from a safetensors checkpoint, not
    read here; ``packs``: a matrix kept in memory is packed from the tensor read (both held at
    once). The token table comes first, before anything else is held: in small models it is
    this peak. Cached: the search prices thousands of policies that share a placement."""
    family = get_family(config.family)
    placement = place_weights(family.weight_specs(config), list(stages), w_gpu_percent, w_cpu_percent)
    host = ("cpu",) if on_cuda else ("gpu", "cpu")
    held, peak = 0, 0
    for items in placement:
        packing = 0  # a stage's disk weights are held until its file is written
        for spec, tier, first in items:
            if not first or (tier == "disk" and in_place and cw is None):
                continue  # placed by an earlier stage; read in place from the checkpoint
            qcfg = cw if compresses(spec, cw) else None
            stored = sum(qcfg.part_nbytes(spec.shape)) if qcfg is not None else spec.numel * itemsize
            transient = spec.numel * reading
            if packs and packs_matrix(spec, tier, cw, family.token_table):
                transient += spec.numel * itemsize
            if qcfg is not None:  # then quantized from its converted copy, slice by slice
                transient = max(transient, spec.numel * itemsize + stored + quantize_workspace(spec.shape, qcfg))
            peak = max(peak, held + packing + transient)
            if tier in host:
                held += stored
            elif tier == "disk":
                packing += stored
    return float(peak)


def lean_allocator() -> bool:
    """Make glibc return every freed block of 1 MiB or more to the operating system at once (a
    fixed ``M_MMAP_THRESHOLD``; by default the threshold rises to 32 MiB as large blocks are
    freed, and the heap keeps blocks that size for reuse). Halves the slack on the workspace
    (:data:`LEAN_SLACK`), at the price of fresh pages for each large tensor: about 20-30% slower
    prefills on a CPU (measured); with huge pages (:mod:`flexlab.hugepages`) 0.96-1.23x the
    default allocator's time. Process-wide; False where the C library has no ``mallopt``.
    An engine that made the allocator lean also trims the heap after every token (smaller
    tensors' holes: see :meth:`~flexlab.engine.block.BlockRun.compute_and_trim`)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
