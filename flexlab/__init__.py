"""flexlab: offloaded LLM inference you can look inside.

    >>> import flexlab
    >>> model = flexlab.Model.from_config("opt-tiny", seed=0)
    >>> model.config.num_layers
    2
"""

from flexlab.compress import QTensor, QuantConfig, QuantError
from flexlab.engine import Engine, Event, OffloadError, Policy, PolicyError, Timeline
from flexlab.errors import CheckpointError, ConfigError, FlexlabError, PromptError
from flexlab.models import GenerationResult, Model, ModelConfig, get_preset, preset_names
from flexlab.models.pydoc_model import pydoc_model_path

__version__ = "0.1.0"

__all__ = ["Model", "ModelConfig", "Engine", "Policy", "QuantConfig", "QTensor", "Timeline", "Event", "GenerationResult",
           "get_preset", "preset_names", "pydoc_model_path",
           "FlexlabError", "ConfigError", "CheckpointError", "PromptError", "PolicyError", "OffloadError", "QuantError"]
