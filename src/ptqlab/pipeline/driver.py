"""The layer-by-layer driver: the one place that loops over decoder layers to quantize their weights."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..memory import return_freed
from ..methods.base import HessianAccumulator, WeightResult, divide_rows, relative_output_error, scaled_hessian
from ..methods.kinds import Quantizer
from ..methods.rtn import RTN
from ..metrics import Metric
from ..models.inputs import input_site
from ..models.weights import set_weight_matrix, weight_matrix
from ..nn.capture import LayerCall, capture_inputs
from ..nn.runtime import RuntimeQuantization
from ..quant.spec import QuantSpec
from ..threads import fit_threads, single_thread
from .budget import hidden_spill, per_group_passes
from .layer_stream import LayerStream
from .malloc import lean_malloc
from .outliers import quantize_decomposed
from .plan import LinearTarget, QuantizationPlan, RunOptions
from .refine import LaterSteps
from .sequential import run_group_passes, run_layer_pass
from .transforms import LayerTransforms, divide_by

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """What happened to one linear: its relative output error on the calibration data and the time.

    ``tokens``: how many calibration tokens its Hessian came from (None: quantized without data); for an
    expert of a mixture-of-experts layer, the tokens routed to it. ``fallback``: the quantizer used instead
    of the recipe's because it saw too few (``rtn``), else None.
    """

    layer: int
    module: str
    bits: int
    rel_error: float | None
    seconds: float
    tokens: int | None = None
    fallback: str | None = None


@dataclass
class WeightGrid:
    """The grid a linear's weight was quantized on: ``weight == scale * (codes - zero)`` for integer codes.

    ``scale`` and ``zero`` are (out, groups); ``g_idx`` maps each input column to its group (None: groups
    follow the columns). Exporters write the codes these give; a later step that moves the weight off the
    grid (a low-rank correction, a refiner) is found when they check it.
    """

    module: nn.Module
    spec: QuantSpec
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None = None


@dataclass
class QuantizeReport:
    """What a quantization did: per-linear records, timings, the runtime quantizers and hooks it installed.

    Attributes:
        records: One per quantized linear, in the order they were quantized.
        timings: Seconds per phase.
        runtime: The activation / KV quantizers installed (``runtime.remove()`` takes them off).
        distill: The refiners' losses, ``{"layer", "start", "best"}`` (layer -1: a model refiner).
        hooks: Handles of hooks a model transform installed (the online rotation).
        metrics: Size, effective bits and what the methods report (``zeroquant.local.loss_ratio``).
        grids: The grid of each quantized linear, by full name, when the run keeps them (``RunOptions.keep_grids``;
            what exporters write).
        outliers: The input columns the outlier decomposition keeps in FP16, by full linear name (bool masks).

    """

    records: list[LayerRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    runtime: RuntimeQuantization | None = None
    distill: list[dict[str, float]] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    grids: dict[str, WeightGrid] = field(default_factory=dict)
    outliers: dict[str, torch.Tensor] = field(default_factory=dict)

    def keep_grid(self, name: str, module: nn.Module, spec: QuantSpec, result: WeightResult) -> None:
        """Record the grid ``result`` put ``module``'s weight on."""
        qp = result.qparams
        self.grids[name] = WeightGrid(module, spec, qp.scale.detach().clone(), qp.zero.detach().clone(),
                                      None if result.g_idx is None else result.g_idx.clone())

    def rows_divided(self, module: nn.Module, rows: torch.Tensor, s: torch.Tensor) -> None:
        """A transform divided ``rows`` of an already quantized ``module`` by ``s``: so are their scales."""
        for grid in self.grids.values():
            if grid.module is module:
                grid.scale = divide_rows(grid.scale, rows, s)
                if grid.spec.offset_zero:  # scale * code + zero: the offset scales with the row
                    grid.zero = divide_rows(grid.zero, rows, s)


