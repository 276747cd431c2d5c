"""The base model as it is: the reference point every other method is compared against.

Changes from the paper: none (no paper; the trial still fine-tunes it like every other chain, so
the comparison is at equal training budget).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._registry import register_method
from searchspace._surgery import clone


@register_method
class NoCompression(CompressionMethod):
    """Keep the base architecture and weights; the trial only fine-tunes it."""

    name = "none"
    stage = Stage.STRUCTURE
    reference = "baseline"

    def apply(
        self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext
    ) -> nn.Module:
        return clone(model)
