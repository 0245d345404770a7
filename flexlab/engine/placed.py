"""The records of the weight store (:mod:`flexlab.engine.store`): a weight as placed on its
tier, and a stage's weights as a load brings them to the compute device."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from flexlab.compress import QTensor
from flexlab.engine.placement import align_up
from flexlab.engine.tiers import nbytes
from flexlab.models.family import WeightSpec
from flexlab.models.loading import TensorLocation


@dataclass
class LoadedWeights:
    """A stage's weights on the compute device (compressed ones as ``QTensor``); ``buffer`` is the
    read buffer they may live in; ``dequantized`` is filled by the first compute that needs it."""

    tensors: dict[str, torch.Tensor | QTensor]
    buffer: torch.Tensor | None
    copied_bytes: int
    dequantized: dict[str, torch.Tensor] | None = None
    converted: torch.Tensor | None = None  # the conversion buffer its converted weights live in
    dequant_buffer: torch.Tensor | None = None  # the buffer its dequantized weights live in (a CPU's)


@dataclass
class PlacedWeight:
    """A weight on its tier: one tensor, or a compressed weight's stored tensors (``qt`` says how
    to rebuild it), held in memory (``tensors``) or where they lie on disk (``locations``)."""

    spec: WeightSpec
    tier: str
    tensors: list[torch.Tensor] = field(default_factory=list)  # the gpu and cpu tiers
    locations: list[TensorLocation] = field(default_factory=list)  # the disk tier
    qt: QTensor | None = None  # the layout only (meta tensors): the data is in tensors or locations

    @property
    def nbytes(self) -> int:
        return sum(map(nbytes, self.tensors)) + sum(p.nbytes for p in self.locations)


def layout(qt: QTensor | None) -> QTensor | None:
    """``qt`` without its data (meta tensors), to rebuild it around the parts a load brings.
    Keeping ``qt`` itself kept every compressed weight in host memory a second time, untracked:
    on disk-tier weights, the whole model (0.4 GB of 4-bit opt-1.3b); on the gpu and cpu tiers,
    the copy from before the move, pinning or clone."""
    return None if qt is None else qt.with_tensors([t.to("meta") for t in qt.tensors()])


def conversion_bytes(loads: list[PlacedWeight], dtype: torch.dtype) -> int:
    """Bytes of a CPU's conversion buffer for a load of ``loads``: the plain weights read in place
    in another dtype than ``dtype``, each converted into it at an aligned offset."""
    return sum(
        align_up(loc.nbytes // loc.dtype.itemsize * dtype.itemsize)
        for w in loads
        if w.qt is None
        for loc in w.locations
        if loc.dtype != dtype
    )


def dequantized_bytes(loads: list[PlacedWeight], dtype: torch.dtype) -> int:
    """Bytes of ``loads``' compressed weights dequantized into ``dtype``."""
    return sum(math.prod(w.spec.shape) * dtype.itemsize for w in loads if w.qt is not None)
