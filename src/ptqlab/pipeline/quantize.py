"""Run a quantization plan on a model: the pipeline's entry point, and the one owner of device placement.

The model goes to its device once (:func:`place`); everything after runs where the model is: the model
transforms (rotation), the layer loop over the weights, the runtime quantizers (activations, attention
inputs, KV cache) and the static activation ranges.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..metrics import Metric
from ..nn.runtime import install_runtime
from .activations import calibrate_static_activations
from .driver import QuantizeReport, quantize_weights
from .embedding import round_embedding
from .outliers import find_outlier_columns
from .plan import EmbeddingTarget, QuantizationPlan, RunOptions

log = logging.getLogger(__name__)

_MARK = "_ptqlab_quantized"


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``model`` (every parameter and buffer) to ``device``; tied weights stay tied."""
    dev = torch.device(device)
    first = next(model.parameters(), None)
    if first is None or first.device != dev or any(p.device != dev for p in model.parameters()):
        model.to(dev)
        log.debug("model placed on %s", dev)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether :func:`quantize` changed this model (its weights or its forward)."""
    return bool(getattr(model, _MARK, False))


def quantize(
    model: nn.Module, plan: QuantizationPlan, *, device: torch.device | str | None = None, progress: bool = True,
    options: RunOptions = RunOptions(),
) -> QuantizeReport:
    """Quantize ``model`` in place according to a prepared plan.

    Model transforms run first, then the weights are quantized layer by layer; then activation,
    attention-input and KV cache quantizers are installed (``report.runtime``; its ``remove()`` takes them
    off again) and static activation ranges calibrated. The report's metrics hold the model's size and
    effective bits and what the methods report.

    Args:
        model: The causal LM the plan was made for.
        plan: From :func:`ptqlab.api.plan_quantization` (or :func:`ptqlab.compile.compile_quantization`).
        device: Where to run; None keeps the model where it is.
        progress: Show progress bars.
        options: How to run it (layer pass, memory budget, offload directory, kept grids, shared inputs).

    Returns:
        The report.

    """
    if device is not None:
        place(model, device)
    report = QuantizeReport()
    t0 = time.perf_counter()
    for transform in plan.recipe.model_transforms:
        report.hooks += transform.apply(model, plan.adapter)
    if plan.recipe.model_transforms:
        report.timings["model_transforms_s"] = time.perf_counter() - t0
    if plan.outliers is not None:
        report.outliers = find_outlier_columns(model, plan, progress)
    quantize_weights(model, plan, report, progress, options=options)
    if plan.embedding is not None:
        quantize_embedding(model, plan.embedding, report, options.keep_grids)
    report.timings["quantize_s"] = time.perf_counter() - t0
    _finish(model, plan, report, progress)
    return report


def quantize_embedding(model: nn.Module, target: EmbeddingTarget, report: QuantizeReport, keep_grid: bool) -> None:
    """Round the input embedding matrix to nearest on ``target.spec``, in place (after the layer loop).

    An output head tied to the matrix is the same tensor and takes the same values.
    """
    module = model.get_submodule(target.name)
    weight = module.get_parameter("weight")
    rounded = round_embedding(weight, target, module, report, keep_grid)
    with torch.no_grad():
        weight.copy_(rounded)


def restore(
    model: nn.Module, plan: QuantizationPlan, weights: dict[str, torch.Tensor], report: QuantizeReport,
    *, progress: bool = True,
) -> QuantizeReport:
    """Make ``model`` (the FP model ``plan`` was made for) the quantized model a finished run kept.

    ``weights`` are the tensors :func:`quantize` changed (by state-dict name; the model's structure must be
    the FP model's, i.e. no model transform installed hooks); the runtime quantizers and static ranges are
    installed as :func:`quantize` does. ``report`` holds what the run that quantized it recorded (layer
    records, the methods' metrics); size metrics are measured again.

    Raises:
        ValueError: A name in ``weights`` that the model does not have, or a shape that differs.

    """
    state = model.state_dict()
    for name, tensor in weights.items():
        if name not in state or state[name].shape != tensor.shape:
            raise ValueError(f"kept quantized weight {name!r} does not fit the model")
    with torch.no_grad():
        for name, tensor in weights.items():
            state[name].copy_(tensor)
    _finish(model, plan, report, progress)
    return report


def _finish(model: nn.Module, plan: QuantizationPlan, report: QuantizeReport, progress: bool) -> None:
    """Install the runtime quantizers, calibrate static ranges, measure the size, mark the model."""
    report.runtime = install_runtime(model, plan.adapter, plan.activations, plan.kv, plan.attention)
    if report.outliers and report.runtime.activations is not None:
        for name, quantizer in report.runtime.activations.quantizers.items():
            if name in report.outliers:
                quantizer.keep = report.outliers[name].to(next(model.parameters()).device)
    if plan.calibration is not None and any(not a.dynamic for _, _, a in plan.activations):
        t1 = time.perf_counter()
        calibrate_static_activations(model, report.runtime, plan.calibration, plan.batch_size, progress)
        report.timings["static_ranges_s"] = time.perf_counter() - t1
    kept = {name: int(mask.sum()) for name, mask in report.outliers.items()}
    report.metrics = [Metric(k, v) for k, v in plan.size_metrics(model, outliers=kept).items()] + report.metrics
    if plan.changes_weights or report.runtime.installed:
        setattr(model, _MARK, True)
