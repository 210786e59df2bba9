"""Outlier decomposition in the pipeline: choose each linear input's FP16 columns, quantize around them.

The columns are chosen from one pass of the model (as it stands after the model transforms, before any
weight is quantized) over the calibration windows: the largest magnitude of each input column of every
quantized linear (weights or activations), by :class:`ptqlab.quant.outliers.OutlierRule`. Linears that
read the same tensor (q/k/v) see the same magnitudes and get the same columns.

A weight is then quantized with its outlier columns set to zero and decoupled in the Hessian (zero rows
and columns, the regular columns' mean on the diagonal), which for every quantizer is the quantization of
the other columns alone: a zero column does not widen a symmetric or zero-containing range, and GPTQ's
error feedback does not reach a decoupled column. The outlier columns then get their values back, rounded
to FP16.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods.base import WeightResult
from ..methods.kinds import Quantizer
from ..models.inputs import linear_input_site, register_input_hook
from ..models.weights import in_features
from ..quant.spec import QuantSpec
from .plan import QuantizationPlan

log = logging.getLogger(__name__)


class _ColumnMax:
    """Running largest magnitude of each input column."""

    def __init__(self) -> None:
        self.absmax: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        if x.numel() == 0:  # an expert no token was routed to
            return
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)


def find_outlier_columns(model: nn.Module, plan: QuantizationPlan, progress: bool = True) -> dict[str, torch.Tensor]:
    """The FP16 input columns of each quantized linear (bool masks by full name; only linears that have any).

    Args:
        model: The model, resident, after its model transforms.
        plan: The plan; ``plan.outliers`` and ``plan.calibration`` must be set.
        progress: Show a progress bar.

    Returns:
        A mask (in_features,) per linear with at least one outlier column.

    """
    assert plan.outliers is not None and plan.calibration is not None
    names = sorted({t.name for t in plan.targets if t.spec.enabled} | {name for name, _, _ in plan.activations})
    observers = {name: _ColumnMax() for name in names}
    handles = [register_input_hook(linear_input_site(model, plan.adapter, n), observers[n]) for n in names]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for chunk in tqdm(plan.calibration.split(plan.batch_size), desc="outlier columns", disable=not progress):
                model(input_ids=chunk.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    masks = {}
    for name, obs in observers.items():
        if obs.absmax is not None:
            keep = plan.outliers.select(obs.absmax)
            if bool(keep.any()):
                masks[name] = keep
    kept = sum(int(m.sum()) for m in masks.values())
    log.info("outlier decomposition: %d FP16 input columns over %d of %d linears", kept, len(masks), len(names))
    return masks


def quantize_decomposed(quantizer: Quantizer, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None,
                        keep: torch.Tensor | None) -> WeightResult:
    """Quantize ``W`` (out, in) with the columns ``keep`` left in full precision (see the module docstring)."""
    if keep is None or not bool(keep.any()):
        return quantizer.quantize(W, spec, H)
    keep = keep.to(W.device)
    regular = W.detach().clone()
    regular[:, keep] = 0
    if H is not None:
        H = H.clone()
        H[keep, :] = 0
        H[:, keep] = 0
        diag = torch.diagonal(H)
        diag[keep] = diag[~keep].mean() if bool((~keep).any()) else 1.0
    res = quantizer.quantize(regular, spec, H)
    weight = res.weight.clone()
    weight[:, keep] = W.detach()[:, keep].half().to(weight.dtype)
    return WeightResult(weight=weight, codes=res.codes, qparams=res.qparams, g_idx=res.g_idx)


def outlier_masks(indices: dict[str, list[int]], model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks from kept column indices by linear name (how a kept quantized model stores them)."""
    masks = {}
    for name, cols in indices.items():
        mask = torch.zeros(in_features(model.get_submodule(name)), dtype=torch.bool)
        mask[torch.tensor(cols, dtype=torch.long)] = True
        masks[name] = mask
    return masks
