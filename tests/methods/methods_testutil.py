"""Shared helpers of the method tests."""

from __future__ import annotations

import torch

from ptqlab.models.tiny import tiny_model


def outlier_model(family: str, every: int = 7, factor: float = 8.0) -> torch.nn.Module:
    """A tiny model whose norms scale every ``every``-th channel by ``factor`` (activation outliers)."""
    model = tiny_model(family).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and p.dim() == 1:
                p[::every] *= factor
    return model
