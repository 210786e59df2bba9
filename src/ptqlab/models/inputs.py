"""Where the input of a decoder-layer linear can be observed or replaced while the model runs.

Most linears are called as modules, so a forward pre-hook on the linear sees its input. A few are not:
Mamba's mixer multiplies by ``dt_proj.weight`` itself, never calling ``dt_proj``. For such a group
(``LinearGroup.called`` False) the input is a slice of the output of the op before it (``prev_op``, the
rows ``prev_part`` names), and a forward hook there sees, and may replace, exactly what the weight is
multiplied by. Calibration, activation quantizers and transforms hook every linear through
:func:`register_input_hook`, so they work the same on both kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ptqlab.models.adapter import Adapter
from ptqlab.models.heads import prev_rows_read

InputFn = Callable[[torch.Tensor], torch.Tensor | None]
"""Called with a linear's input (B, T, in); a returned tensor replaces it, None keeps it."""


@dataclass(frozen=True)
class InputSite:
    """Where a linear's input is seen.

    Attributes:
        module: The module to hook: the linear itself, or the op whose output holds the input.
        rows: None when ``module`` is the linear (its forward input is the input); else the indices, along
            the last dimension of ``module``'s output, that form the input, in input order.

    """

    module: nn.Module
    rows: torch.Tensor | None = None


def input_site(config: Any, adapter: Adapter, layer: nn.Module, linear: str) -> InputSite:
    """Return where the input of ``linear`` (relative to the decoder ``layer``) is seen.

    Args:
        config: The model config (fused head counts, for ``prev_rows_read``).
        adapter: The family adapter.
        layer: One decoder layer.
        linear: A linear of one of the adapter's groups, e.g. ``mixer.dt_proj``.

    Returns:
        The linear itself, or the op before it and the rows of its output the linear reads.

    """
    group = adapter.group_of(linear)
    if group.called:
        return InputSite(layer.get_submodule(linear))
    assert group.prev_op is not None  # checked by LinearGroup
    return InputSite(layer.get_submodule(group.prev_op), prev_rows_read(config, adapter, layer, group))


def linear_input_site(model: nn.Module, adapter: Adapter, name: str) -> InputSite:
    """Return where the input of the linear with full module name ``name`` is seen.

    A name outside the decoder layers (``lm_head``) is its own site.
    """
    prefix = f"{adapter.layers_path}."
    index, _, relative = name.removeprefix(prefix).partition(".")
    if not name.startswith(prefix) or not index.isdigit() or not relative:
        return InputSite(model.get_submodule(name))
    layer = adapter.layers(model)[int(index)]
    return input_site(getattr(model, "config", None), adapter, layer, relative)


def register_input_hook(site: InputSite | nn.Module, fn: InputFn) -> RemovableHandle:
    """Call ``fn`` on a linear's input every time it is computed; a tensor it returns replaces the input.

    Args:
        site: From :func:`input_site`, or a linear (its input is its forward input).
        fn: Called with the input; may raise to stop the forward.

    Returns:
        The hook's handle (``remove()`` takes it off).

    """
    if isinstance(site, nn.Module):
        site = InputSite(site)
    if site.rows is None:
        return site.module.register_forward_pre_hook(_on_forward_input(fn))
    return site.module.register_forward_hook(_on_output_rows(fn, site.rows))


def _on_forward_input(fn: InputFn) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...] | None]:
    """A forward pre-hook that hands ``fn`` the module's first argument."""

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        new = fn(args[0])
        return None if new is None else (new, *args[1:])

    return hook


def _on_output_rows(fn: InputFn, rows: torch.Tensor) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor | None]:
    """A forward hook that hands ``fn`` the ``rows`` of the module's output (the last dimension)."""

    def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor | None:
        index = rows.to(out.device)
        new = fn(out[..., index])  # (B, T, len(rows))
        if new is None:
            return None
        out = out.clone()
        out[..., index] = new.to(out.dtype)
        return out

    return hook
