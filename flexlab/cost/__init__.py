"""Cost model, hardware calibration and policy search."""

from flexlab.cost.calibrate import calibrate, refresh
from flexlab.cost.hardware import PRESETS, HardwareProfile, get_hardware
from flexlab.cost.model import CostModel, Prediction
from flexlab.cost.pipeline import PipelinePrediction, PipelineSearchResult, predict_pipeline, search_pipeline
from flexlab.cost.search import SearchResult, fits, search_policy
from flexlab.engine.stage_cost import checkpoint_itemsize

__all__ = [
    "HardwareProfile",
    "get_hardware",
    "PRESETS",
    "CostModel",
    "checkpoint_itemsize",
    "Prediction",
    "PipelinePrediction",
    "predict_pipeline",
    "search_pipeline",
    "PipelineSearchResult",
    "calibrate",
    "refresh",
    "search_policy",
    "SearchResult",
    "fits",
]
