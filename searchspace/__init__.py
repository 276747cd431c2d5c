"""Compression methods from published work, a registry of them, and one conditional search space."""

from searchspace._base import ApplyContext, ArtifactQuantization, CompressionMethod, Stage, artifact_quantization
from searchspace._domains import Categorical, Domain, Float, Int
from searchspace._registry import get_method, list_methods, register_method
from searchspace._space import FINETUNE_HYPERPARAMETERS, Plan, SearchSpace

__all__ = [
    "FINETUNE_HYPERPARAMETERS",
    "ApplyContext",
    "ArtifactQuantization",
    "Categorical",
    "CompressionMethod",
    "Domain",
    "Float",
    "Int",
    "Plan",
    "SearchSpace",
    "Stage",
    "artifact_quantization",
    "get_method",
    "list_methods",
    "register_method",
]
