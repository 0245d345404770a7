"""One block of sequences through the schedule: its state, and what each step does to it.

The schedule says *when*; the handlers here say *what*, one per kind of step: bring a stage's
weights, a batch's cache or hidden state to the compute device, run the family's maths on it, and
put the results back. The maths is the same code the reference path calls; what becomes of the
last hidden state is the :mod:`~flexlab.engine.head_stage`'s business. A block sees the engine
only through a :class:`BlockContext`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from flexlab.compress import QTensor, dequantize
from flexlab.engine.acts import ActStore
from flexlab.engine.cache import KV, CacheStore, LoadedCache
from flexlab.engine.context import BlockContext, Peers
from flexlab.engine.head_stage import HeadStage
from flexlab.engine.heads import Head
from flexlab.engine.kvcodec import KVCodec
from flexlab.engine.positions import TokenPlaces
from flexlab.engine.schedule import Step, block_schedule
from flexlab.engine.sparse import sparse_decode
from flexlab.engine.tiers import return_freed_memory
from flexlab.models.attention import attend, decode_attention
from flexlab.models.generation import left_pad


class BlockRun:
    """Runs one block of sequences (``head.ids``) for ``head.num_tokens`` tokens; the head says
    what becomes of each token's hidden state (see :mod:`flexlab.engine.heads`)."""

    def __init__(self, ctx: BlockContext, head: Head) -> None:
        self.ctx, self.head, self.num_tokens = ctx, head, head.num_tokens
        self._stage = {s.index: s for s in ctx.stages}  # a pipeline rank holds a run of them
        policy, cfg = ctx.policy, ctx.config
        batches = head.prefill_ids()
        self.width = max(len(s) for b in batches for s in b)
        self.tokens, self.valid = [], []  # per batch: the prefill's ids and which slots hold tokens
        for b in batches:  # every batch padded to the block's width, so cache positions line up
            tokens, valid = left_pad(b, cfg.padding_id, ctx.device, width=self.width)
            self.tokens.append(tokens)
            self.valid.append(valid)
        n = len(head.ids)
        layers = len({s.layer for s in ctx.stages if s.has_cache})  # this rank's, in a pipeline
        capacity = self.width + max(self.num_tokens - 1, 0)
        self.codecs = {
            kv: KVCodec(policy.compress_cache, cfg.num_kv_heads, cfg.head_dim, ctx.dtype, keys=kv == "k") for kv in KV
        }
        disk_seqs = round(n * policy.cache_disk_percent / 100)
        ctx.check_space(
            layers * disk_seqs * sum(-(-capacity // c.chunk) * c.row_bytes for c in self.codecs.values()),
            "the disk share of the KV cache",
        )
        self.cache = CacheStore(
            policy,
            [len(b) for b in batches],
            capacity,
            self.codecs,
            ctx.device,
            ctx.subdir("cache"),
            ctx.files,
            ctx.tracker,
        )
        # A compressed cache keeps its newest tokens in full precision on the device (see kvcodec).
        self.tails: dict[tuple[int, int, str], torch.Tensor] = {}
        self.tail_bytes = sum(layers * n * c.max_tail * cfg.kv_dim * ctx.dtype.itemsize for c in self.codecs.values())
        ctx.tracker.add("gpu", "kv tail", self.tail_bytes)
        self.acts = None
        if policy.act_tier != "gpu":
            slot_bytes = policy.gpu_batch_size * self.width * cfg.hidden_size * ctx.dtype.itemsize  # the prefill's
            self.acts = ActStore(policy.act_tier, ctx.device, slot_bytes, ctx.subdir("act"), ctx.files, ctx.tracker)
        self.where = TokenPlaces(self.valid, cfg, ctx.family)
        self.stopped = False  # a pipeline rank was told to stop
        self.head_stage = HeadStage(ctx, head, len(batches))

    # ---- running -----------------------------------------------------------------------
    def run(self) -> tuple[list, float, float]:
        """Run the block; returns its timeline events, prefill seconds and decode seconds."""
        ctx = self.ctx
        overlap = ctx.policy.overlap
        steps = block_schedule(
            self.num_tokens,
            ctx.stages,
            len(self.tokens),
            prefetch=1 if overlap else 0,
            act_moves=self.acts is not None,
            cache_ahead=self.cache.read_ahead if overlap else 0,
            peers=ctx.peers is not None,
            groups=ctx.groups,
            defer_head=bool(ctx.weights.streamed),
        )
        handlers: dict[str, Callable] = {
            "load_weight": self.load_weight,
            "release_weight": self.release_weight,
            "load_cache": self.load_cache,
            "release_cache": self.release_cache,
            "load_act": self.load_act,
            "compute": self.compute_and_trim if ctx.lean else self.compute,
            "store_cache": self.store_cache,
            "store_act": self.store_act,
            "recv": self.recv,
            "send": self.send,
            "inline": self.moves_nothing,
        }
        # In a pipeline only a word from the previous rank stops a rank: the last one, where the
        # head sees every sequence stop, still owes the next tokens' message (the stop) and must
        # take in what the other ranks computed meanwhile.
        should_stop = self.head.finished if ctx.peers is None else (lambda: self.stopped)
        if ctx.peers is not None:
            ctx.peers.reset()
        start = time.perf_counter()
        try:
            ctx.executor.run(steps, handlers, should_stop)
            if self.stopped and not self._peers.is_last:
                self._peers.send(None)  # pass the stop on (after every earlier send: the run drained them)
        finally:
            self.cache.close()
            self.tails.clear()
            ctx.tracker.sub("gpu", "kv tail", self.tail_bytes)
            if self.acts is not None:
                self.acts.close()
        end = time.perf_counter()
        prefill_done = self.head.prefill_done or end
        return ctx.executor.events(), prefill_done - start, end - prefill_done

    @property
    def _peers(self) -> Peers:
        assert self.ctx.peers is not None, "a pipeline's step in a run of one process"
        return self.ctx.peers

    @property
    def _acts(self) -> ActStore:
        assert self.acts is not None, "an activation step while hidden states stay in memory"
        return self.acts

    # ---- transfers ---------------------------------------------------------------------
    def moves_nothing(self, step: Step) -> bool:
        """Whether a transfer step's data is already where the compute reads it (the gpu tier; on
        a CPU-only machine the cpu tier too, the same RAM): then it runs inline, not on a lane."""
        if step.kind == "load_weight":
            return self.ctx.weights.resident[step.stage]
        if step.kind in ("load_cache", "store_cache"):
            return self.cache.resident[step.batch_index]
        if step.kind in ("recv", "send"):
            return False
        return self.acts is not None and self.acts.tier == "cpu" and self.ctx.device.type == "cpu"

    def load_weight(self, step: Step):
        weights, moved = self.ctx.weights.load(step.stage)
        return weights, sum(moved.values())

    def release_weight(self, key, loaded) -> None:
        self.ctx.weights.release(loaded)

    def _cached_tokens(self, t: int) -> int:
        """Tokens in the cache when token ``t`` is computed (the prefill is token 0)."""
        return 0 if t == 0 else self.width + t - 1

    def load_cache(self, step: Step):
        layer = self._stage[step.stage].layer_index
        n = self._cached_tokens(step.token)
        rows = {kv: c.stored_tokens(n) // c.chunk for kv, c in self.codecs.items()}
        if self.ctx.policy.attn_sparsity < 1:  # sparse attention reads only the value rows it keeps
            rows["v"] = 0
        loaded, moved = self.cache.load(layer, step.batch_index, rows, cpu_rows_stay=self.ctx.policy.cpu_cache_compute)
        return loaded, sum(moved.values())

    def release_cache(self, key, loaded: LoadedCache) -> None:
        self.cache.release(loaded)

    def store_cache(self, step: Step, computed: dict) -> int:
        if computed["kv"] is None:  # nothing will read it
            return 0
        layer = self._stage[step.stage].layer_index
        moved = 0
        for kv, (rows, start) in computed["kv"].items():
            if rows.shape[1]:
                moved += sum(self.cache.store(layer, step.batch_index, kv, rows, start).values())
        return moved

    def load_act(self, step: Step):
        return self._acts.load(step.batch_index)

    def store_act(self, step: Step, computed: dict) -> int:
        return self._acts.store(step.batch_index, computed["h"])

    def recv(self, step: Step):
        return self._peers.recv(self.ctx.device)

    def send(self, step: Step, computed: dict) -> int:
        if computed.get("stop"):
            return self._peers.send(None)
        return self._peers.send(computed["next"] if "next" in computed else computed["h"])

    # ---- compute -----------------------------------------------------------------------
    def compute_and_trim(self, step: Step, inputs: dict) -> dict:
        """:meth:`compute`, then, after a token's last step, freed heap memory goes back to the
        system. Tensors under the mmap threshold (a decode step's hidden states, its attention
        scores, which grow by a key each token) leave holes in glibc's heap that later, larger
        ones do not fit: resident memory grew with every token, 1.3 MiB per layer and token for
        bloom-1b7 in float32 at batch 64x8, and a search's pick was killed near the end of its
        run (2026-12-03). A trim walks the heap: ~6 ms over 3,000 live blocks of 1.1 GB here, more
        when it hands much back; once per token, not per step."""
        out = self.compute(step, inputs)
        if step.stage == self.ctx.stages[-1].index and step.batch_index == len(self.tokens) - 1:
            return_freed_memory()
        return out

    def compute(self, step: Step, inputs: dict) -> dict:
        """The family's maths for one stage and batch; inputs come from the steps it waited on.
        Returns the new hidden state and cache rows, or, from the head, the next token ids."""
        t, j, k = step.token, step.stage, step.batch_index
        ctx = self.ctx
        stage, f, cfg = self._stage[j], ctx.family, ctx.config
        loaded = next(v for key, v in inputs.items() if key[0] == "load_weight")  # the group's load
        x = self.tokens[k] if t == 0 and "embed" in stage.parts else self._input(step, inputs)
        if x is None:  # the previous rank says the pipeline stops here
            self.stopped = True
            return {"h": None, "kv": None}
        if "head" in stage.parts and ctx.peers is not None and self.head.finished():
            # The last rank of a pipeline, still taking in what was computed before the others
            # heard of the stop: the head must not run (a sampler would draw, and the next block
            # draw differently from one process).
            return {"next": None, "stop": True}
        if "embed" in stage.parts:
            w, ids = self._embedding_weights(step, loaded, x if t == 0 else x[:, None])
            h = f.embed(w, cfg, ids, self.where.positions(t, k))
        else:
            w, h = self._weights(step, loaded), x

        kv = None
        if "attention" in stage.parts:
            layer = stage.layer_index
            q, k_new, v_new = f.attention_qkv(w, cfg, h, self.where.positions(t, k), self.where.length(t))
            if t == 0:
                o = attend(q, k_new, v_new, self.where.bias(t, k))
            else:
                cache = self._with_tail(step, layer, inputs[("load_cache", t, j, k)])
                bias = self.where.decode_bias(t, k)
                if ctx.policy.attn_sparsity < 1:
                    o = self._sparse_attention(step, layer, q, k_new, v_new, cache, bias)
                else:
                    o = decode_attention(q, k_new, v_new, cache.k, cache.v, bias, cache.host())
            h = f.attention_out(w, cfg, h, o)
            if self.head.keeps_cache:  # the cache takes the new keys and values token-major, as stored
                kv = self._to_store(step, layer, {"k": k_new.transpose(1, 2), "v": v_new.transpose(1, 2)})
        if "mlp" in stage.parts:
            h = f.mlp(w, cfg, h)
        if "head" in stage.parts:
            return self.head_stage.compute(step, w, h)
        return {"h": h, "kv": kv}

    def _input(self, step: Step, inputs: dict) -> torch.Tensor | None:
        """What the stage reads: the hidden state (the next tokens, for the embedding) from the
        previous rank, from the activation store, or in memory from the compute before it."""
        t, j, k = step.token, step.stage, step.batch_index
        for key in (("recv", t, j, k), ("load_act", t, j, k)):
            if key in inputs:
                return inputs[key]
        if j == 0:
            return inputs[("compute", t - 1, self.ctx.stages[-1].index, k)]["next"]
        return inputs[("compute", t, j - 1, k)]["h"]

    def _weights(self, step: Step, loaded) -> dict:
        """A loaded stage's weights, compressed ones dequantized (once per stage and token)."""
        if self.ctx.policy.compress_weight is None:
            return loaded.tensors
        if loaded.dequantized is None:
            self.ctx.executor.timed("dequantize_weight", step, lambda: self.ctx.weights.dequantized(loaded))
        return loaded.dequantized

    def _embedding_weights(self, step: Step, loaded, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The embed stage's weights for looking up ``ids``. A token table the load left where it
        lies (on disk; in host memory beside a GPU) gives only the rows of the ids at hand, and a
        compressed one is dequantized only there; the ids are renumbered to match."""
        name, weights = self.ctx.family.token_table, self.ctx.weights
        executor, dtype = self.ctx.executor, self.ctx.dtype
        if step.stage in weights.looked_up:
            unique, local = ids.unique(return_inverse=True)
            read = executor.timed("read_rows", step, lambda: weights.rows(step.stage, unique), moves_bytes=True)
            if isinstance(read, QTensor):
                read = executor.timed("dequantize_weight", step, lambda: dequantize(read, dtype))
            return {**self._weights(step, loaded), name: read}, local
        table = loaded.tensors.get(name)
        if not isinstance(table, QTensor) or table.config.group_dim % 2 != 1:
            return self._weights(step, loaded), ids
        unique, local = ids.unique(return_inverse=True)

        def rows() -> dict:
            out = {
                n: dequantize(t, dtype) if isinstance(t, QTensor) else t for n, t in loaded.tensors.items() if n != name
            }
            out[name] = dequantize(table.rows(unique), dtype)
            return out

        return executor.timed("dequantize_weight", step, rows), local

    def _with_tail(self, step: Step, layer: int, loaded: LoadedCache) -> LoadedCache:
        """The loaded rows as keys/values ``[b, heads, tokens, d]``: dequantized, then the
        full-precision tail appended. Rows kept on the host (``cpu_cache_compute``) are decoded
        there, where their attention runs, and take their sequences' share of the tail along."""
        out: dict[str, torch.Tensor | None] = {}
        host: dict[str, torch.Tensor | None] = {}
        span = loaded.host_span
        for kv in KV:
            codec, rows, kept = self.codecs[kv], getattr(loaded, kv), getattr(loaded, f"host_{kv}")
            tail = self.tails.get((layer, step.batch_index, kv))
            host_tail = None
            if span is not None and tail is not None:  # the tail covers the batch: split it as the rows are
                first, count = span
                tail, host_tail = torch.cat([tail[:first], tail[first + count :]]), tail[first : first + count]
            out[kv] = None if rows is None else self._decoded(step, codec, rows, tail).transpose(1, 2)
            if kept is not None:
                # float16 is slow on CPUs: decode in float32 there, as the attention reads it
                cpu_dtype = torch.float32 if self.ctx.dtype == torch.float16 else None
                host[kv] = self._decoded(step, codec, kept, host_tail, cpu_dtype).transpose(1, 2)
        return LoadedCache(out["k"], out["v"], host.get("k"), host.get("v"), span)

    def _decoded(self, step: Step, codec, rows, tail, dtype=None) -> torch.Tensor:
        """Stored rows as ``[b, tokens, heads, d]``, the full-precision ``tail`` appended."""
        x = (
            rows
            if codec.config is None
            else self.ctx.executor.timed("dequantize_cache", step, lambda: codec.decode(rows, dtype))
        )
        return x if tail is None else torch.cat([x, tail.to(x.device, x.dtype)], dim=1)

    def _sparse_attention(
        self,
        step: Step,
        layer: int,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        cache: LoadedCache,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """Top-k attention (:mod:`~flexlab.engine.sparse`); the kept value rows are gathered from
        the cache's tiers and decoded here, each a timed event on the compute lane."""
        codec, batch, executor = self.codecs["v"], step.batch_index, self.ctx.executor

        def values(wanted: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            gather = lambda: self.cache.gather(layer, batch, "v", wanted, device)  # noqa: E731
            rows = executor.timed("gather_values", step, gather, moves_bytes=True)
            if codec.config is None:
                return rows
            return executor.timed("dequantize_cache", step, lambda: codec.decode(rows, dtype))

        return sparse_decode(
            q,
            k_new,
            v_new,
            cache,
            bias,
            keep=self.ctx.policy.attn_sparsity,
            values=values,
            stored_tokens=codec.stored_tokens,
            tail=self.tails.get((layer, batch, "v")),
        )

    def _to_store(self, step: Step, layer: int, new: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        """Rows to store for the new tokens ``new[kv]`` (``[b, s, heads, d]``) and where they go.

        Tokens that leave the full-precision tail are encoded into rows; the rest become the tail.
        """
        before = self._cached_tokens(step.token)
        after = before + new["k"].shape[1]
        out = {}
        for kv, codec in self.codecs.items():
            key = (layer, step.batch_index, kv)
            tail = self.tails.pop(key, None)
            pending = new[kv] if tail is None else torch.cat([tail, new[kv]], dim=1)  # tokens from stored(before)
            first, last = codec.stored_tokens(before), codec.stored_tokens(after)
            leaving = pending if last - first == pending.shape[1] else pending[:, : last - first]
            if codec.config is not None and last > first:
                leaving = self.ctx.executor.timed("quantize_cache", step, lambda: codec.encode(leaving))
            if last - first < pending.shape[1]:
                self.tails[key] = pending[:, last - first :].clone()  # clone: free the rest of ``pending``
            out[kv] = (leaving, first // codec.chunk)
        return out
