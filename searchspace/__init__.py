"""Compression methods from published work, a registry of them, and one conditional search space."""

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical, Domain, Float, Int
from searchspace._profile import LayerLevel, SensitivityProfile
from searchspace._protocols import METHOD_PROTOCOLS, PROTOCOLS, ArtifactQuantization, Calibrated, DynamicInference, Profiled, artifact_quantization
from searchspace._registry import get_method, list_methods, register_method, registered, unregister_method
from searchspace._space import FINETUNE_HYPERPARAMETERS, Plan, SearchSpace

__all__ = [
    "FINETUNE_HYPERPARAMETERS",
    "METHOD_PROTOCOLS",
    "PROTOCOLS",
    "ApplyContext",
    "ArtifactQuantization",
    "Calibrated",
    "Categorical",
    "CompressionMethod",
    "Domain",
    "DynamicInference",
    "Float",
    "Int",
    "LayerLevel",
    "Plan",
    "Profiled",
    "SearchSpace",
    "SensitivityProfile",
    "Stage",
    "artifact_quantization",
    "get_method",
    "list_methods",
    "register_method",
    "registered",
    "unregister_method",
]
