"""The layer-by-layer driver: the one place that loops over decoder layers and moves devices."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..methods import WeightQuantizer
from ..methods.base import HessianAccumulator, relative_output_error, scaled_hessian
from ..models.adapter import Adapter
from ..models.weights import set_weight_matrix, weight_matrix
from ..nn.runtime import RuntimeQuantization
from .capture import LayerCall, capture_inputs
from .malloc import lean_malloc
from .plan import LinearTarget
from .refine import Refinement
from .rotate import rotate_model
from .sequential import run_layer_pass
from .transforms import LayerTransforms, divide_by

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """What happened to one linear: its relative output error on the calibration data and the time."""

    layer: int
    module: str
    bits: int
    rel_error: float | None
    seconds: float


@dataclass
class QuantizeReport:
    """Per-linear records and phase timings of one quantization, and the runtime quantizers installed."""

    records: list[LayerRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    runtime: RuntimeQuantization | None = None
    distill: list[dict[str, float]] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run small dense solves on one thread (2-thread Cholesky collapses when a core is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    targets: list[LinearTarget],
    method: WeightQuantizer,
    calibration: torch.Tensor | None = None,
    device: torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize the weights of ``targets`` in place, sequentially layer by layer.

    Data-free methods (RTN) quantize each weight directly and never run the model. Calibrated methods
    (GPTQ) capture the inputs of layer 0 once, then for each layer run one true-sequential pass
    (see :mod:`ptqlab.pipeline.sequential`) whose outputs feed the next layer.

    Args:
        model: The causal LM, on the CPU (or already on ``device``).
        adapter: Its family adapter.
        targets: The linears to quantize and their specs (from :func:`plan_weights`).
        method: The weight quantizer.
        calibration: Token ids (samples, seqlen) for calibrated methods.
        device: Where each layer is processed; None keeps the model's device.
        batch_size: Calibration samples per chunk.
        progress: Show a progress bar per layer.

    Returns:
        Per-linear records and timings.

    """
    report = QuantizeReport()
    t0 = time.perf_counter()
    rotation = getattr(method, "rotation", None)
    if rotation is not None:
        report.hooks = rotate_model(model, adapter, rotation)
        report.timings["rotation_s"] = time.perf_counter() - t0
    if not targets and not getattr(method, "transforms", ()):
        return report
    if not method.needs_calibration:
        _quantize_data_free(model, adapter, targets, method, report, progress)
    else:
        if calibration is None or calibration.numel() == 0:
            raise ConfigError(f"method {getattr(method, 'name', type(method).__name__)} needs calibration data, "
                              "but none was given")
        with lean_malloc():
            _quantize_calibrated(model, adapter, targets, method, calibration, device, batch_size, report, progress)
    report.timings["quantize_s"] = time.perf_counter() - t0
    return report


def _by_layer(targets: list[LinearTarget]) -> dict[int, list[LinearTarget]]:
    out: dict[int, list[LinearTarget]] = defaultdict(list)
    for t in targets:
        out[t.layer].append(t)
    return out


