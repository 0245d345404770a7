"""The cost model: bytes per link, time and peak memory per tier of one policy, and why.

It walks the same placement and schedule the engine runs (``place_weights``, ``make_stages``,
the KV codec), so its byte counts are the engine's, exactly; times come from a
:class:`~flexlab.cost.hardware.HardwareProfile`:

* compute of a stage and GPU batch: a fixed step overhead, plus a roofline for the matmuls
  (``max(FLOPs / matmul_flops, weight bytes / weight_read_bw)``; on a CPU, the token's later
  batches read a stage that fits the last-level cache at ``llc_weight_read_bw``), plus attention over the cache
  (bytes / ``attention_bw``; on the CPU for host rows with ``cpu_cache_compute``), plus
  dequantizing compressed weights once per stage;
* I/O of a stage: the disk (weights, cache and activation reads and writes share it) and the
  host↔device link, each its own resource;
* with overlap a stage takes the longest of compute, disk and link; without, their sum.

    >>> from flexlab import Policy, get_preset
    >>> from flexlab.cost import CostModel, get_hardware
    >>> cm = CostModel(get_preset("opt-6.7b"), Policy.from_percent([0, 100, 100, 0, 100, 0], gpu_batch_size=8),
    ...                get_hardware("colab-t4"), prompt_len=512, gen_len=32)
    >>> p = cm.predict()
    >>> p.bottleneck                          # the weights cross PCIe for every token
    'link'
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from flexlab.cost.hardware import HardwareProfile
from flexlab.cost.prediction import Prediction
from flexlab.cost.probes import DEQUANT_PROBE_WIDTHS
from flexlab.cost.sparse import value_gather
from flexlab.cost.weight_reads import convert_rate, head_reads, row_reads
from flexlab.engine.footprint import Footprint, footprint, kv_codecs
from flexlab.engine.placement import TIERS, head_streams, split_by_share, tied_front
from flexlab.engine.policy import Policy
from flexlab.engine.schedule import stages_of
from flexlab.engine.stage_cost import price_weights
from flexlab.errors import FlexlabError
from flexlab.models.config import ModelConfig
from flexlab.models.registry import get_family


class CostModel:
    """Time, bytes and memory of ``policy`` for ``config`` on ``hw``; see the module docstring.

    ``num_prompts`` defaults to one block (``policy.block_size``); prompts all have ``prompt_len``
    tokens; ``itemsize`` is the compute dtype's (2: float16/bfloat16). ``layers``: only those
    layers (a pipeline rank's share, with the embedding if they start at 0 and the head if they
    end at the last; see :mod:`flexlab.cost.pipeline`). ``checkpoint_itemsize``: the bytes per
    element of a safetensors checkpoint, from which the engine reads uncompressed disk weights in
    place (:func:`checkpoint_itemsize` of a Model); None: the engine writes them itself, in the
    compute dtype (random weights, ``.bin`` checkpoints, compressed weights).
    """

    def __init__(
        self,
        config: ModelConfig,
        policy: Policy,
        hw: HardwareProfile,
        *,
        prompt_len: int,
        gen_len: int,
        itemsize: int = 2,
        num_prompts: int | None = None,
        layers: range | None = None,
        checkpoint_itemsize: int | None = None,
        shared: dict | None = None,
    ) -> None:
        if not isinstance(prompt_len, int) or not isinstance(gen_len, int) or prompt_len < 1 or gen_len < 1:
            raise FlexlabError(f"prompt_len={prompt_len!r} and gen_len={gen_len!r} must be ints >= 1")
        if prompt_len + gen_len > config.max_positions:
            raise FlexlabError(
                f"prompt_len + gen_len = {prompt_len + gen_len} exceeds {config.name}'s "
                f"{config.max_positions} positions"
            )
        self.config, self.policy, self.hw = config, policy, hw
        self.prompt_len, self.gen_len, self.itemsize = prompt_len, gen_len, itemsize
        self.num_prompts = num_prompts or policy.block_size
        self.stages = stages_of(config.num_layers, policy.sep_layer, layers)
        self.num_layers = config.num_layers if layers is None else len(layers)
        # the engine packs its memory tiers' matrices where the profile measured the packed rate
        self.packs = bool(hw.packed_weight_read_bw) and itemsize == 2 and not hw.has_link
        self._stage, weight_bytes, _ = price_weights(
            config,
            self.stages,
            policy.w_gpu_percent,
            policy.w_cpu_percent,
            policy.compress_weight,
            itemsize,
            checkpoint_itemsize,
            head_streams(hw.has_link, policy.num_gpu_batches, policy.block_size, config.hidden_size),
            self.packs,
        )
        self.weight_bytes = dict(weight_bytes)  # stored bytes per tier (the cached original stays as it was)
        self.codecs = dict(zip("kv", kv_codecs(config, policy, itemsize)))
        self.layers, self.checkpoint_itemsize = layers, checkpoint_itemsize
        # The walk prices the same (stage class, batch tiers, token) many times: every decode token
        # of a stage without a cache costs the same, and every layer's attention the same for one
        # token. Prices depend on nothing but their arguments and this model, so each is kept. A
        # layer's attention over its cache does not depend on where the weights are: models of one
        # search (``shared``: a dict they all get; the same config, hardware, dtype and prompt) that
        # differ only there share those prices (a search's neighbours mostly move weights).
        self._priced: dict[tuple, tuple] = {}
        self._cache_prices: dict[tuple, tuple] = (
            {}
            if shared is None
            else shared.setdefault((policy.compress_cache, policy.cpu_cache_compute, policy.attn_sparsity), {})
        )

    def tied_front(self) -> float | None:
        """The weight percent that puts the tied weights alone on the cpu tier, where that
        matters to the read buffers (see :func:`~flexlab.engine.placement.tied_front`)."""
        return tied_front(get_family(self.config.family).weight_specs(self.config), self.stages)

    # ---- bytes --------------------------------------------------------------------------
    def _blocks(self) -> list[list[dict[str, int]]]:
        """Per block, per GPU batch: sequences on each tier (the engine's split)."""
        p, bs = self.policy, self.policy.gpu_batch_size
        out = []
        for first in range(0, self.num_prompts, p.block_size):
            n = min(p.block_size, self.num_prompts - first)
            tiers = split_by_share([1] * n, p.cache_gpu_percent, p.cache_cpu_percent)
            out.append([{t: tiers[i : i + bs].count(t) for t in TIERS} for i in range(0, n, bs)])
        return out

    # ---- the walk ----------------------------------------------------------------------
    def predict(self) -> Prediction:
        """Walk every token, stage and batch of every block; sum times and bytes.

        Stages with the same weights, shapes and position in the chain cost the same, and so do
        GPU batches with the same tiers: each distinct (stage, batch) is priced once per token and
        counted as often as it occurs, which keeps the walk's result and makes it fast enough for
        the search (a 96-layer model has ~200 stages but only a handful of distinct ones)."""
        p, priced, cache_priced = self.policy, self._priced, self._cache_prices
        reps, of_stage = self._stage_classes()
        counts = Counter(of_stage)
        attends = [("attention" in self._stage[j].parts) for j in reps]
        totals = [[0.0, 0.0, 0.0] for _ in reps]  # per class: compute, disk, link seconds of one member
        uses: Counter = Counter()  # how often each priced (stage or cache, token) occurs: for the bytes
        prefill = decode = 0.0
        for batches in self._blocks():
            groups = Counter(tuple(seqs[t] for t in TIERS) for seqs in batches)  # distinct batches, counted
            shape = tuple(groups.items())
            for t in range(self.gen_len):
                tokens = self.prompt_len if t == 0 else 1
                cached = 0 if t == 0 else self.prompt_len + t - 1
                step_s = 0.0
                cache_key: tuple = ("cache", shape, tokens, cached)
                if any(attends) and cache_key not in cache_priced:  # a layer's cache: the same for every layer
                    cache_priced[cache_key] = self._cache_token(groups, tokens, cached)
                for c, j in enumerate(reps):
                    count = counts[c]
                    key: tuple = ("stage", j, shape, tokens)
                    if key not in priced:
                        priced[key] = self._stage_token(j, groups, tokens)
                    compute, disk, lnk, _ = priced[key]
                    uses[key] += count
                    if attends[c]:
                        ac, ad, al, _ = cache_priced[cache_key]
                        compute, disk, lnk = compute + ac, disk + ad, lnk + al
                        uses[cache_key] += count
                    row = totals[c]
                    row[0], row[1], row[2] = row[0] + compute, row[1] + disk, row[2] + lnk
                    step_s += count * (max(compute, disk, lnk) if p.overlap else compute + disk + lnk)
                if t == 0:
                    prefill += step_s
                else:
                    decode += step_s
        kinds = dict.fromkeys(
            ("load_weight", "load_cache", "store_cache", "load_act", "store_act", "gather_values", "read_head"), 0.0
        )
        for key, n in uses.items():
            for kind, v in (priced if key[0] == "stage" else cache_priced)[key][3].items():
                kinds[kind] += n * v
        stage_rows: list[dict[str, Any]] = [
            {"stage": st.name, **dict(zip(("compute_s", "disk_s", "link_s"), totals[c]))}
            for st, c in zip(self._stage, of_stage)
        ]
        busy = {k: sum(r[f"{k}_s"] for r in stage_rows) for k in ("compute", "disk", "link")}
        total = prefill + decode
        fp = self.footprint()
        return Prediction(
            prefill,
            decode,
            self.num_prompts * self.gen_len / total if total else float("inf"),
            fp.tracked,
            kinds,
            stage_rows,
            max(busy, key=lambda kind: busy[kind]),
            title=f"{self.config.name} on {self.hw.name} (prompt {self.prompt_len}, gen {self.gen_len}, "
            f"{self.num_prompts} prompts)",
            policy=self.policy,
            hw=self.hw,
            footprint=fp,
        )

    def _stage_classes(self) -> tuple[list[int], list[int]]:
        """Stages that cost the same: (the first stage of each class, each stage's class). A
        stage's cost depends on its weights and shapes, and on whether its activations come from
        and go to other stages (the first and the last stage differ)."""
        reps: list[int] = []
        of_stage: list[int] = []
        seen: dict[tuple, int] = {}
        for j, st in enumerate(self._stage):
            key = (
                st.parts,
                st.matmul_params,
                tuple(st.w_bytes[t] for t in TIERS),
                st.dequant_elems,
                st.dequant_mats,
                st.row_table,
                st.batch_dequant_elems,
                st.elementwise,
                st.converted_elems,
                st.streamed,
                j > 0,
                j < len(self._stage) - 1,
            )
            if key not in seen:
                seen[key] = len(reps)
                reps.append(j)
            of_stage.append(seen[key])
        return reps, of_stage

    def _stage_token(self, j: int, groups: Counter, tokens: int):
        """Compute, disk and link seconds of stage ``j`` for one token over the block's batches
        (``groups``: each distinct batch's sequences per tier, and how many batches are so), and
        the bytes it moves by kind; its KV cache apart (:meth:`_cache_token`)."""
        hw, p, cfg, st = self.hw, self.policy, self.config, self._stage[j]
        link = hw.has_link
        moved = dict.fromkeys(("load_weight", "load_cache", "store_cache", "load_act", "store_act", "read_head"), 0.0)
        compute = disk = lnk = 0.0
        # weights: one load per stage and token serves every batch (a looked-up token table apart)
        table_tier, table_bytes, row_bytes = st.looked_up
        looked_up = table_tier == "disk" or (table_tier == "cpu" and link)
        streamed = st.streamed[0]  # the head's matrix, read a slice at a time: not part of the load
        w_disk = st.w_bytes["disk"] - (table_bytes if table_tier == "disk" else 0) - streamed
        w_cpu = st.w_bytes["cpu"] - (table_bytes if table_tier == "cpu" else 0) if link else 0
        moved["load_weight"] += w_disk + w_cpu
        disk += w_disk / hw.disk_read_bw
        if link:  # cpu weights cross the link, and disk weights too on their way to the GPU
            lnk += w_cpu / (hw.link_pinned_bw if p.pin_weight else hw.link_pageable_bw) + w_disk / hw.link_pinned_bw
        if st.converted_elems and not link:  # converted after each read, on the lane that read it: in series
            disk += st.converted_elems / convert_rate(hw, self.checkpoint_itemsize, self.itemsize)
        if st.dequant_elems:
            compute += st.dequant_elems / self._dequant_rate() + st.dequant_mats * hw.dequant_call_s
        if w_disk or w_cpu:  # a load on a lane (else inline)
            compute += hw.transfer_overhead_s
        if w_disk:  # one request: the stage's packed file
            disk += hw.disk_latency_s
            if p.overlap:  # read beside a compute, whose cores the reader's threads take
                compute += w_disk / 1e9 * hw.disk_stall_s_per_gb
        if streamed:  # its slices on the weight lane, once for all batches
            rate = convert_rate(hw, self.checkpoint_itemsize, self.itemsize)
            slices_s, first = head_reads(hw, st.streamed, self.itemsize, rate)
            disk += slices_s
            if p.overlap:  # the compute waits for the first slice; the reader takes cores beside it
                compute += first + streamed / 1e9 * hw.disk_stall_s_per_gb
            moved["read_head"] += streamed
        last = len(self._stage) - 1
        # the head projects each sequence's last position only: generation needs no other logits
        projected = 1 if "head" in st.parts else tokens
        # A stage's weights that fit a CPU's last-level cache are read from memory by the token's
        # first batch; the batches after it find them there (opt-125m's layers in float32 on a
        # 32 MiB L3: the decode's matmuls ran at 1.5x the memory's bandwidth, measured). A streamed
        # head projects every batch's rows in one pass over its matrix.
        from_memory = 1 if 0 < st.w_device_bytes <= hw.llc_bytes or streamed else sum(groups.values())
        for tiers, m in groups.items():
            b = sum(tiers)
            flops_s = st.flops_per_token * b * projected / hw.matmul_flops
            reads = min(m, from_memory)  # this group's batches that read the weights from memory
            from_memory -= reads
            # the later batches read them from that cache, at its rate for a few rows (0: unmeasured)
            cached_s = (
                st.read_s(self.itemsize, hw.llc_weight_read_bw, hw.packed_llc_weight_read_bw) if not streamed else 0.0
            )
            read_s = st.read_s(self.itemsize, hw.weight_read_bw, hw.packed_weight_read_bw)
            c = hw.step_overhead_s + (reads * max(flops_s, read_s) + (m - reads) * max(flops_s, cached_s)) / m
            # the elementwise work around the matmuls (norms, bias, GELU, residuals)
            c += st.elementwise * b * tokens * cfg.hidden_size * self.itemsize / hw.attention_bw
            d = lk = 0.0
            if st.row_table:  # the rows looked up, plus the stage's other matrices
                rows = min(b * tokens, cfg.vocab_size)
                c += (rows * st.row_table + st.batch_dequant_elems) / self._dequant_rate()
            if looked_up:  # read by the compute, for each batch: its ids' rows of the token table
                c += row_reads(hw, table_tier, table_bytes, row_bytes, min(b * tokens, cfg.vocab_size))
            if p.act_tier != "gpu":
                h = b * tokens * cfg.hidden_size * self.itemsize
                n_moves = (j > 0) + (j < last)
                moved["load_act"] += m * h * (j > 0)
                moved["store_act"] += m * h * (j < last)
                if link or p.act_tier == "disk":  # else inline: the cpu tier is the CPU's RAM
                    c += n_moves * hw.transfer_overhead_s
                if p.act_tier == "disk":
                    d += h * ((j > 0) / hw.disk_read_bw + (j < last) / hw.disk_write_bw)
                    d += n_moves * hw.disk_latency_s
                elif link:
                    lk += n_moves * h / hw.link_pageable_bw
            compute, disk, lnk = compute + m * c, disk + m * d, lnk + m * lk
        return compute, disk, lnk, moved

    def _dequant_rate(self) -> float:
        """Elements/s dequantizing this model's matrices: the profile's one rate, or on a CPU,
        measured on layers of two widths (:func:`~flexlab.cost.probes.dequant_rates`), the rate
        at this model's width, geometric between them and held beyond them."""
        hw = self.hw
        if not hw.small_dequant_elems:
            return hw.dequant_elems
        narrow, wide = DEQUANT_PROBE_WIDTHS
        where = min(max(math.log(self.config.hidden_size / narrow) / math.log(wide / narrow), 0.0), 1.0)
        return hw.small_dequant_elems ** (1 - where) * hw.dequant_elems**where

    def _cache_token(self, groups: Counter, tokens: int, cached: int):
        """As :meth:`_stage_token`, for one layer's attention over its KV cache: the attention
        maths, the cache's loads and stores, and the lanes' cost of those transfers."""
        moved = {"load_cache": 0.0, "store_cache": 0.0, "gather_values": 0.0}
        compute = disk = lnk = 0.0
        for tiers, m in groups.items():
            seqs = dict(zip(TIERS, tiers))
            c, d, lk, kv_moved = self._attention(seqs, sum(tiers), tokens, cached)
            if seqs["disk"] or (self.hw.has_link and seqs["cpu"]):  # a load (decode) and a store on lanes
                c += self.hw.cache_transfer_overhead_s * (1 + (cached > 0))
            for kind, v in kv_moved.items():
                moved[kind] += m * v
            compute, disk, lnk = compute + m * c, disk + m * d, lnk + m * lk
        return compute, disk, lnk, moved

    def _attention(self, seqs: dict[str, int], b: int, tokens: int, cached: int):
        """Compute, disk and link seconds and bytes by kind for one batch's attention."""
        hw, p = self.hw, self.policy
        link = hw.has_link
        compute = disk = lnk = 0.0
        moved = {"load_cache": 0.0, "store_cache": 0.0, "gather_values": 0.0}
        hidden_bytes = self.config.kv_dim * self.itemsize  # one token's keys (or values) in one layer
        # attention maths: the prefill is compute-bound, decode streams the cache
        if tokens > 1:
            compute += 4.0 * b * tokens * tokens * self.config.hidden_size / hw.matmul_flops
        else:
            host = seqs["cpu"] if p.cpu_cache_compute else 0
            compute += (b - host) * 2 * (cached + 1) * hidden_bytes / hw.attention_bw
            compute += host * 2 * (cached + 1) * hidden_bytes / hw.cpu_attention_bw
        for kv, codec in self.codecs.items():
            rows = codec.stored_tokens(cached) // codec.chunk
            if kv == "v" and p.attn_sparsity < 1:
                rows = 0  # read later, inside the compute, only the kept rows (below)
            new_rows = (codec.stored_tokens(cached + tokens) - codec.stored_tokens(cached)) // codec.chunk
            for tier in ("cpu", "disk"):
                n = seqs[tier]
                load = 0 if tier == "cpu" and (not link or p.cpu_cache_compute) else n * rows * codec.row_bytes
                store = n * new_rows * codec.row_bytes if (tier == "disk" or link) else 0
                moved["load_cache"] += load
                moved["store_cache"] += store
                if tier == "disk":  # the batch's rows are one read and its new rows one write
                    disk += load / hw.disk_read_bw + store / hw.disk_write_bw
                    disk += ((load > 0) + (store > 0)) * hw.disk_latency_s
                    lnk += (load + store) / hw.link_pinned_bw if link else 0.0
                else:
                    lnk += (load + store) / hw.link_pinned_bw if link else 0.0
            # dequantize what was read, quantize the rows that leave the tail (the rows attended on the
            # host with cpu_cache_compute are decoded there; charged at the same rate: not calibrated apart)
            if codec.config is not None:
                compute += b * (rows + new_rows) * codec.chunk * self.config.kv_dim / hw.kv_codec_elems
                compute += ((rows > 0) + (new_rows > 0)) * hw.kv_codec_call_s  # a decode and a quantize call
        if p.attn_sparsity < 1 and tokens == 1:
            gather = value_gather(hw, p, self.codecs["v"], self.config.num_heads, seqs, cached)
            own_s, disk_s, link_s, moved["gather_values"] = gather
            compute, disk, lnk = compute + own_s + disk_s + link_s, disk + disk_s, lnk + link_s
        return compute, disk, lnk, moved

    # ---- memory ------------------------------------------------------------------------
    def peak_bytes(self) -> dict[str, float]:
        """Peak bytes per tier as the engine accounts them (:func:`~flexlab.engine.footprint.engine_peak`)."""
        return self.footprint().tracked

    def footprint(self) -> Footprint:
        """The whole process's peak (:class:`~flexlab.engine.footprint.Footprint`), with the
        hardware profile's runtime base."""
        return footprint(
            self.config,
            self.policy,
            on_cuda=self.hw.has_link,
            itemsize=self.itemsize,
            prompt_len=self.prompt_len,
            gen_len=self.gen_len,
            num_prompts=self.num_prompts,
            layers=self.layers,
            checkpoint_itemsize=self.checkpoint_itemsize,
            runtime_base=self.hw.runtime_base_bytes,
            packs=self.packs,
        )

    def explain(self) -> str:
        """The answer in a few lines (:meth:`Prediction.summary`), then seconds per stage."""
        pred = self.predict()
        return pred.summary() + "\n" + pred.stage_table()
