"""Scaled dot-product attention against a KV cache, shared by every family.

Kept apart from the family maths so the engine can run it wherever the cache lives (on the CPU
next to a host-resident cache, with ``cpu_cache_compute``).
"""

from __future__ import annotations

import torch


def attention_bias(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Additive float32 mask for the last ``q_len`` positions attending over ``valid.shape[1]`` keys.

    ``valid`` is ``[batch, kv_len]`` bool/int (False/0 marks left padding). Query ``i`` sits at
    key position ``kv_len - q_len + i`` and may see keys at or before it that are valid.
    Returns ``[batch, 1, q_len, kv_len]`` with 0 where allowed and float32's most negative value
    elsewhere: finite, so a padding query that sees nothing gets a uniform (unused) row, not NaN.
    """
    batch, kv_len = valid.shape
    q_pos = torch.arange(kv_len - q_len, kv_len, device=valid.device)[:, None]  # [q, 1]
    k_pos = torch.arange(kv_len, device=valid.device)[None, :]  # [1, kv]
    allowed = (k_pos <= q_pos)[None, None] & valid.bool()[:, None, None, :]  # [b, 1, q, kv]
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=valid.device)
    return bias.masked_fill_(~allowed, torch.finfo(torch.float32).min)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention. ``q`` is pre-scaled.

    Shapes: q ``[b, heads, q_len, d]``, k and v ``[b, heads, kv_len, d]``, bias
    ``[b, 1, q_len, kv_len]`` → ``[b, heads, q_len, d]``. Scores and softmax are in float32
    (float16 scores plus a large negative mask can overflow to -inf and give NaN rows).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)
