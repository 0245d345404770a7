"""flexlab: offloaded LLM inference you can look inside.

    >>> import flexlab
    >>> model = flexlab.Model.from_config("opt-tiny", seed=0)
    >>> model.config.num_layers
    2

The names below load on first use, so ``import flexlab.viz`` or ``flexlab --help`` does not pay
for torch and the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Model": "flexlab.models",
    "ModelConfig": "flexlab.models",
    "GenerationResult": "flexlab.models",
    "get_preset": "flexlab.models",
    "preset_names": "flexlab.models",
    "pydoc_model_path": "flexlab.models.pydoc_model",
    "Engine": "flexlab.engine",
    "Policy": "flexlab.engine",
    "PolicyError": "flexlab.engine",
    "OffloadError": "flexlab.errors",
    "QuantConfig": "flexlab.compress",
    "CacheQuantConfig": "flexlab.compress",
    "QTensor": "flexlab.compress",
    "QuantError": "flexlab.compress",
    "Timeline": "flexlab.timeline",
    "Event": "flexlab.timeline",
    "FlexlabError": "flexlab.errors",
    "ConfigError": "flexlab.errors",
    "CheckpointError": "flexlab.errors",
    "PromptError": "flexlab.errors",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see
    from flexlab.compress import CacheQuantConfig, QTensor, QuantConfig, QuantError
    from flexlab.engine import Engine, Policy, PolicyError
    from flexlab.errors import CheckpointError, ConfigError, FlexlabError, OffloadError, PromptError
    from flexlab.models import GenerationResult, Model, ModelConfig, get_preset, preset_names
    from flexlab.models.pydoc_model import pydoc_model_path
    from flexlab.timeline import Event, Timeline


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flexlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
