"""The layer kinds an adapter can go on, and their weight as the decomposition reads it."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style): a Linear whose weight is stored as (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def is_adaptable(module: nn.Module) -> bool:
    """The layers an adapter can go on: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (d_out, d_in), as the decomposition reads it: a view, so writing to
    it writes the layer (Conv1D stores the transpose)."""
    return module.weight.T if is_conv1d(module) else module.weight
