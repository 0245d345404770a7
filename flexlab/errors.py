"""Exceptions flexlab raises for bad input. Each subclasses ValueError, so ``except ValueError``
still works; the messages name what was wrong and how to fix it."""


class FlexlabError(ValueError):
    """Base class of flexlab's input errors."""


class ConfigError(FlexlabError):
    """An invalid model configuration or an unknown preset."""


class CheckpointError(FlexlabError):
    """A checkpoint that cannot be found, read or understood."""


class PromptError(FlexlabError):
    """Prompts or generation arguments that cannot be run."""


class OffloadError(FlexlabError):
    """The offload directory cannot be used (not writable, not enough space, the disk filled)."""
