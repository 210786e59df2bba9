"""Activation quantizers at the inputs of linears: forward pre-hooks that fake-quantize what a linear reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.inputs import InputSite, register_input_hook
from ..quant.core import params_from_range
from ..quant.integer import QParams
from .context import ForwardContext
from .rows import fake_quantize_rows, fake_quantize_sequences, fake_quantize_static
from .specs import ActivationSpec


@dataclass
class RangeObserver:
    """Running range of a tensor over calibration batches (real tokens only)."""

    xmin: float = float("inf")
    xmax: float = float("-inf")
    lows: list[float] = field(default_factory=list)
    highs: list[float] = field(default_factory=list)

    def observe(self, x: torch.Tensor, percentile: float | None) -> None:
        """Record the range (or the percentiles) of the values of ``x``."""
        flat = x.detach().float().reshape(-1)
        if flat.numel() == 0:  # an expert no token was routed to
            return
        if percentile is None or percentile >= 100.0:
            self.xmin = min(self.xmin, float(flat.min()))
            self.xmax = max(self.xmax, float(flat.max()))
        else:
            sample = flat if flat.numel() <= 1 << 24 else flat[:: flat.numel() // (1 << 24) + 1]
            q = torch.tensor([1 - percentile / 100.0, percentile / 100.0])
            lo, hi = torch.quantile(sample, q).tolist()
            self.lows.append(lo)
            self.highs.append(hi)

    @property
    def empty(self) -> bool:
        """Whether nothing was observed (an expert no calibration token was routed to)."""
        return not self.lows and self.xmin > self.xmax

    def qparams(self, act: ActivationSpec) -> QParams:
        """The fixed per-tensor parameters from what was observed."""
        if self.lows:
            lo, hi = sum(self.lows) / len(self.lows), sum(self.highs) / len(self.highs)
        else:
            lo, hi = self.xmin, self.xmax
        return params_from_range(torch.tensor([[lo]]), torch.tensor([[hi]]), act.spec)


class ActivationQuantizer:
    """Fake-quantizes the input of one or more linears that read the same tensor.

    Linears of a group (q/k/v; gate/up) read one tensor: its quantized copy is computed once and reused
    while the same input object comes back.
    """

    def __init__(self, act: ActivationSpec, ctx: ForwardContext) -> None:
        """Create a quantizer for ``act`` that reads padding from ``ctx``."""
        self.act = act
        self.ctx = ctx
        self.static: QParams | None = None
        self.observer: RangeObserver | None = None
        self.keep: torch.Tensor | None = None  # input columns left in FP16 (outlier decomposition)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return the fake-quantized ``x`` (B, T, C) (observe and pass through while calibrating)."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        if self.observer is not None:
            self._observe(x)
            return x
        out = self._quantize(x) if self.keep is None else self._decomposed(x, self.keep)
        self._last = (x, out)
        return out

    def _decomposed(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Quantize the columns outside ``keep`` (ranges without them); ``keep``'s columns rounded to FP16."""
        out = self._quantize(x.masked_fill(keep, 0))
        return torch.where(keep, x.half().to(x.dtype), out)

    def clear(self) -> None:
        """Drop the remembered input (end of a forward pass)."""
        self._last = None

    def _valid(self, seqs: torch.Tensor) -> torch.Tensor | None:
        return self.ctx.valid_tokens(seqs.shape[0], seqs.shape[1])

    def _observe(self, x: torch.Tensor) -> None:
        assert self.observer is not None
        seqs = self.ctx.as_sequences(x)
        valid = self._valid(seqs)
        real = seqs if valid is None else seqs[valid]
        spec = self.act.spec
        self.observer.observe(real, spec.percentile if spec.clipping == "percentile" else None)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.act.spec
        if not self.act.dynamic:
            if self.static is None:
                raise RuntimeError("a static activation quantizer was used before calibration")
            return fake_quantize_static(x, spec, self.static)
        if spec.granularity == "tensor":
            seqs = self.ctx.as_sequences(x)
            return fake_quantize_sequences(seqs, spec, self._valid(seqs)).reshape(x.shape)
        return fake_quantize_rows(x, spec)


@dataclass
class InstalledActivations:
    """Activation quantizers installed on a model, by module name."""

    quantizers: dict[str, ActivationQuantizer] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        """Remove every hook."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def clear(self) -> None:
        """Forget remembered inputs (call after each forward)."""
        for q in self.quantizers.values():
            q.clear()


def install_activation_quantizers(
    model: nn.Module,
    targets: list[tuple[str, str, ActivationSpec]],
    ctx: ForwardContext,
    sites: Callable[[str], InputSite] | None = None,
) -> InstalledActivations:
    """Install a hook on each target linear's input that fake-quantizes it.

    Args:
        model: The causal LM.
        targets: ``(module name, sharing key, spec)``: linears with the same sharing key and spec read the
            same tensor and share one quantizer.
        ctx: The forward context (padding mask).
        sites: Where each target's input is seen, by module name (None: at the linear itself; see
            :func:`ptqlab.models.inputs.linear_input_site` for linears the model does not call).

    Returns:
        The installed quantizers and hook handles.

    """
    installed = InstalledActivations()
    shared: dict[tuple[str, ActivationSpec], ActivationQuantizer] = {}
    for name, key, act in targets:
        quantizer = shared.setdefault((key, act), ActivationQuantizer(act, ctx))
        installed.quantizers[name] = quantizer
        site = InputSite(model.get_submodule(name)) if sites is None else sites(name)
        installed.handles.append(register_input_hook(site, quantizer))

    def clear_after(module: nn.Module, args: Any, output: Any) -> None:
        installed.clear()

    if targets:
        installed.handles.append(model.register_forward_hook(clear_after))
    return installed
