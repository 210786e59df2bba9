"""Shared helpers of the method tests."""

from __future__ import annotations

import torch

from ptqlab.testing import tiny_model


def outlier_model(family: str, every: int = 7, factor: float = 8.0) -> torch.nn.Module:
    """A tiny model whose norms scale every ``every``-th channel by ``factor`` (activation outliers)."""
    model = tiny_model(family).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and p.dim() == 1:
                p[::every] *= factor
    return model


def ulp_sensitivity(model: torch.nn.Module, ids: torch.Tensor, seed: int = 0) -> float:
    """How far ``model``'s logits move when every parameter moves by one float32 ulp (random signs).

    A transform that keeps the function in exact arithmetic (SmoothQuant, AWQ, rotation folding) rounds
    each weight it rescales once or twice (a product and a quotient: at most 2 ulps), so its logits may
    differ from the original's by about this much times 2, and by more on a machine whose kernels add in
    another order: tests compare against a multiple of it rather than a number one machine happened to give.
    """
    eps = torch.finfo(torch.float32).eps
    g = torch.Generator().manual_seed(seed)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(ids).logits
        for p in model.parameters():
            signs = torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1
            p.mul_(1 + eps * signs)
        moved = model(ids).logits
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return float((moved - ref).abs().max())
