"""The search's signal: what each unit adds to the loss at each menu point, measured once and cached.

Every signal starts from the model quantized uniformly at each menu point, by the base configuration's own
recipe and calibration (through :func:`ptqlab.study.resident.quantize_or_restore`, so the quantized weights
are the ones the uniform baseline runs restore, and the other way round). Then, per unit ``u`` and menu
point ``m``:

- ``kl``: the measured KL(FP || Q) increase when only ``u`` moves from the base point to ``m`` (every other
  unit at the base point, or FP with ``base: fp``), on the divergence windows, against the cached FP
  reference (:func:`ptqlab.eval.build_reference`, :func:`ptqlab.eval.divergence.divergence`: the measure and
  the windows the runs use). Predicted KL of an allocation = KL of the base point + the sum over units.
- ``hessian``: the trace-weighted error ``sum_ij H_jj (W - Q_m(W))_ij^2`` with ``H_jj`` the mean square of
  input column ``j`` of the linear on the calibration windows (the FP model's inputs; llama.cpp's imatrix
  weighting, the diagonal of GPTQ's Hessian).
- ``fisher``: ``1/2 sum_ij F_ij (W - Q_m(W))_ij^2`` with ``F`` the empirical Fisher diagonal (squared
  gradients of the next-token loss, one calibration window at a time): a second-order estimate of the KL.
- ``error``: the squared relative output error ``||X (Q - W)^T||^2 / ||X W^T||^2`` the quantization records
  for each linear on the calibration data (what runs store as ``rel_error``).

The proxies (hessian, fisher, error) are in their own units: a run's predicted KL is ``scale x sum``, with
``scale`` fitted by least squares on the measured uniform points (:mod:`ptqlab.report.search`).

A signal is kept in ``$PTQLAB_CACHE/search`` by what decides it (the model's fingerprint, dtype and device
type, menu, unit, recipe, calibration, the divergence windows for ``kl``, the base point, and ptqlab's own
source), so a second budget, solver or validation count costs no model work.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compile import bind, compile_config, compile_evaluate
from ..data.calibration import calibration_windows
from ..eval import build_reference
from ..eval import divergence as div
from ..eval.cache import entry, load_or_compute
from ..models.loading import LoadedModel
from ..models.registry import get_adapter
from ..models.weights import set_weight_matrix, stored_transposed, weight_matrix, weight_parameter
from ..nn.capture import capture_inputs, handing_over, run_layer
from ..paths import cache_root
from ..pipeline.driver import LayerRecord
from ..pipeline.quantize import place
from ..schema import RunConfig
from ..store import code_fingerprint
from ..store.qmodels import QuantizedModels
from ..study.config import parse_config
from ..study.resident import quantize_or_restore, quantized_weights_key
from .config import SearchFile
from .units import Units

log = logging.getLogger(__name__)

SIGNAL_FORMAT = 1
"""What a cached signal holds; part of its key."""

Weights = dict[str, torch.Tensor]
"""``{module full name: its (out, in) weight}``."""


@dataclass(frozen=True)
class Signal:
    """Each unit's value at each menu point, and how it predicts a run's KL.

    Attributes:
        kind: ``kl``, ``hessian``, ``fisher`` or ``error``.
        units: The units' names, in order.
        values: ``values[u][m]``: what unit ``u`` at menu point ``m`` adds (``kl``: KL nats relative to the
            base point; the proxies: their own units).
        offset: ``kl``: the KL of the base point itself (a prediction is ``offset + sum``); None for proxies.
        base: ``kl``: the menu index units move from (-1: full precision); None for proxies.
        seconds: What measuring it took (the uniform quantizations included).
        evaluations: The model evaluations (forward passes over the signal's windows) it took.

    """

    kind: str
    units: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    offset: float | None
    base: int | None
    seconds: float
    evaluations: int

    def score(self, choice: Sequence[int]) -> float:
        """The sum of the units' values under ``choice`` (one menu index per unit)."""
        return math.fsum(self.values[u][m] for u, m in enumerate(choice))

    def to_json(self) -> dict[str, Any]:
        """The signal as JSON data."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signal:
        """A signal from :meth:`to_json`'s data."""
        return cls(data["kind"], tuple(data["units"]), tuple(tuple(float(x) for x in row) for row in data["values"]),
                   data["offset"], data["base"], float(data["seconds"]), int(data["evaluations"]))


def signal_path(search: SearchFile, units: Units, fingerprint: str, device: str, base: int | None) -> Path | None:
    """The cache file of the signal of ``search`` on a model (by fingerprint) and device type."""
    data = search.base.model_dump(mode="json")
    kind = search.section.signal
    parts: dict[str, Any] = {
        "format": SIGNAL_FORMAT, "kind": kind, "dtype": data["dtype"], "menu": list(search.menu),
        "units": [u.modules for u in units.units], "recipe": data["recipe"], "calibration": data["calibration"],
        "code": code_fingerprint(),
    }
    if kind == "kl":
        parts["divergence"] = search.divergence.model_dump(mode="json")
        parts["base"] = base
    return entry(cache_root() / "search", ".json", device, fingerprint, **parts)


def cached_signal(search: SearchFile, units: Units, fingerprint: str, device: str, base: int | None) -> Signal | None:
    """The signal in the cache, or None (nothing is measured)."""
    path = signal_path(search, units, fingerprint, device, base)
    if path is None or not path.is_file():
        return None
    try:
        return Signal.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None


def load_or_measure(search: SearchFile, units: Units, lm: LoadedModel, device: torch.device, base: int | None,
                    uniform: Callable[[int], RunConfig], *, progress: bool = True) -> tuple[Signal, bool]:
    """The signal of ``search`` on ``lm``: from the cache, or measured now and cached.

    Args:
        search: The search file.
        units: Its units on the model.
        lm: The FP model (left unchanged), its tokenizer and identity.
        device: Where to measure.
        base: ``kl``: the menu index units move from (-1: full precision).
        uniform: The run configuration with every unit at menu point ``m`` (the uniform baseline's).
        progress: Show progress bars.

    Returns:
        The signal, and whether it was measured now.

    """
    path = signal_path(search, units, lm.info.fingerprint, device.type, base)

    def load(p: Path) -> Signal | None:
        try:
            return Signal.from_json(json.loads(p.read_text()))
        except (ValueError, KeyError, TypeError):
            return None

    def save(signal: Signal, p: Path) -> None:
        p.write_text(json.dumps(signal.to_json()))

    return load_or_compute(path, load, lambda: measure(search, units, lm, device, base, uniform, progress), save)


def measure(search: SearchFile, units: Units, lm: LoadedModel, device: torch.device, base: int | None,
            uniform: Callable[[int], RunConfig], progress: bool = True) -> Signal:
    """Measure the signal of ``search`` (see the module's docstring); the FP model is left unchanged."""
    t0 = time.perf_counter()
    kind = search.section.signal
    menu_weights, records = _menu_weights(search, units, lm, device, uniform, progress)
    names = tuple(u.name for u in units.units)
    if kind == "kl":
        values, offset, evaluations = _kl(search, units, lm, device, menu_weights, base, progress)
        return Signal(kind, names, values, offset, base, time.perf_counter() - t0, evaluations)
    if kind == "error":
        values = _error(units, records)
        return Signal(kind, names, values, None, None, time.perf_counter() - t0, 0)
    cfg = search.base
    cal = cfg.calibration
    windows = calibration_windows(lm.tokenizer, cal.dataset, cal.samples, cal.seqlen, cal.seed, cal.path)
    fp = {name: weight_matrix(lm.model.get_submodule(name)).detach() for u in units.units for name in u.modules}
    if kind == "hessian":
        weights = _input_squares(lm.model, units, windows, cal.batch_size, device)
        values = _weighted(units, fp, menu_weights, weights, 1.0)
    else:
        weights = _fisher(lm.model, units, windows, device, progress)
        values = _weighted(units, fp, menu_weights, weights, 0.5)
    return Signal(kind, names, values, None, None, time.perf_counter() - t0, len(windows))


def _menu_weights(search: SearchFile, units: Units, lm: LoadedModel, device: torch.device,
                  uniform: Callable[[int], RunConfig], progress: bool) -> tuple[list[Weights], list[list[LayerRecord]]]:
    """Each menu point's quantized weight of every unit's linears, and the quantization's records.

    The model is quantized uniformly at each menu point as the uniform baseline run is (its quantized weights
    are restored from, or kept in, the store of quantized models by the same weights key). For the ``error``
    signal, a recipe that needs no data runs the calibrated layer loop too, to record each linear's error.
    """
    fp_state = lm.model.state_dict()
    qmodels = QuantizedModels()
    weights: list[Weights] = []
    records: list[list[LayerRecord]] = []
    for m in range(len(search.menu)):
        cfg = uniform(m)
        model = copy.deepcopy(lm.model)
        plan = bind(compile_config(cfg), model, lm.tokenizer)
        if search.section.signal == "error" and not plan.quantization.recipe_needs_calibration:
            data = cfg.model_dump(mode="json")
            data["calibration"]["layer_errors"] = True
            cfg = parse_config(data)
            plan = bind(compile_config(cfg), model, lm.tokenizer)
        place(model, device)
        key = quantized_weights_key(cfg, lm.info.fingerprint)
        report, _ = quantize_or_restore(model, plan.quantization, qmodels, key, device.type, fp_state,
                                        progress=progress, options=plan.options)
        weights.append({name: weight_matrix(model.get_submodule(name)).detach().clone()
                        for u in units.units for name in u.modules})
        records.append(list(report.records))
        del model
    return weights, records


def _set(model: nn.Module, weights: Weights, names: Sequence[str]) -> None:
    with torch.no_grad():
        for name in names:
            set_weight_matrix(model.get_submodule(name), weights[name])


def _kl(search: SearchFile, units: Units, lm: LoadedModel, device: torch.device, menu_weights: list[Weights],
        base: int | None, progress: bool) -> tuple[tuple[tuple[float, ...], ...], float, int]:
    """Per unit and menu point, the KL increase when only that unit moves from the base point."""
    model = place(copy.deepcopy(lm.model), device)
    plan = compile_evaluate({"divergence": search.divergence.model_dump(mode="json")}, lm.tokenizer, model)
    ref = build_reference(model, lm.tokenizer, plan, fingerprint=lm.info.fingerprint, progress=progress)
    assert ref.topk is not None
    every = [name for u in units.units for name in u.modules]
    if base is not None and base >= 0:
        _set(model, menu_weights[base], every)
    at_base = {name: weight_matrix(model.get_submodule(name)).detach().clone() for name in every}
    offset = div.divergence(model, ref.topk).kl
    prefix = _BaseInputs(model, get_adapter(model).layers(model), ref.topk.ids)
    evaluations = 1
    values = []
    bar = tqdm(units.units, desc=f"signal kl ({len(units.units)} units)", unit="unit", disable=not progress)
    for u in bar:
        row = []
        for m, weights in enumerate(menu_weights):
            if m == base:
                row.append(0.0)
                continue
            _set(model, weights, u.modules)
            row.append(prefix.divergence(model, u.layer, ref.topk).kl - offset)
            evaluations += 1
            _set(model, at_base, u.modules)
        values.append(tuple(row))
    bar.close()
    return tuple(values), offset, evaluations


class _BaseInputs:
    """The base model's input to every decoder layer on each divergence window.

    Moving one unit leaves every layer before its own as it was, so its model's forward starts at the
    unit's layer from these inputs (the layers before it are not run again) and ends in the family's own
    norm and head: the same floats as a whole forward (tested), at about half the cost on average.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> None:
        self.layers = layers
        device = next(model.parameters()).device
        captured = capture_inputs(model, layers, [ids[w : w + 1].to(device) for w in range(ids.shape[0])])
        self.calls = captured.calls
        self.inputs = [list(captured.hidden)]
        self.as_tuple = False
        with torch.inference_mode():
            for li in range(len(layers) - 1):
                self.inputs.append([self._layer(li, h, w) for w, h in enumerate(self.inputs[li])])

    def _layer(self, li: int, hidden: torch.Tensor, w: int) -> torch.Tensor:
        hidden, self.as_tuple = run_layer(self.layers[li], hidden, self.calls[li][w])
        return hidden

    def divergence(self, model: nn.Module, start: int, ref: div.TopKReference) -> div.Divergence:
        """:func:`ptqlab.eval.divergence.divergence` of ``model``, whose layers before ``start`` are the base's."""

        def logprobs(w: int) -> Iterator[tuple[int, int, torch.Tensor]]:
            with torch.inference_mode():
                hidden = self.inputs[start][w]
                for li in range(start, len(self.layers)):
                    hidden = self._layer(li, hidden, w)
            with handing_over(self.layers, hidden, self.as_tuple):
                yield from div.logprob_chunks(model, ref.ids[w : w + 1])

        return div.divergence(model, ref, logprobs)


def _error(units: Units, records: list[list[LayerRecord]]) -> tuple[tuple[float, ...], ...]:
    """Per unit and menu point, the sum of its linears' squared relative output errors."""
    errors: list[dict[str, float]] = []
    for per_menu in records:
        found = {r.module: r.rel_error for r in per_menu if r.rel_error is not None}
        errors.append({name: float(e) ** 2 for name, e in found.items()})
    out = []
    for u in units.units:
        row = []
        for found in errors:  # a linear a menu point leaves in full precision has no record: no error
            row.append(math.fsum(found.get(name, 0.0) for name in u.modules))
        out.append(tuple(row))
    return tuple(out)


def _input_squares(model: nn.Module, units: Units, windows: torch.Tensor, batch_size: int,
                   device: torch.device) -> Weights:
    """The mean square of each input column of every unit's linear on the calibration windows (FP model)."""
    model = place(copy.deepcopy(model), device)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def observe(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, torch.zeros(x.shape[-1], dtype=torch.float64)) + x.square().sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for u in units.units:
        for name in u.modules:
            hooks.append(model.get_submodule(name).register_forward_pre_hook(observe(name)))
    try:
        with torch.inference_mode():
            for batch in windows.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)  # (B, T)
    finally:
        for h in hooks:
            h.remove()
    missing = [name for u in units.units for name in u.modules if name not in sums]
    if missing:
        raise RuntimeError(f"search signal hessian: {missing[0]} saw no input on the calibration data (the model "
                           "does not call it); use signal: kl")
    return {name: (s / counts[name]).float() for name, s in sums.items()}