def quantize_weights(
    model: nn.Module, plan: QuantizationPlan, report: QuantizeReport, progress: bool, stream: LayerStream | None = None,
    *, options: RunOptions = RunOptions(),
) -> None:
    """Quantize the weights of ``plan.targets`` in place, sequentially layer by layer, where the model is.

    Data-free recipes (RTN) quantize each weight directly and never run the model. Calibrated recipes
    capture the inputs of layer 0 once, then for each layer run one true-sequential pass (see
    :mod:`ptqlab.pipeline.sequential`) that observes each linear group, folds the layer transforms,
    quantizes the group and feeds the quantized outputs to the next layer; refiners and compensators
    run at their points (see :mod:`ptqlab.pipeline.refine`). With a ``stream`` (see
    :mod:`ptqlab.pipeline.stream`) the model is a skeleton and each layer is resident only while it is worked on.
    ``options`` say how calibration fits the memory, whether the grids are kept and which layer-0 inputs are shared.

    Raises:
        ConfigError: A calibrated recipe without calibration data.

    """
    recipe = plan.recipe
    if not plan.targets and not recipe.layer_transforms:
        return
    later = LaterSteps(model, recipe)
    if not recipe.needs_calibration and not plan.measures_layer_errors:
        _quantize_data_free(model, plan, options, later, report, progress, stream)
    else:
        if plan.calibration is None or plan.calibration.numel() == 0:
            raise ConfigError(f"method {recipe.name} needs calibration data, but none was given")
        with lean_malloc():
            _quantize_calibrated(model, plan, options, plan.calibration, later, report, progress, stream)
    report.distill = later.losses
    report.metrics += later.metrics()


def _quantizer_for(quantizer: Quantizer, tokens: int) -> tuple[Quantizer, str | None]:
    """The quantizer of a linear whose Hessian came from ``tokens`` calibration tokens, and the fallback's name.

    Below the quantizer's ``min_tokens`` (GPTQ's option; 1 for others: never from a zero Hessian) the weight
    is rounded to nearest, e.g. an expert the router sent too few tokens.
    """
    if tokens >= quantizer.min_tokens:
        return quantizer, None
    return RTN(), "rtn"


def _by_layer(targets: list[LinearTarget]) -> dict[int, list[LinearTarget]]:
    out: dict[int, list[LinearTarget]] = defaultdict(list)
    for t in targets:
        out[t.layer].append(t)
    return out


def _both(*steps: Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
          ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], None]:
    """One callback that calls each of ``steps``."""

    def call(module: nn.Module, rows: torch.Tensor, s: torch.Tensor) -> None:
        for step in steps:
            step(module, rows, s)

    return call


def _resident(stream: LayerStream | None, li: int) -> AbstractContextManager[Any]:
    """Layer ``li`` made resident by the stream for the block (nothing to do for a resident model)."""
    return nullcontext() if stream is None else stream.layer(li)


def _quantize_data_free(
    model: nn.Module, plan: QuantizationPlan, options: RunOptions, later: LaterSteps, report: QuantizeReport,
    progress: bool, stream: LayerStream | None,
) -> None:
    layers = plan.adapter.layers(model)
    bar = tqdm(sorted(_by_layer(plan.targets).items()), desc="quantize", unit="layer", disable=not progress)
    for li, group in bar:
        with _resident(stream, li):
            _quantize_directly(layers[li], li, group, plan, later, report, options.keep_grids)


def _quantize_directly(layer: nn.Module, li: int, group: list[LinearTarget], plan: QuantizationPlan,
                       later: LaterSteps, report: QuantizeReport, keep_grids: bool) -> None:
    """Quantize each target of one layer from its weight alone."""
    for t in group:
        t0 = time.perf_counter()
        module = layer.get_submodule(t.relative)
        W = weight_matrix(module)
        quantized = quantize_decomposed(plan.recipe.quantizer, W, t.spec, None, report.outliers.get(t.name))
        res = later.quantized(module, W, quantized, t.spec)
        set_weight_matrix(module, res.weight)
        if keep_grids:
            report.keep_grid(t.name, module, t.spec, res)
        report.records.append(LayerRecord(li, t.name, t.spec.nbits, None, time.perf_counter() - t0))


