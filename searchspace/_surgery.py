"""Helpers for methods that replace layers inside a model."""

from __future__ import annotations

import copy
from typing import Iterator

from torch import nn

__all__ = ["ConvNd", "clone", "iter_convs", "replace"]

ConvNd = (nn.Conv1d, nn.Conv2d)


def clone(model: nn.Module) -> nn.Module:
    """A deep copy, so that ``apply`` never edits the model it was given."""
    return copy.deepcopy(model)


def iter_convs(model: nn.Module) -> Iterator[tuple[str, nn.Conv1d | nn.Conv2d]]:
    """Qualified names and modules of every plain (non-transposed) 1D/2D convolution."""
    for name, module in model.named_modules():
        if type(module) in ConvNd:
            yield name, module


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    model.set_submodule(name, new)
