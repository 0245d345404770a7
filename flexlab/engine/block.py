"""One block of sequences through the schedule: its state, and what each step does to it.

The schedule says *when*; the handlers here say *what*: bring a stage's weights, a batch's
cache or hidden state to the compute device, run the family's maths on it, and put the results
back. The maths is the same code the reference path calls.
"""

from __future__ import annotations

import time

import torch

from flexlab.compress import QTensor, dequantize
from flexlab.engine.cache import KV, CacheStore, LoadedCache
from flexlab.engine.kvcodec import KVCodec
from flexlab.engine.schedule import Step, block_schedule
from flexlab.engine.store import ActStore
from flexlab.models.attention import attend, attention_bias, sparse_attend, sparse_weights
from flexlab.models.generation import left_pad, positions_from_mask


class BlockRun:
    """Runs ``ids`` (at most one block of sequences) for ``num_tokens`` tokens.

    ``mode="generate"`` samples new tokens into ``generated`` (the engine's per-prompt lists,
    this block's prompts starting at ``offset``); ``mode="score"`` runs the prefill only and
    leaves per-sequence log-probabilities in ``self.scores``; ``mode="teacher"`` feeds each
    sequence one token at a time through the decode path (so a compressed cache is written and
    read back) and leaves the same log-probabilities in ``self.scores``.
    """

    def __init__(self, engine, ids: list[list[int]], num_tokens: int, mode: str, *, sampler=None, stop=None,
                 generated: list[list[int]] | None = None, offset: int = 0) -> None:
        self.engine, self.ids, self.num_tokens, self.mode = engine, ids, num_tokens, mode
        self.sampler, self.stop, self.generated, self.offset = sampler, stop, generated, offset
        model, policy = engine.model, engine.policy
        self.family, self.config = model.family, model.config
        bs = policy.gpu_batch_size
        batches = [ids[i:i + bs] for i in range(0, len(ids), bs)]  # the last may be short
        self.batch_rows = [list(range(i, i + len(b))) for i, b in zip(range(0, len(ids), bs), batches)]
        pad = model.config.pad_token_id
        if mode == "teacher":  # the prefill reads each sequence's first token; the rest are fed one by one
            longest = max(map(len, ids))
            self.targets = [torch.tensor([s + [pad] * (longest - len(s)) for s in b], device=engine.device)
                            for b in batches]  # right-padded: token i of every sequence in column i
            self.teacher_lp: list[list[torch.Tensor]] = [[] for _ in batches]
            batches = [[s[:1] for s in b] for b in batches]
        self.width = max(len(s) for b in batches for s in b)
        self.tokens, self.valid = [], []
        for b in batches:  # every batch padded to the block's width, so cache positions line up
            tokens, valid = left_pad(b, pad, engine.device, width=self.width)
            self.tokens.append(tokens)
            self.valid.append(valid)
        self.last: list[torch.Tensor | None] = [None] * len(batches)
        self.scores: list[torch.Tensor] = [torch.empty(0)] * len(ids)
        capacity = self.width + max(num_tokens - 1, 0)
        cfg = model.config
        self.codecs = {kv: KVCodec(policy.compress_cache, cfg.num_kv_heads, cfg.head_dim, engine.dtype,
                                   keys=kv == "k")
                       for kv in KV}
        disk_seqs = round(len(ids) * policy.cache_disk_percent / 100)
        engine.check_space(cfg.num_layers * disk_seqs * sum(-(-capacity // c.chunk) * c.row_bytes
                                                            for c in self.codecs.values()),
                           "the disk share of the KV cache")
        self.cache = CacheStore(policy, [len(b) for b in batches], capacity, self.codecs, engine.device,
                                engine.subdir("cache"), engine.files, engine.tracker)
        # A compressed cache keeps its newest tokens in full precision on the device (see kvcodec).
        self.tails: dict[tuple[int, int, str], torch.Tensor] = {}
        self.tail_bytes = sum(cfg.num_layers * len(ids) * c.max_tail * cfg.kv_dim * engine.dtype.itemsize
                              for c in self.codecs.values())
        engine.tracker.add("gpu", "kv tail", self.tail_bytes)
        self.acts = None
        if policy.act_tier != "gpu":
            slot_bytes = bs * self.width * model.config.hidden_size * engine.dtype.itemsize  # the prefill's, the largest
            self.acts = ActStore(policy.act_tier, engine.device, slot_bytes, engine.subdir("act"), engine.files,
                                 engine.tracker)
        self.prefill_done: float | None = None
        self._masks: dict[int, tuple[int, torch.Tensor]] = {}
        self._pos: dict[int, tuple[int, torch.Tensor]] = {}

    # ---- running -----------------------------------------------------------------------
    def run(self) -> tuple[list, float, float]:
        """Run the block; returns its timeline events, prefill seconds and decode seconds."""
        engine = self.engine
        overlap = engine.policy.overlap
        steps = block_schedule(self.num_tokens, engine.stages, len(self.tokens), prefetch=1 if overlap else 0,
                               act_moves=self.acts is not None, cache_ahead=self.cache.read_ahead if overlap else 0)
        handlers = {"load_weight": self.load_weight, "release_weight": self.release_weight,
                    "load_cache": self.load_cache, "release_cache": self.release_cache, "load_act": self.load_act,
                    "compute": self.compute, "store_cache": self.store_cache, "store_act": self.store_act,
                    "inline": self.moves_nothing}
        start = time.perf_counter()
        try:
            engine.executor.run(steps, handlers, self.finished)
        finally:
            self.cache.close()
            self.tails.clear()
            self.engine.tracker.sub("gpu", "kv tail", self.tail_bytes)
            if self.acts is not None:
                self.acts.close()
        end = time.perf_counter()
        prefill_done = self.prefill_done or end
        return engine.executor.events(), prefill_done - start, end - prefill_done

    def finished(self) -> bool:
        if self.mode != "generate":
            return False
        return all(self.stop.finished[self.offset:self.offset + len(self.ids)])

    # ---- transfers ---------------------------------------------------------------------
    def moves_nothing(self, step: Step) -> bool:
        """Whether a transfer step's data is already where the compute reads it (the gpu tier; on
        a CPU-only machine the cpu tier too, the same RAM): then it runs inline, not on a lane."""
        if step.kind == "load_weight":
            return self.engine.weights.resident[step.stage]
        if step.kind in ("load_cache", "store_cache"):
            return self.cache.resident[step.batch]
        return self.acts is not None and self.acts.tier == "cpu" and self.engine.device.type == "cpu"

    def load_weight(self, step: Step):
        weights, moved = self.engine.weights.load(step.stage)
        return weights, sum(moved.values())

    def release_weight(self, key, loaded) -> None:
        self.engine.weights.release(loaded)

    def _cached_tokens(self, t: int) -> int:
        """Tokens in the cache when token ``t`` is computed (the prefill is token 0)."""
        return 0 if t == 0 else self.width + t - 1

    def load_cache(self, step: Step):
        layer = self.engine.stages[step.stage].layer
        n = self._cached_tokens(step.token)
        rows = {kv: c.stored_tokens(n) // c.chunk for kv, c in self.codecs.items()}
        if self.engine.policy.attn_sparsity < 1:  # sparse attention reads only the value rows it keeps
            rows["v"] = 0
        loaded, moved = self.cache.load(layer, step.batch, rows, cpu_rows_stay=self.engine.policy.cpu_cache_compute)
        return loaded, sum(moved.values())

    def release_cache(self, key, loaded: LoadedCache) -> None:
        self.cache.release(loaded)

    def store_cache(self, step: Step, computed: dict) -> int:
        if self.mode == "score":  # nothing will read it
            return 0
        layer = self.engine.stages[step.stage].layer
        moved = 0
        for kv, (rows, start) in computed["kv"].items():
            if rows.shape[1]:
                moved += sum(self.cache.store(layer, step.batch, kv, rows, start).values())
        return moved

    def load_act(self, step: Step):
        return self.acts.load(step.batch)

    def store_act(self, step: Step, computed: dict) -> int:
        return self.acts.store(step.batch, computed["h"])

    # ---- compute -----------------------------------------------------------------------
    def compute(self, step: Step, inputs: dict) -> dict:
        """The family's maths for one stage and batch; inputs come from the loads it waited on."""
        t, j, k = step.token, step.stage, step.batch
        stage = self.engine.stages[j]
        f, cfg = self.family, self.config
        loaded = inputs[("load_weight", t, j, None)]
        if "embed" in stage.parts:
            ids = self.tokens[k] if t == 0 else self.last[k][:, None]
            w, ids = self._embedding_weights(step, loaded, ids)
            h = f.embed(w, cfg, ids, self._positions(t, k))
        else:
            w = self._weights(step, loaded)
            h = inputs[("load_act", t, j, k)] if ("load_act", t, j, k) in inputs else inputs[("compute", t, j - 1, k)]["h"]

        kv = None
        if "attention" in stage.parts:
            q, k_new, v_new = f.attention_qkv(w, cfg, h, self._positions(t, k))
            if t == 0:
                o = attend(q, k_new, v_new, self._bias(t, k))
            else:
                cache = self._with_tail(step, stage.layer, inputs[("load_cache", t, j, k)])
                if self.engine.policy.attn_sparsity < 1:
                    o = self._sparse_attention(step, stage.layer, q, k_new, v_new, cache.k, self._bias(t, k))
                else:
                    o = _decode_attention(q, k_new, v_new, cache, self._bias(t, k))
            h = f.attention_out(w, cfg, h, o)
            if self.mode != "score":  # the cache takes the new keys and values token-major, as stored
                kv = self._to_store(step, stage.layer, {"k": k_new.transpose(1, 2), "v": v_new.transpose(1, 2)})
        if "mlp" in stage.parts:
            h = f.mlp(w, cfg, h)
        if "head" in stage.parts:
            self._head(w, h, t, k)
        return {"h": h, "kv": kv}

    def _weights(self, step: Step, loaded) -> dict:
        """A loaded stage's weights, compressed ones dequantized (once per stage and token)."""
        if self.engine.policy.compress_weight is None:
            return loaded.tensors
        if loaded.dequantized is None:
            self.engine.executor.timed("dequantize_weight", step, lambda: self.engine.weights.dequantized(loaded))
        return loaded.dequantized

    def _embedding_weights(self, step: Step, loaded, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The embed stage's weights for looking up ``ids``. A compressed token table is not
        dequantized whole: only the rows of the ids at hand, which are renumbered to match."""
        name = self.family.token_table
        table = loaded.tensors.get(name)
        if not isinstance(table, QTensor) or table.config.group_dim % 2 != 1:
            return self._weights(step, loaded), ids
        unique, local = ids.unique(return_inverse=True)
        dtype = self.engine.dtype

        def rows() -> dict:
            out = {n: dequantize(t, dtype) if isinstance(t, QTensor) else t for n, t in loaded.tensors.items()
                   if n != name}
            out[name] = dequantize(table.rows(unique), dtype)
            return out

        return self.engine.executor.timed("dequantize_weight", step, rows), local

    def _with_tail(self, step: Step, layer: int, loaded: LoadedCache) -> LoadedCache:
        """The loaded rows as keys/values ``[b, heads, tokens, d]``: dequantized, then the
        full-precision tail appended."""
        out = {}
        for kv in KV:
            codec, rows = self.codecs[kv], getattr(loaded, kv)
            if rows is None:  # every sequence's cache stayed on the host (cpu_cache_compute)
                out[kv] = None
                continue
            x = rows if codec.config is None else self.engine.executor.timed(
                "dequantize_cache", step, lambda: codec.decode(rows))
            tail = self.tails.get((layer, step.batch, kv))
            out[kv] = (x if tail is None else torch.cat([x, tail], dim=1)).transpose(1, 2)
        host = {kv: None if x is None else x.transpose(1, 2) for kv, x in (("k", loaded.host_k), ("v", loaded.host_v))}
        return LoadedCache(out["k"], out["v"], host["k"], host["v"], loaded.host_span)

    def _sparse_attention(self, step: Step, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                          keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Top-k attention of the new token: every key is read, then only the value rows some
        head kept (from the cache's tier, or the full-precision tail)."""
        kept, w_new = sparse_weights(q, torch.cat([keys, k_new], dim=2), bias, self.engine.policy.attn_sparsity)
        # The reads need the positions on the host: one sync per batch and layer.
        positions = [row.nonzero().flatten().tolist() for row in (kept > 0).any(dim=1)]
        codec, batch = self.codecs["v"], step.batch
        stored = codec.stored_tokens(kept.shape[-1])
        from_store = [[p for p in pos if p < stored] for pos in positions]
        executor = self.engine.executor
        rows = executor.timed("gather_values", step, lambda: self.cache.gather(layer, batch, "v", from_store),
                              moves_bytes=True)
        if codec.config is not None:
            rows = executor.timed("dequantize_cache", step, lambda: codec.decode(rows))
        tail = self.tails.get((layer, batch, "v"))
        width = max(map(len, positions))
        values = torch.zeros((len(positions), width, *rows.shape[2:]), dtype=v_new.dtype, device=v_new.device)
        for r, pos in enumerate(positions):
            n = len(from_store[r])
            values[r, :n] = rows[r, :n]
            if len(pos) > n:  # kept tokens still in the full-precision tail
                values[r, n:len(pos)] = tail[r, torch.tensor(pos[n:], device=tail.device) - stored]
        idx = torch.tensor([pos + [0] * (width - len(pos)) for pos in positions], device=kept.device)
        weights = kept.gather(-1, idx[:, None, :].expand(-1, kept.shape[1], -1))  # [b, heads, width]
        pad = torch.tensor([[i >= len(pos) for i in range(width)] for pos in positions], device=kept.device)
        return sparse_attend(weights.masked_fill(pad[:, None, :], 0.0), values, w_new, v_new)

    def _to_store(self, step: Step, layer: int, new: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        """Rows to store for the new tokens ``new[kv]`` (``[b, s, heads, d]``) and where they go.

        Tokens that leave the full-precision tail are encoded into rows; the rest become the tail.
        """
        before = self._cached_tokens(step.token)
        after = before + new["k"].shape[1]
        out = {}
        for kv, codec in self.codecs.items():
            key = (layer, step.batch, kv)
            tail = self.tails.pop(key, None)
            pending = new[kv] if tail is None else torch.cat([tail, new[kv]], dim=1)  # tokens from stored(before)
            first, last = codec.stored_tokens(before), codec.stored_tokens(after)
            leaving = pending[:, :last - first]
            if codec.config is not None and last > first:
                leaving = self.engine.executor.timed("quantize_cache", step, lambda: codec.encode(leaving))
            if last - first < pending.shape[1]:
                self.tails[key] = pending[:, last - first:].clone()  # clone: free the rest of ``pending``
            out[kv] = (leaving, first // codec.chunk)
        return out

    def _head(self, w, h: torch.Tensor, t: int, k: int) -> None:
        f, cfg, rows = self.family, self.config, self.batch_rows[k]
        if self.mode == "teacher":
            logprobs = torch.log_softmax(f.head(w, cfg, h[:, -1]).float(), dim=-1)  # [b, vocab]
            target = self.targets[k][:, min(t + 1, self.targets[k].shape[1] - 1)]
            self.teacher_lp[k].append(logprobs.gather(-1, target[:, None]).squeeze(-1))
            self.last[k] = target  # the next input is the sequence's own next token
            self.valid[k] = torch.cat([self.valid[k], torch.ones_like(self.valid[k][:, :1])], dim=1)
            if t == self.num_tokens - 1:
                lp = torch.stack(self.teacher_lp[k], dim=1).cpu()  # [b, tokens]
                for r, row in enumerate(rows):
                    self.scores[row] = lp[r, :len(self.ids[row]) - 1]
            return
        if self.mode == "score":
            logprobs = torch.log_softmax(f.head(w, cfg, h).float(), dim=-1)  # [b, s, vocab]
            for r, row in enumerate(rows):
                seq = self.ids[row]
                n = len(seq)
                lp = logprobs[r, self.width - n:-1]
                target = self.tokens[k][r, self.width - n + 1:, None]
                self.scores[row] = lp.gather(-1, target).squeeze(-1).cpu()
            return
        self.last[k] = self.sampler(f.head(w, cfg, h[:, -1]))  # stays on the device for the next embed
        self.valid[k] = torch.cat([self.valid[k], torch.ones_like(self.valid[k][:, :1])], dim=1)
        if k < len(self.tokens) - 1:
            return
        # After the block's last batch: one host sync per token brings every new token over.
        for row, tok in enumerate(torch.cat(self.last).tolist()):
            if not self.stop.finished[self.offset + row]:
                self.generated[self.offset + row].append(tok)
        self.stop.update(self.generated)
        if t == 0:
            self.prefill_done = time.perf_counter()  # .tolist() waited for the device: the prefill is done

    def _positions(self, t: int, k: int) -> torch.Tensor:
        """Batch ``k``'s positions of the tokens computed at token ``t`` (``[b, s]``), built once
        and shared by every layer."""
        if self._pos.get(k, (None,))[0] != t:
            positions = positions_from_mask(self.valid[k])
            self._pos[k] = (t, positions if t == 0 else positions[:, -1:])
        return self._pos[k][1]

    def _bias(self, t: int, k: int) -> torch.Tensor:
        """Batch ``k``'s attention mask for token ``t``, built once and shared by every layer."""
        if self._masks.get(k, (None,))[0] != t:
            self._masks[k] = (t, attention_bias(self.valid[k], self.valid[k].shape[1] if t == 0 else 1,
                                                   self.config.sliding_window))
        return self._masks[k][1]


def _decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache: LoadedCache,
                      bias: torch.Tensor) -> torch.Tensor:
    """Attention of the new token over its cache. Rows whose cache stayed in host memory
    (``cpu_cache_compute``) attend on the CPU: only their query, new key/value and output move."""
    if cache.host_span is None:
        return attend(q, torch.cat([cache.k, k_new], dim=2), torch.cat([cache.v, v_new], dim=2), bias)
    first, count = cache.host_span
    host = slice(first, first + count)
    out = torch.empty_like(q)
    device_rows = [i for i in range(q.shape[0]) if not first <= i < first + count]
    if device_rows:
        idx = torch.tensor(device_rows, device=q.device)
        out[idx] = attend(q[idx], torch.cat([cache.k, k_new[idx]], dim=2), torch.cat([cache.v, v_new[idx]], dim=2),
                          bias[idx])
    # CPUs are slow in float16: attend in float32 there, as the cache is read anyway.
    dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
    cpu = torch.device("cpu")
    keys = torch.cat([cache.host_k.to(dtype), k_new[host].to(cpu, dtype)], dim=2)
    values = torch.cat([cache.host_v.to(dtype), v_new[host].to(cpu, dtype)], dim=2)
    out[host] = attend(q[host].to(cpu, dtype), keys, values, bias[host].to(cpu)).to(q.device, q.dtype)
    return out