def _quantize_calibrated(
    model: nn.Module,
    plan: QuantizationPlan,
    options: RunOptions,
    calibration: torch.Tensor,
    later: LaterSteps,
    report: QuantizeReport,
    progress: bool,
    stream: LayerStream | None,
) -> None:
    layers = plan.adapter.layers(model)
    device = next(model.parameters()).device if stream is None else stream.device
    t0 = time.perf_counter()
    chunks = [c.to(device) for c in calibration.split(plan.batch_size)]
    if stream is not None:
        with stream.outer():
            captured = capture_inputs(model, layers, chunks)
    elif options.inputs is not None and not plan.recipe.model_transforms:  # the embeddings are still the FP model's
        captured = options.inputs.capture(model, layers, chunks)
    else:
        captured = capture_inputs(model, layers, chunks)
    report.timings["capture_s"] = time.perf_counter() - t0
    hidden: list[torch.Tensor | None] = list(captured.hidden)
    del captured.hidden[:]
    per_group = per_group_passes(options, layers[0], hidden)
    spill = hidden_spill(options, hidden)
    if spill is not None:
        hidden = list(spill.keep([h for h in hidden if h is not None]))
    by_layer = _by_layer(plan.targets)
    config = getattr(model, "config", None)
    # past the last layer with a target nothing changes, unless transforms fold scales into every layer
    end = len(layers) if plan.recipe.layer_transforms or not by_layer else max(by_layer) + 1
    bar = tqdm(range(end), desc="quantize", unit="layer", disable=not progress)
    for li in bar:
        fit_threads()
        layer = layers[li]
        with _resident(stream, li):
            tf = LayerTransforms(config, plan.adapter, layer, plan.recipe.layer_transforms,
                                 _both(later.rows_divided, report.rows_divided))
            later.before_layer(layer, hidden, captured.calls[li])
            outputs = _quantize_layer(layer, li, plan, by_layer.get(li, []), hidden, captured.calls[li], report,
                                      tf, later, per_group, options.keep_grids)
            outputs = later.after_layer(layer, li, captured.calls[li], outputs)
        if tf.skipped and li == 0:
            log.info("transforms skipped where nothing can absorb a scale: groups %s", ", ".join(tf.skipped))
        hidden = list(outputs) if spill is None else list(spill.keep(outputs))
        del outputs
        return_freed()  # the chunk threads' freed intermediates, left in their malloc arenas
        errs = [r.rel_error for r in report.records if r.layer == li and r.rel_error is not None]
        if errs:
            bar.set_postfix(err=f"{sum(errs) / len(errs):.4f}")
    del hidden
    later.after_loop(model, chunks)


def _quantize_layer(
    layer: nn.Module,
    li: int,
    plan: QuantizationPlan,
    targets: list[LinearTarget],
    hidden: list[torch.Tensor | None],
    calls: list[LayerCall],
    report: QuantizeReport,
    tf: LayerTransforms,
    later: LaterSteps,
    per_group: bool = False,
    keep_grids: bool = False,
) -> list[torch.Tensor]:
    """One true-sequential pass over a layer (or a pass per group); returns its outputs (the next layer's inputs)."""
    groups = [[input_site(tf.config, plan.adapter, layer, rel) for rel in g.linears] for g in plan.adapter.groups]
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
        quantizer, fallback = _quantizer_for(plan.recipe.quantizer, acc.n)
        with single_thread():
            for t in members[gi]:
                t0 = time.perf_counter()
                module = layer.get_submodule(t.relative)
                W = weight_matrix(module)
                quantized = quantize_decomposed(quantizer, W, t.spec, H, report.outliers.get(t.name))
                res = later.quantized(module, W, quantized, t.spec)
                err = relative_output_error(W.float(), res.weight, H) if acc.n else None
                set_weight_matrix(module, res.weight)
                if keep_grids:
                    report.keep_grid(t.name, module, t.spec, res)
                report.records.append(LayerRecord(li, t.name, t.spec.nbits, err, time.perf_counter() - t0, acc.n,
                                                  fallback))
        if fallback is not None:
            log.warning("layer %d: %s saw %d calibration tokens, too few for %s: rounded to nearest instead", li,
                        ", ".join(t.relative for t in members[gi]), acc.n, plan.recipe.name)

    run = run_group_passes if per_group else run_layer_pass
    return run(layer, groups, hidden, calls, observe, apply, input_map)
