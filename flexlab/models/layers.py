"""The pieces of maths several families share, on weights looked up by short name.

Kept here so each family file says only what is its own; nothing here knows a family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexlab.devices import cpu_has_fast_bfloat16
from flexlab.models.family import Weights


def linear(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    """``x @ name.weight.T + name.bias`` (no bias where the weights have none)."""
    return project(x, w[name + ".weight"], w.get(name + ".bias"))


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, ``weight`` ``[out, in]`` as stored or as :func:`packed` made it.
    A family applies every matrix of its layers (and an untied head's) through here."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`packed` applies: bfloat16 on a CPU with oneDNN's native bfloat16 kernels."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and cpu_has_fast_bfloat16()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def packed(weight: torch.Tensor) -> torch.Tensor:
    """A bfloat16 ``[out, in]`` matrix in oneDNN's blocked layout, for :func:`project` only (no
    other op reads it). Same bytes and bit-identical products; a CPU's few-row products ran
    1.7-2.1x faster on it here (``F.linear`` over the plain layout reached 17-27 GB/s of weight
    reads at 1 to 4 rows, the packed one 35-46), 1.1-1.3x at 64 rows and more."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


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


def rotate_leading_pairs(
    x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float, heads_dim: int, in_float32: bool = True
) -> torch.Tensor:
    """Partial rotary embedding (CodeGen, GLM): the first ``rotary_dim`` dimensions of each head
    of ``x`` rotate by interleaved pairs at each token's position (``positions`` ``[b, s]``), the
    rest pass. ``heads_dim``: where the heads are in ``x`` (1: ``[b, heads, s, d]``, 2:
    ``[b, s, heads, d]``). Angles in float32, as transformers computes them; the rotation in
    float32 too (CodeGen) or, ``in_float32=False``, in ``x``'s dtype (GLM), as each family's does."""
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=x.device) / rotary_dim))
    angles = positions[..., None].float() * inv  # [b, s, r/2]
    angles = angles[:, None] if heads_dim == 1 else angles[:, :, None]
    dtype = torch.float32 if in_float32 else x.dtype
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    rotated = rotate_pairs(x[..., :rotary_dim].to(dtype), cos, sin).to(x.dtype)
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)