def _quantize_data_free(
    model: nn.Module,
    adapter: Adapter,
    targets: list[LinearTarget],
    method: WeightQuantizer,
    report: QuantizeReport,
    progress: bool,
) -> None:
    layers = adapter.layers(model)
    bar = tqdm(sorted(_by_layer(targets).items()), desc="quantize", unit="layer", disable=not progress)
    for li, group in bar:
        for t in group:
            t0 = time.perf_counter()
            module = layers[li].get_submodule(t.relative)
            W = weight_matrix(module)
            res = method.quantize(W, t.spec)
            set_weight_matrix(module, res.weight)
            report.records.append(LayerRecord(li, t.name, t.spec.nbits, None, time.perf_counter() - t0))


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer to ``device``."""
    inside = {id(m) for m in layers.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)  # same Parameter object: tied weights stay tied
        for name, b in list(module.named_buffers(recurse=False)):
            if b.device != device:
                module.register_buffer(name, b.to(device))


def _quantize_calibrated(
    model: nn.Module,
    adapter: Adapter,
    targets: list[LinearTarget],
    method: WeightQuantizer,
    calibration: torch.Tensor,
    device: torch.device | None,
    batch_size: int,
    report: QuantizeReport,
    progress: bool,
) -> None:
    layers = adapter.layers(model)
    home = next(model.parameters()).device
    device = device or home
    if device != home:
        _move_outside_layers(model, layers, device)
    t0 = time.perf_counter()
    chunks = [c.to(device) for c in calibration.split(batch_size)]
    captured = capture_inputs(model, layers, chunks)
    report.timings["capture_s"] = time.perf_counter() - t0
    hidden: list[torch.Tensor | None] = list(captured.hidden)
    del captured.hidden[:]
    by_layer = _by_layer(targets)
    refine = Refinement(model, method)
    bar = tqdm(range(len(layers)), desc="quantize", unit="layer", disable=not progress)
    for li in bar:
        layer = layers[li].to(device)
        tf = LayerTransforms(
            getattr(model, "config", None), adapter, layer, getattr(method, "transforms", ()), refine.rows_divided
        )
        refine.before_layer(layer, hidden, captured.calls[li])
        outputs = _quantize_layer(layer, li, adapter, by_layer.get(li, []), method, hidden, captured.calls[li],
                                  report, tf, refine)
        outputs = refine.after_layer(layer, li, captured.calls[li], outputs)
        if tf.skipped and li == 0:
            log.info("transforms skipped where nothing can absorb a scale: groups %s", ", ".join(tf.skipped))
        hidden = list(outputs)
        layers[li].to(home)
        errs = [r.rel_error for r in report.records if r.layer == li and r.rel_error is not None]
        if errs:
            bar.set_postfix(err=f"{sum(errs) / len(errs):.4f}")
    del hidden
    if refine.active:
        model.to(device)
        refine.after_loop(model, calibration, batch_size)
        model.to(home)
        report.distill = refine.losses
    if device != home:
        _move_outside_layers(model, layers, home)


def _quantize_layer(
    layer: nn.Module,
    li: int,
    adapter: Adapter,
    targets: list[LinearTarget],
    method: WeightQuantizer,
    hidden: list[torch.Tensor | None],
    calls: list[LayerCall],
    report: QuantizeReport,
    tf: LayerTransforms,
    refine: Refinement,
) -> list[torch.Tensor]:
    """One true-sequential pass over a layer; returns its outputs (the next layer's inputs)."""
    groups = [[layer.get_submodule(rel) for rel in g.linears] for g in adapter.groups]
    members = {gi: [t for t in targets if t.group == gi] for gi in range(len(groups))}
    hessians: dict[int, HessianAccumulator] = {}
    input_map: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}

    def observe(gi: int, x: torch.Tensor) -> None:
        tf.observe(gi, x)
        if members[gi]:
            acc = hessians.setdefault(gi, HessianAccumulator(x.shape[-1], x.device))
            acc.add(x)

    def apply(gi: int) -> None:
        acc = hessians.pop(gi, None)
        specs = {t.relative: t.spec for t in members[gi]}
        s = tf.apply(gi, None if acc is None else acc.H, specs)
        if s is not None:
            input_map[gi] = divide_by(s)
        if acc is None:
            return
        H = acc.H if s is None else scaled_hessian(acc.H, s)
        with _single_thread():
            for t in members[gi]:
                t0 = time.perf_counter()
                module = layer.get_submodule(t.relative)
                W = weight_matrix(module)
                res = method.quantize(W, t.spec, H)
                err = relative_output_error(W.float(), res.weight, H)
                refine.keep(module, W, res, t.spec)
                set_weight_matrix(module, res.weight)
                report.records.append(LayerRecord(li, t.name, t.spec.nbits, err, time.perf_counter() - t0))

    return run_layer_pass(layer, groups, hidden, calls, observe, apply, input_map)
