"""Rotary-embedding frequencies and their scalings (``rope_scaling`` / ``rope_parameters``).

One function, :func:`rope_frequencies`, gives the rotation frequency of each pair of a head's
dimensions and the factor ``cos`` and ``sin`` are multiplied by, for each scaling a LLaMA-family
checkpoint can name:

* ``default``: ``theta ** -(2i / d)``.
* ``linear``: every frequency divided by ``factor`` (positions interpolated).
* ``dynamic`` (NTK-aware): past the trained length ``L0`` the base grows with the call's length
  ``L``: ``theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))``.
* ``llama3``: long wavelengths slowed by ``factor``, short ones kept, a smooth blend between.
* ``yarn``: the same idea with a linear ramp over the dimensions between two rotation counts
  (``beta_fast``, ``beta_slow``), and ``cos``/``sin`` scaled by an attention factor.

Each is computed in the same float32 operations as transformers, so the rotations are bit for
bit the same. Parameters come as the sorted items of the config's dictionary (a hashable key:
the results are cached).
"""

from __future__ import annotations

import functools
import math

import torch

ROPE_KEYS = {  # the parameters each scaling needs
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


@functools.lru_cache(maxsize=32)
def is_dynamic(scaling: tuple | None) -> bool:
    """Whether the frequencies depend on the call's length (only ``dynamic`` does); asked by
    every layer at every step, so answered once per scaling."""
    return dict(scaling or ()).get("rope_type") == "dynamic"


@functools.lru_cache(maxsize=32)
def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None, length: int = 0) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2] float32 on the CPU, attention_factor)`` for a call whose sequences
    span ``length`` slots (read by ``dynamic`` only; pass 0 otherwise, for the cache's sake)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    params = dict(scaling or ())
    kind = params.get("rope_type", "default")
    if kind == "dynamic" and length > params["original_max_position_embeddings"]:
        # transformers computes this from the call's longest position, in float32 tensors (as a
        # fresh model does: it also keeps the largest length seen until a call fits L0 again)
        factor, trained = params["factor"], params["original_max_position_embeddings"]
        grown = (factor * torch.tensor(length) / trained - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / ((theta * grown) ** exponents), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, params, exponents)
    inv = 1.0 / (theta**exponents)
    if kind == "linear":
        return inv / params["factor"], 1.0
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, blended, scaled), 1.0
    return inv, 1.0


def _yarn(head_dim: int, theta: float, params: dict, exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN: dimensions that turn fewer than ``beta_slow`` times over the trained length are
    interpolated (divided by ``factor``), those that turn more than ``beta_fast`` times are kept,
    a linear ramp between; attention is sharpened by ``0.1 ln(factor) + 1`` (or as given)."""
    factor, trained = params["factor"], params["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the trained length
        return head_dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    kept = 1 - ramp  # the share of each dimension's original frequency
    freqs = theta**exponents
    inv = (1.0 / (factor * freqs)) * (1 - kept) + (1.0 / freqs) * kept
    return inv, attention_factor
