"""Fused mixture-of-experts blocks: each expert's matrices exposed as linears of their own.

transformers 5 stores the experts of Mixtral and Qwen3-MoE as 3-D parameters, ``gate_up_proj`` (experts,
2 * ffn, hidden) with rows ``[gate; up]`` and ``down_proj`` (experts, hidden, ffn), and multiplies by them
in batched or grouped matmuls that no per-linear hook sees. :func:`expose_experts` gives every expert's
matrices a module, an :class:`ExpertLinear` whose weight is a view of the expert's slice of the fused
parameter (no copy: writing it writes the parameter), registered as ``<experts>.<e>.gate_up_proj`` and
``<experts>.<e>.down_proj``, and makes the experts module run each expert through them
(:class:`PerExpertForward`, the floats of transformers' eager implementation).

Every expert is called on every forward with the tokens routed to it, possibly none, so a hook on an
expert's linear sees exactly its routed tokens (GPTQ's per-expert Hessian), and every calibration chunk
reaches every expert, as the layer pass needs. The parameters, the state dict and the function are unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from ptqlab.errors import UnsupportedModelError
from ptqlab.models.adapter import Adapter, FusedExperts, LinearGroup


class ExpertLinear(nn.Module):
    """One expert's matrix in a fused 3-D parameter, as a linear without bias: ``y = x @ fused[index].T``.

    The view holds no tensor: its weight is read from the owner's parameter at every use (it follows the
    parameter to another device or dtype), and the owner is kept as a plain reference, not a submodule
    (the owner holds the view).

    Args:
        owner: The module holding the fused parameter.
        param: Name of the fused parameter, (experts, out, in).
        index: The expert.

    """

    _owner: nn.Module

    def __init__(self, owner: nn.Module, param: str, index: int) -> None:
        super().__init__()
        self.__dict__["_owner"] = owner
        self.param = param
        self.index = index

    @property
    def fused(self) -> nn.Parameter:
        """The fused parameter (experts, out, in) this expert's weight is a slice of."""
        fused = self._owner.get_parameter(self.param)
        return fused

    @property
    def weight(self) -> torch.Tensor:
        """The expert's weight (out, in): a view sharing the fused parameter's storage."""
        return self.fused[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` for ``x`` (..., in), as ``F.linear`` (the eager experts' own op)."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        """Which slice of which parameter, and its shape."""
        out, inp = self.weight.shape
        return f"{self.param}[{self.index}], in_features={inp}, out_features={out}"


class Expert(nn.Module):
    """The linears of one expert, named after the fused parameters they view (``gate_up_proj``, ``down_proj``)."""

    def __init__(self, owner: nn.Module, layout: FusedExperts, index: int) -> None:
        super().__init__()
        self.add_module(layout.gate_up, ExpertLinear(owner, layout.gate_up, index))
        self.add_module(layout.down, ExpertLinear(owner, layout.down, index))


class PerExpertForward:
    """The forward of a fused experts module that runs every expert through its :class:`Expert` views.

    Called as the module's ``forward(hidden_states (T, hidden), top_k_index (T, k), top_k_weights (T, k))``;
    each expert reads its routed tokens in the eager order (by top-k slot, then token), so the output
    equals transformers' eager implementation.
    """

    def __init__(self, owner: nn.Module, layout: FusedExperts, count: int) -> None:
        self.owner = owner
        self.layout = layout
        self.count = count

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                 ) -> torch.Tensor:
        """The weighted sum of each token's experts' outputs, (T, hidden)."""
        out = torch.zeros_like(hidden_states)
        for e in range(self.count):
            expert = self.owner.get_submodule(str(e))
            pos, tok = torch.where((top_k_index == e).t())  # (n_e,) each: slot-major, as eager
            x = hidden_states[tok]  # (n_e, hidden)
            h = self._gate(expert.get_submodule(self.layout.gate_up)(x))  # (n_e, ffn)
            y = expert.get_submodule(self.layout.down)(h)  # (n_e, hidden)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def _gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` of the rows ``[gate; up]`` (the module's own gate function when it has one)."""
        apply_gate = getattr(self.owner, "_apply_gate", None)
        if apply_gate is not None:
            return apply_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act: Any = self.owner.get_submodule("act_fn")
        return act(gate) * up


def expert_count(config: Any, layout: FusedExperts) -> int:
    """The number of experts of each mixture-of-experts block, from the config.

    Raises:
        UnsupportedModelError: The config does not give it.

    """
    count = getattr(config, layout.count_attr, None)
    if not isinstance(count, int) or count < 1:
        raise UnsupportedModelError(f"config.{layout.count_attr}={count!r}: the number of experts is not known")
    return count


def expert_groups(layout: FusedExperts, count: int) -> tuple[LinearGroup, ...]:
    """The linear groups of ``count`` experts, in forward order: each expert's ``gate_up``, then its ``down``.

    Each expert reads its own routed tokens, so each of its matrices is a group of its own (its own
    Hessian). The down matrix reads ``act(gate) * up``: a scale would fold into the up rows of the
    expert's ``gate_up``. Nothing absorbs a scale of ``gate_up``'s input alone: the norm before it also
    feeds the router and every other expert.
    """
    groups: list[LinearGroup] = []
    for e in range(count):
        gate_up = f"{layout.module}.{e}.{layout.gate_up}"
        down = f"{layout.module}.{e}.{layout.down}"
        groups.append(LinearGroup(f"expert{e}.gate_up", (gate_up,), routed=True))
        groups.append(LinearGroup(f"expert{e}.down", (down,), gate_up, "linear", prev_part="up", routed=True))
    return tuple(groups)


def _check_fused(owner: nn.Module, layout: FusedExperts, count: int, where: str) -> None:
    """Raise UnsupportedModelError unless ``owner`` holds (count, out, in) gate_up and down parameters that chain."""
    shapes = {}
    for name in (layout.gate_up, layout.down):
        p = owner._parameters.get(name)
        if p is None or p.dim() != 3 or p.shape[0] != count:
            got = None if p is None else tuple(p.shape)
            raise UnsupportedModelError(f"{where}: expected a fused parameter {name} of {count} experts, got {got}")
        shapes[name] = p.shape
    gate_up, down = shapes[layout.gate_up], shapes[layout.down]
    if gate_up[1] != 2 * down[2] or gate_up[2] != down[1]:
        raise UnsupportedModelError(f"{where}: {layout.gate_up} {tuple(gate_up)} and {layout.down} {tuple(down)} "
                                    "are not (experts, 2 * ffn, hidden) and (experts, hidden, ffn)")


def expose_experts(layers: nn.ModuleList, layout: FusedExperts, count: int) -> None:
    """Give each expert of every layer its :class:`ExpertLinear` views and run the experts through them.

    Idempotent: a layer whose experts are exposed already is left alone.

    Args:
        layers: The decoder layers.
        layout: Where the fused parameters are.
        count: Experts per block.

    Raises:
        UnsupportedModelError: A layer has no experts (a dense layer among sparse ones), or they are not
            stored as the layout says.

    """
    for li, layer in enumerate(layers):
        try:
            owner = layer.get_submodule(layout.module)
        except AttributeError:
            raise UnsupportedModelError(
                f"layer {li} has no {layout.module}: only models whose every layer is a mixture of experts are "
                "supported (not dense layers among them, e.g. Qwen3-MoE's mlp_only_layers or decoder_sparse_step)"
            ) from None
        if isinstance(owner.__dict__.get("forward"), PerExpertForward):
            continue
        _check_fused(owner, layout, count, f"layer {li} {layout.module}")
        for e in range(count):
            owner.add_module(str(e), Expert(owner, layout, e))
        owner.__dict__["forward"] = PerExpertForward(owner, layout, count)  # the instance's own forward


def bind_experts(model: nn.Module, adapter: Adapter) -> Adapter:
    """The adapter of ``model`` with every expert's groups, its experts exposed (see :func:`expose_experts`).

    A family without fused experts, or an adapter that lists them already, is returned as it is.

    Args:
        model: The causal LM.
        adapter: Its family's adapter.

    Returns:
        The adapter whose groups cover every linear of ``model``'s layers.

    """
    layout = adapter.experts
    if layout is None:
        return adapter
    count = expert_count(getattr(model, "config", None), layout)
    expose_experts(adapter.layers(model), layout, count)
    if any(g.routed for g in adapter.groups):
        return adapter
    return dataclasses.replace(adapter, groups=adapter.groups + expert_groups(layout, count))