def _fisher(model: nn.Module, units: Units, windows: torch.Tensor, device: torch.device, progress: bool) -> Weights:
    """The empirical Fisher diagonal of every unit's linear weight: mean squared gradient, one window at a time."""
    model = place(copy.deepcopy(model), device)
    names = [name for u in units.units for name in u.modules]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [weight_parameter(model.get_submodule(n)) for n in names]
    for p in params:
        p.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    bar = tqdm(windows.split(1), desc="signal fisher", unit="window", disable=not progress)
    with torch.enable_grad():
        for row in bar:
            ids = row.to(device)  # (1, T)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, params)
            for s, g in zip(sums, grads, strict=True):
                s += g.detach().float().square()
    bar.close()
    out = {}
    for name, s in zip(names, sums, strict=True):
        f = s / windows.shape[0]
        out[name] = f.t() if stored_transposed(model.get_submodule(name)) else f
    return out


def _weighted(units: Units, fp: Weights, menu_weights: list[Weights], weights: Weights, factor: float
              ) -> tuple[tuple[float, ...], ...]:
    """Per unit and menu point, ``factor * sum w (W - Q_m(W))^2`` over its linears (``w`` per column or element).

    ``W`` is the FP model's weight (``fp``), ``Q_m(W)`` the menu point's.
    """
    out = []
    for u in units.units:
        row = []
        for per_menu in menu_weights:
            total = 0.0
            for name in u.modules:
                delta = (per_menu[name].double().cpu() - fp[name].double().cpu()).square()  # (out, in)
                w = weights[name].double().cpu()
                total += float((delta * w).sum()) if w.dim() == 2 else float((delta @ w).sum())
            row.append(factor * total)
        out.append(tuple(row))
    return tuple(out)
