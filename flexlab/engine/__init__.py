"""The offloading engine: policy, tiers, the block schedule, the executor and the timeline."""

from flexlab.engine.engine import Engine, OffloadError
from flexlab.engine.policy import Policy, PolicyError
from flexlab.timeline import Event, Timeline

__all__ = ["Engine", "OffloadError", "Policy", "PolicyError", "Event", "Timeline"]
