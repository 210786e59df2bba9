"""Per-layer sensitivity: how far each linear's and each decoder layer's output moved from the FP model.

The FP model runs once over a few token windows while forward hooks keep the output of every linear of
the decoder layers and of every decoder layer; after quantization the same tokens run through the
quantized model and each output is compared with its FP counterpart: relative error
``||y_q - y|| / ||y||`` and SQNR ``10 log10(||y||^2 / ||y_q - y||^2)`` dB. Errors accumulate through the
layers, as they do when the model is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from ..models.adapter import Adapter
from ..models.inputs import linear_input_site, register_input_hook

Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Sensitivity:
    """One module's deviation from FP."""

    module: str
    layer: int
    kind: str  # "linear" or "layer"
    rel_error: float
    sqnr_db: float


def _modules(model: nn.Module, adapter: Adapter) -> list[tuple[str, int, str, nn.Module]]:
    """The decoder linears and layers compared.

    A mixture of experts' expert linears are left out: a token's experts may differ between the FP and the
    quantized model, so their outputs are not paired (the layer's output still is).
    """
    out = []
    for li, layer in enumerate(adapter.layers(model)):
        for rel in adapter.linear_names():
            if adapter.group_of(rel).routed:
                continue
            out.append((f"{adapter.layers_path}.{li}.{rel}", li, "linear", layer.get_submodule(rel)))
        out.append((f"{adapter.layers_path}.{li}", li, "layer", layer))
    return out


def _keep(store: Outputs, name: str, y: torch.Tensor) -> None:
    prev = store.get(name)
    y = y.detach().float().cpu().reshape(-1, y.shape[-1])
    store[name] = y if prev is None else torch.cat([prev, y])


@contextmanager
def _recording(model: nn.Module, adapter: Adapter, store: Outputs) -> Iterator[None]:
    def hook(name: str) -> Any:
        def fn(_m: nn.Module, _a: Any, out: Any) -> None:
            _keep(store, name, out[0] if isinstance(out, tuple) else out)

        return fn

    def product(name: str, linear: nn.Module) -> Any:
        """A linear the model does not call (its weight used directly): its output computed from its input."""
        weight = linear.get_parameter("weight")
        bias = getattr(linear, "bias", None)

        def fn(x: torch.Tensor) -> None:
            _keep(store, name, F.linear(x.to(weight.dtype), weight, bias))

        return fn

    handles = []
    for name, _, kind, m in _modules(model, adapter):
        site = linear_input_site(model, adapter, name) if kind == "linear" else None
        if site is not None and site.rows is not None:
            handles.append(register_input_hook(site, product(name, m)))
        else:
            handles.append(m.register_forward_hook(hook(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record_outputs(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> Outputs:
    """Outputs (tokens, width) of every decoder linear and layer of ``model`` over ``ids`` (windows, seqlen)."""
    store: Outputs = {}
    device = next(model.parameters()).device
    with _recording(model, adapter, store), torch.inference_mode():
        for row in ids.split(1):
            model(input_ids=row.to(device), use_cache=False)
    return store


def compare(model: nn.Module, adapter: Adapter, ids: torch.Tensor, fp: Outputs) -> list[Sensitivity]:
    """Relative error and SQNR of each module of ``model`` against the FP outputs ``fp`` on the same ids."""
    now = record_outputs(model, adapter, ids)
    out = []
    for name, layer, kind, _ in _modules(model, adapter):
        ref, q = fp[name], now[name]
        noise = float((q - ref).pow(2).sum())
        signal = float(ref.pow(2).sum())
        rel = math.sqrt(noise / signal) if signal > 0 else 0.0
        sqnr = 10 * math.log10(signal / noise) if noise > 0 else math.inf
        out.append(Sensitivity(name, layer, kind, rel, sqnr))
    return out
