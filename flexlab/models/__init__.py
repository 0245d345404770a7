"""Model families: configs as data, the maths as plain functions, checkpoint loading."""

from flexlab.models.config import ModelConfig, get_preset, preset_names
from flexlab.models.family import ModelFamily, WeightSpec
from flexlab.models.generation import GenerationResult, SamplingConfig
from flexlab.models.model import Model
from flexlab.models.registry import get_family, num_parameters, supported_families, weight_bytes

__all__ = [
    "Model",
    "ModelConfig",
    "ModelFamily",
    "WeightSpec",
    "GenerationResult",
    "SamplingConfig",
    "get_preset",
    "preset_names",
    "get_family",
    "supported_families",
    "weight_bytes",
    "num_parameters",
]
