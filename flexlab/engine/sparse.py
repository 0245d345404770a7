"""Top-k sparse attention of a decode step (``attn_sparsity < 1``) over a batch's cache.

Every cached key is read; the value rows are read afterwards, only those some head kept, through
a ``values(positions, device, dtype)`` callable the block gives (``positions``: ``[batch,
width]``, each sequence's wanted rows, -1 for none; it gathers them from the cache's tiers and
decodes them, timed). Rows whose cache stayed in host memory (``cpu_cache_compute``)
attend on the CPU, beside it, as dense attention does: their query and new key/value go there,
their output comes back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexlab.engine.cache import LoadedCache
from flexlab.models.attention import sparse_attend, sparse_weights

Values = Callable[[torch.Tensor, torch.device, torch.dtype], torch.Tensor]


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
    device their tensors are on. Each sequence's kept positions (those some head kept) are laid
    out ascending in a padded ``[len(seqs), width]`` index, so that gathering and weighting them
    are a few batched ops whatever the batch size."""
    assert keys is not None, "sparse attention loads every key"
    kept, w_new = sparse_weights(q, torch.cat([keys, k_new], dim=2), bias, keep)
    chosen = (kept > 0).any(dim=1)  # [seqs, L]
    counts = chosen.sum(-1, keepdim=True)
    width = int(counts.max())  # the one sync of a batch and layer
    # a stable sort of "not chosen" puts each sequence's chosen positions first, in order
    order = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[:, :width]
    padded = torch.arange(width, device=kept.device) >= counts
    positions = order.masked_fill(padded, -1)
    stored = stored_tokens(kept.shape[-1])
    in_tail = positions >= stored  # kept tokens still in the full-precision tail
    mine = torch.tensor(seqs, device=kept.device)
    wanted = torch.full((batch, width), -1, dtype=torch.long, device=kept.device)  # per sequence of the batch
    wanted[mine] = positions.masked_fill(in_tail, -1)
    gathered = values(wanted, q.device, v_new.dtype)
    if len(seqs) < batch:  # the others attend elsewhere (cpu_cache_compute)
        gathered = gathered.index_select(0, mine)
    gathered = gathered.to(v_new.dtype)  # [seqs, width, heads, d]
    if tail is not None and bool(in_tail.any()):
        rows = mine.to(tail.device)[:, None]
        from_tail = tail[rows, (positions - stored).clamp(min=0).to(tail.device)].to(gathered.device, gathered.dtype)
        gathered = torch.where(in_tail[..., None, None], from_tail, gathered)
    weights = kept.gather(-1, positions.clamp(min=0)[:, None, :].expand(-1, kept.shape[1], -1))  # [seqs, heads, width]
    return sparse_attend(weights.masked_fill(padded[:, None, :], 0.0), gathered, w_new, v_new)
