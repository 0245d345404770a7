"""Scaled dot-product attention against a KV cache, shared by every family.

Kept apart from the family maths so the engine can run it wherever the cache lives (on the CPU
next to a host-resident cache, with ``cpu_cache_compute``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexlab.models.generation import positions_from_mask


def attention_bias(
    valid: torch.Tensor,
    q_len: int,
    window: int | None = None,
    position_bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | SplitBias:
    """Additive float32 mask for the last ``q_len`` positions attending over ``valid.shape[1]`` keys.

    ``valid`` is ``[batch, kv_len]`` bool/int (False/0 marks left padding). Query ``i`` sits at
    key position ``kv_len - q_len + i`` and may see keys at or before it that are valid, and
    with a sliding ``window`` only the last ``window`` of those (itself included). Padding sits
    on the left only, so distances between slots are distances between tokens.
    ``position_bias`` (a family's, e.g. ALiBi) maps each key's position ``[batch, kv_len]`` to
    per-head biases ``[batch, heads, 1, kv_len]`` that are added: the result is then per head.
    Returns ``[batch, 1, q_len, kv_len]`` with 0 where allowed and float32's most negative value
    elsewhere: finite, so a padding query that sees nothing gets a uniform (unused) row, not NaN.
    With a ``position_bias`` and several queries (a prefill) the two stay apart in a
    :class:`SplitBias`, which :func:`attend` adds chunk by chunk: summed, a prefill's would be
    ``[batch, heads, q_len, kv_len]``, heads times the mask.
    """
    batch, kv_len = valid.shape
    q_pos = torch.arange(kv_len - q_len, kv_len, device=valid.device)[:, None]  # [q, 1]
    k_pos = torch.arange(kv_len, device=valid.device)[None, :]  # [1, kv]
    causal = k_pos <= q_pos
    if window is not None:
        causal &= q_pos - k_pos < window
    allowed = causal[None, None] & valid.bool()[:, None, None, :]  # [b, 1, q, kv]
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=valid.device)
    bias.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    if position_bias is None:
        return bias
    keys = position_bias(positions_from_mask(valid))
    # min + a finite bias stays hugely negative (float32 rounds it back to min): still masked
    return SplitBias(bias, keys) if q_len > 1 else bias + keys


@dataclass(frozen=True)
class SplitBias:
    """A mask ``[b, 1, q, kv]`` and per-head key biases ``[b, heads, 1, kv]``, added to the scores
    one after the other. Exactly as their sum: where the mask is 0 both give the key bias; where
    it is float32's minimum both stay there (a finite bias is below its rounding)."""

    mask: torch.Tensor
    keys: torch.Tensor

    def rows(self, part: slice) -> SplitBias:
        """The bias of queries ``part`` only."""
        return SplitBias(self.mask[:, :, part], self.keys)


SCORE_BYTES = 64 << 20  # the most float32 attention scores held at once (a prefill's grow with prompt²)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | SplitBias, score_bytes: int = SCORE_BYTES
) -> torch.Tensor:
    """Softmax attention. ``q`` is pre-scaled.

    Shapes: q ``[b, heads, q_len, d]``, k and v ``[b, kv_heads, kv_len, d]``, bias
    ``[b, 1 or heads, q_len, kv_len]`` or a :class:`SplitBias` → ``[b, heads, q_len, d]``. With
    grouped-query attention (``kv_heads < heads``) each key/value head serves ``heads / kv_heads``
    consecutive query heads. Scores and softmax are in float32 (float16 scores plus a large
    negative mask can overflow to -inf and give NaN rows). Queries are taken in chunks so that
    their scores stay under ``score_bytes``: a 2048-token prefill of 8 sequences and 32 heads
    would otherwise hold 4 GiB of them (each query's softmax is its own, so chunks change nothing).
    """
    b, heads, q_len, d = q.shape
    kv_heads = k.shape[1]
    if q_len == 1 and kv_heads < heads and isinstance(bias, torch.Tensor) and bias.shape[1] == 1:
        # One new token with grouped-query attention: its query heads become the rows of their
        # key/value head (``[b, kv_heads, heads / kv_heads, d]``), so the cache is read as stored
        # instead of copied once per group (Llama-3.2-1B: 4 copies of keys and values a layer and step).
        out = _attend_rows(q.reshape(b, kv_heads, heads // kv_heads, d), k, v, bias)
        return out.reshape(b, heads, 1, v.shape[-1])
    k, v = expand_kv(k, heads), expand_kv(v, heads)
    rows = max(1, score_bytes // (4 * b * heads * k.shape[2]))
    if rows >= q_len:
        return _attend_rows(q, k, v, bias)
    out = torch.empty(b, heads, q_len, v.shape[-1], dtype=v.dtype, device=q.device)
    for first in range(0, q_len, rows):
        part = slice(first, first + rows)
        rows_bias = bias.rows(part) if isinstance(bias, SplitBias) else bias[:, :, part]
        out[:, :, part] = _attend_rows(q[:, :, part], k, v, rows_bias)
    return out


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | SplitBias) -> torch.Tensor:
    # In place where it changes nothing, so that at most two float32 copies of the scores live at
    # once (the scores and their softmax): the workspace the cost model charges (``SCORE_LIVE``).
    scores = torch.matmul(q, k.transpose(-1, -2)).float()
    if isinstance(bias, SplitBias):
        scores += bias.mask
        scores += bias.keys
    else:
        scores += bias
    probs = torch.softmax(scores, dim=-1)
    del scores
    return torch.matmul(probs.to(v.dtype), v)


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, kv_heads, n, d]`` keys or values repeated to ``heads`` heads (a view-free no-op when
    they already match): query head ``i`` reads key/value head ``i // (heads / kv_heads)``."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sparse_weights(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, keep: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sparse attention for one new token (FlexGen's ``attn_sparsity``), the weights part.

    ``k`` holds the cached keys *and* the new token's last (``[b, heads, L + 1, d]``). The softmax
    is taken over all of them; then each head keeps the ``ceil(keep * L)`` largest weights among
    the cached tokens (the new token always counts) and drops the rest, without renormalising.
    Returns the kept cached weights ``[b, heads, L]`` (zero where dropped) and the new token's
    weight ``[b, heads, 1]``, both float32.
    """
    k = expand_kv(k, q.shape[1])  # grouped-query attention: each query head scores its group's keys
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).float() + bias, dim=-1)[:, :, 0]  # [b, h, L+1]
    cached = probs[..., :-1]
    n_keep = max(1, math.ceil(keep * cached.shape[-1]))
    if n_keep >= cached.shape[-1]:
        return cached, probs[..., -1:]
    top = cached.topk(n_keep, dim=-1).indices
    kept = torch.zeros_like(cached).scatter_(-1, top, cached.gather(-1, top))
    return kept, probs[..., -1:]


def sparse_attend(
    weights: torch.Tensor, values: torch.Tensor, w_new: torch.Tensor, v_new: torch.Tensor
) -> torch.Tensor:
    """The output of sparse attention from the value rows that were read.

    ``weights`` ``[b, heads, U]`` and ``values`` ``[b, U, heads, d]`` cover the U cached tokens
    some head kept (zero weight where this head did not); ``w_new`` ``[b, heads, 1]`` and
    ``v_new`` ``[b, heads, 1, d]`` are the new token's. Returns ``[b, heads, 1, d]``. With
    grouped-query attention, ``values`` and ``v_new`` hold the ``kv_heads`` and are expanded.
    """
    heads = weights.shape[1]
    values, v_new = expand_kv(values.transpose(1, 2), heads).transpose(1, 2), expand_kv(v_new, heads)
    out = torch.einsum("bhu,buhd->bhd", weights.to(values.dtype), values)[:, :, None]
    return out + w_new[..., None].to(v_new.dtype) * v_new


def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    keys: torch.Tensor | None,
    values: torch.Tensor | None,
    bias: torch.Tensor,
    host: tuple[int, int, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of the new token (``q``, ``k_new``, ``v_new``: ``[b, heads, 1, d]``) over its
    cache (``keys``, ``values``: ``[b', kv_heads, L, d]`` on the compute device).

    ``host = (first, count, host_keys, host_values)``: rows ``first..first+count`` of the batch
    kept their cache in host memory (``cpu_cache_compute``) and attend on the CPU, so only their
    query, new key/value and output move; ``keys``/``values`` then hold the other rows only.
    """
    if host is None:
        assert keys is not None and values is not None, "no host rows and no cache on the device"
        return attend(q, torch.cat([keys, k_new], dim=2), torch.cat([values, v_new], dim=2), bias)
    first, count, host_k, host_v = host
    rows = slice(first, first + count)
    out = torch.empty_like(q)
    device_rows = [i for i in range(q.shape[0]) if not first <= i < first + count]
    if device_rows:
        assert keys is not None and values is not None, "rows on the device without their cache"
        idx = torch.tensor(device_rows, device=q.device)
        out[idx] = attend(
            q[idx], torch.cat([keys, k_new[idx]], dim=2), torch.cat([values, v_new[idx]], dim=2), bias[idx]
        )
    # CPUs are slow in float16: attend in float32 there, as the cache is read anyway.
    dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
    cpu = torch.device("cpu")
    k_all = torch.cat([host_k.to(dtype), k_new[rows].to(cpu, dtype)], dim=2)
    v_all = torch.cat([host_v.to(dtype), v_new[rows].to(cpu, dtype)], dim=2)
    out[rows] = attend(q[rows].to(cpu, dtype), k_all, v_all, bias[rows].to(cpu)).to(q.device, q.dtype)
    return out
