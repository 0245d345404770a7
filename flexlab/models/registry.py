"""Which family runs a ``model_type``, and the sizes that need a family's weight specs.

The import graph runs one way: ``config`` (data) ← ``family`` (the interface) ← ``opt``,
``llama`` (the families) ← this registry ← everything that looks a family up by name.

Example:
    >>> from flexlab.models import get_preset, registry
    >>> round(registry.weight_bytes(get_preset("opt-1.3b"), 2) / 2**30, 2)  # GiB in float16
    2.45
"""

from __future__ import annotations

from flexlab.errors import ConfigError
from flexlab.models import bloom, codegen, glm, llama, opt
from flexlab.models.config import ModelConfig
from flexlab.models.family import ModelFamily

# Hugging Face ``model_type`` -> the family that runs it.
_FAMILIES: dict[str, ModelFamily] = {
    "opt": opt.FAMILY,
    **dict.fromkeys(llama.MODEL_TYPES, llama.FAMILY),
    "bloom": bloom.FAMILY,
    "codegen": codegen.FAMILY,
    **dict.fromkeys(glm.MODEL_TYPES, glm.FAMILY),
}


def get_family(name: str) -> ModelFamily:
    """The family that runs ``name`` (a Hugging Face ``model_type``, as ``ModelConfig.family``)."""
    if name in glm.REMOTE_ONLY:
        raise glm.refuse_remote_code(name)
    if name not in _FAMILIES:
        raise ConfigError(f"unsupported model type {name!r}; supported: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def supported_families() -> list[str]:
    """Every ``model_type`` flexlab runs."""
    return list(_FAMILIES)


def weight_bytes(config: ModelConfig, bytes_per_elem: float = 2, *, layer: int | None | str = "all") -> float:
    """Bytes of a model's weights: all of them, one layer's (``layer=3``), or those outside
    the layers (``layer=None``: embeddings, final norm, projections). A tied head counts once."""
    specs = get_family(config.family).weight_specs(config)
    return sum(s.numel for s in specs if layer == "all" or s.layer == layer) * bytes_per_elem


def num_parameters(config: ModelConfig) -> int:
    """Parameters of the model (a tied head counts once)."""
    return int(weight_bytes(config, 1))
