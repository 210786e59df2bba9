"""Static activation ranges: observe the inputs of the quantized linears over the calibration data."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError
from ..nn.activation import ActivationQuantizer, RangeObserver
from ..nn.runtime import RuntimeQuantization

log = logging.getLogger(__name__)


def calibrate_static_activations(
    model: nn.Module,
    runtime: RuntimeQuantization,
    calibration: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> int:
    """Fix the per-tensor range of every static activation quantizer from the calibration data.

    The model (with its quantized weights) runs over the calibration windows while the static quantizers
    observe their inputs and pass them through unchanged; then each one freezes its parameters.

    Args:
        model: The model with runtime quantization installed.
        runtime: What is installed.
        calibration: Token ids (samples, seqlen).
        batch_size: Windows per forward.
        progress: Show a progress bar.

    Returns:
        The number of quantizers calibrated.

    Raises:
        DataError: No calibration token reached a quantized input (an expert the router never chose).

    """
    if runtime.activations is None:
        return 0
    static: list[ActivationQuantizer] = []
    for q in runtime.activations.quantizers.values():
        if not q.act.dynamic and q not in static:
            static.append(q)
    if not static:
        return 0
    for q in static:
        q.observer = RangeObserver()
    device = next(model.parameters()).device
    with torch.inference_mode():
        for chunk in tqdm(calibration.split(batch_size), desc="static ranges", disable=not progress):
            model(input_ids=chunk.to(device), use_cache=False)
    unseen = [name for name, q in runtime.activations.quantizers.items() if q.observer is not None and q.observer.empty]
    if unseen:
        for q in static:
            q.observer = None
        raise DataError(f"static activation ranges: no calibration token reached {', '.join(unseen)} (an expert the "
                        "router never chose); use more calibration data or dynamic ranges")
    for q in static:
        assert q.observer is not None
        q.static = q.observer.qparams(q.act)
        q.observer = None
    log.info("static activation ranges fixed for %d inputs", len(static))
    return len(static)
