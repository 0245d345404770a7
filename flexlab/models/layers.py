"""The pieces of maths several families share, on weights looked up by short name.

Kept here so each family file says only what is its own; nothing here knows a family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexlab.models.family import Weights


def linear(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    """``x @ name.weight.T + name.bias`` (no bias where the weights have none)."""
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def layer_norm(w: Weights, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension (weight and bias optional, as OPT's elementwise_affine)."""
    return F.layer_norm(x, x.shape[-1:], w.get(name + ".weight"), w.get(name + ".bias"), eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm, the statistics in float32 and the product in ``x``'s dtype (as transformers)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding by interleaved pairs (dimensions 0 and 1, 2 and 3, ...: GPT-J, CodeGen,
    GLM) of ``x`` ``[..., r]``; ``cos``/``sin`` ``[..., r/2]``, one angle per pair."""
    even, odd = x[..., ::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding pairing the first half of each head with the second (the LLaMA family)
    of ``x`` ``[..., d]``; ``cos``/``sin`` ``[..., d]`` (each angle twice)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin
