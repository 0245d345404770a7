"""Top-k sparse attention of a decode step (``attn_sparsity < 1``) over a batch's cache.

Every cached key is read; the value rows are read afterwards, only those some head kept, through
a ``values(wanted, device, dtype)`` callable the block gives (it gathers them from the cache's
tiers and decodes them, timed). Rows whose cache stayed in host memory (``cpu_cache_compute``)
attend on the CPU, beside it, as dense attention does: their query and new key/value go there,
their output comes back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexlab.engine.cache import LoadedCache
from flexlab.models.attention import sparse_attend, sparse_weights

Values = Callable[[list[list[int]], torch.device, torch.dtype], torch.Tensor]


def sparse_decode(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: LoadedCache,
    bias: torch.Tensor,
    *,
    keep: float,
    values: Values,
    stored_tokens: Callable[[int], int],
    tail: torch.Tensor | None,
) -> torch.Tensor:
    """The new token's attention output ``[b, heads, 1, d]``, keeping ``keep`` of each head's
    cached weights. ``tail``: the batch's full-precision newest values (``[b, t, heads, d]``)
    beyond the ``stored_tokens(n)`` kept in rows, or None."""
    batch = q.shape[0]
    if cache.host_span is None:
        return _rows(q, k_new, v_new, cache.k, bias, list(range(batch)), batch, keep, values, stored_tokens, tail)
    first, count = cache.host_span
    host = slice(first, first + count)
    out = torch.empty_like(q)
    device_rows = [i for i in range(batch) if not first <= i < first + count]
    if device_rows:
        idx = torch.tensor(device_rows, device=q.device)
        out[idx] = _rows(
            q[idx], k_new[idx], v_new[idx], cache.k, bias[idx], device_rows, batch, keep, values, stored_tokens, tail
        )
    # CPUs are slow in float16: attend in float32 there (the host keys were decoded so)
    dtype, cpu = torch.float32 if q.dtype == torch.float16 else q.dtype, torch.device("cpu")
    hq, hk, hv = (x[host].to(cpu, dtype) for x in (q, k_new, v_new))
    seqs = list(range(first, first + count))
    out[host] = _rows(hq, hk, hv, cache.host_k, bias[host].to(cpu), seqs, batch, keep, values, stored_tokens, tail).to(
        q.device, q.dtype
    )
    return out


def _rows(q, k_new, v_new, keys, bias, seqs: list[int], batch: int, keep, values: Values, stored_tokens, tail):
    """Sparse attention of the batch's sequences ``seqs`` (the rows of ``q``, ``keys``...), on the
    device their tensors are on."""
    assert keys is not None, "sparse attention loads every key"
    kept, w_new = sparse_weights(q, torch.cat([keys, k_new], dim=2), bias, keep)
    # The reads need the positions on the host: one sync per batch and layer.
    positions = [row.nonzero().flatten().tolist() for row in (kept > 0).any(dim=1)]
    stored = stored_tokens(kept.shape[-1])
    wanted: list[list[int]] = [[] for _ in range(batch)]  # per sequence of the batch
    for s, pos in zip(seqs, positions):
        wanted[s] = [p for p in pos if p < stored]
    rows = values(wanted, q.device, v_new.dtype)
    width = max(map(len, positions))
    gathered = torch.zeros((len(positions), width, *rows.shape[2:]), dtype=v_new.dtype, device=v_new.device)
    for r, (s, pos) in enumerate(zip(seqs, positions)):
        n = len(wanted[s])
        gathered[r, :n] = rows[s, :n]
        if len(pos) > n:  # kept tokens still in the full-precision tail
            assert tail is not None
            gathered[r, n : len(pos)] = tail[s, torch.tensor(pos[n:], device=tail.device) - stored].to(gathered.device)
    idx = torch.tensor([pos + [0] * (width - len(pos)) for pos in positions], device=kept.device)
    weights = kept.gather(-1, idx[:, None, :].expand(-1, kept.shape[1], -1))  # [b, heads, width]
    pad = torch.tensor([[i >= len(pos) for i in range(width)] for pos in positions], device=kept.device)
    return sparse_attend(weights.masked_fill(pad[:, None, :], 0.0), gathered, w_new, v_new)
