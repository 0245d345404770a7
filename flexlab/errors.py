"""Exceptions flexlab raises for bad input. Each subclasses ValueError, so ``except ValueError``
still works; the messages name what was wrong and how to fix it."""


def fields_of(cls, d, error: type[Exception], what: str, example: str) -> dict:
    """``d`` checked as the fields of dataclass ``cls`` (a JSON object of them): an object, with no
    unknown field; raises ``error`` naming what is wrong. Returns a copy."""
    import dataclasses

    name = cls.__name__
    if not isinstance(d, dict):
        raise error(f"{what} is a JSON object of {name} fields, got a {type(d).__name__}; e.g. {example}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"unknown {name} field(s) {unknown}; valid fields: {sorted(known)}")
    return dict(d)


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


class MemoryLimitError(FlexlabError):
    """A policy whose predicted peak memory exceeds the process's memory limit."""
