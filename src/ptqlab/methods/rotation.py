"""Rotation of the residual stream (QuaRot-style), a model transform that runs before the layer loop.

Exact on pre-norm RMSNorm families: each norm's weight is folded into the linears that read it (the norm
becomes a plain RMS normalisation, which commutes with an orthogonal Q); tied embeddings are untied; the
embeddings and every linear that writes the residual stream are multiplied by Q on their output side,
every linear that reads it (and the LM head) on their input side. ``down_proj``'s input can be rotated
online as well (its weight rotated to match, a forward pre-hook rotating its input). Q is a randomised
Hadamard matrix, Kronecker with a random orthogonal factor where the width is no Hadamard size (see
:mod:`ptqlab.quant.rotation`, whose matrices this module re-exports).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapter import Adapter
from ..models.weights import set_weight_matrix, weight_matrix
from ..quant.rotation import Rotation, hadamard, random_orthogonal, random_rotation, split_power_of_two

__all__ = [
    "ResidualRotation",
    "Rotation",
    "RotationConfig",
    "hadamard",
    "random_orthogonal",
    "random_rotation",
    "split_power_of_two",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationConfig:
    """Options of the rotation.

    Attributes:
        seed: Seed of the random signs and orthogonal factors.
        online_down: Also rotate the input of ``down_proj`` online (weights rotated to match).
        kv: Quantize cached keys in a per-head Hadamard basis (needs ``scheme.kv_cache``).

    """

    seed: int = 0
    online_down: bool = True
    kv: bool = False

    def __post_init__(self) -> None:
        """Check the options."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"rotation.seed={self.seed!r} must be an integer")


class ResidualRotation:
    """Rotate the residual stream of the whole model, keeping its function (a model transform)."""

    kind: ClassVar[str] = "model_transform"
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: RotationConfig | None = None) -> None:
        """Create the rotation with ``config``."""
        self.config = config or RotationConfig()

    @property
    def rotates_cached_keys(self) -> bool:
        """Whether cached keys are quantized in a per-head Hadamard basis (``kv: true``)."""
        return self.config.kv

    @property
    def runtime_hooks(self) -> bool:
        """Whether :meth:`apply` installs the online rotation of ``down_proj``'s input (``online_down: true``)."""
        return self.config.online_down

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        """Raise ConfigError when the rotation cannot be folded exactly into this family."""
        reason = adapter.rotation_refusal()
        if reason is not None:
            raise ConfigError(f"rotation: family {adapter.family} {reason}; it is not supported")
        lm: Any = model
        if adapter.final_norm_module(model) is None or lm.get_output_embeddings() is None:
            raise ConfigError(f"rotation: cannot find the final norm and LM head of {type(model).__name__}")

    def apply(self, model: nn.Module, adapter: Adapter) -> list[Any]:
        """Rotate ``model`` in place; return the handles of the online hooks it installed.

        Raises:
            ConfigError: The family cannot be rotated exactly.

        """
        self.check(model, adapter)
        lm: Any = model
        _untie(lm)
        Q = random_rotation(int(lm.config.hidden_size), self.config.seed).matrix()
        for layer in adapter.layers(model):
            for group in adapter.groups:
                if group.fold == "norm" and group.prev_op is not None:
                    factor = _norm_scale(layer.get_submodule(group.prev_op), adapter.norm_offset)
                    for rel in group.linears:
                        _scale_columns(layer.get_submodule(rel), factor, Q)
                else:  # o_proj and down_proj write the residual stream
                    for rel in group.linears:
                        _rotate_output(layer.get_submodule(rel), Q)
        norm = adapter.final_norm_module(model)
        assert norm is not None  # checked above
        _scale_columns(lm.get_output_embeddings(), _norm_scale(norm, adapter.norm_offset), Q)
        emb = lm.get_input_embeddings()
        with torch.no_grad():
            emb.weight.copy_((emb.weight.double() @ Q).to(emb.weight.dtype))
        handles = self._online_down(model, adapter) if self.config.online_down else []
        log.info("rotation: residual width %d%s", Q.shape[0], ", down_proj input rotated online" if handles else "")
        return handles

    def _online_down(self, model: nn.Module, adapter: Adapter) -> list[Any]:
        """Rotate the input of the last group (``down_proj``) online, its weight to match."""
        down = adapter.groups[-1]
        handles = []
        for layer in adapter.layers(model):
            for rel in down.linears:
                module = layer.get_submodule(rel)
                W = weight_matrix(module).detach().double()
                R = random_rotation(W.shape[1], self.config.seed + 1)
                set_weight_matrix(module, W @ R.matrix())
                handles.append(module.register_forward_pre_hook(_rotate_input(R)))
        return handles


def _norm_scale(norm: nn.Module, offset: float) -> torch.Tensor:
    """The per-channel factor ``offset + w`` the norm multiplies by; the norm is reset to the factor 1."""
    w = norm.get_parameter("weight")
    factor = (offset + w.float()).detach().clone()
    with torch.no_grad():
        w.fill_(1.0 - offset)
    return factor


def _scale_columns(module: nn.Module, factor: torch.Tensor, Q: torch.Tensor | None) -> None:
    W = weight_matrix(module).detach().double() * factor.double()[None, :]
    set_weight_matrix(module, W @ Q if Q is not None else W)


def _rotate_output(module: nn.Module, Q: torch.Tensor) -> None:
    W = weight_matrix(module).detach().double()
    set_weight_matrix(module, Q.t() @ W)
    b = getattr(module, "bias", None)
    if isinstance(b, torch.Tensor):
        with torch.no_grad():
            b.copy_((b.double() @ Q).to(b.dtype))


def _untie(model: Any) -> None:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False


def _rotate_input(R: Rotation) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (R.apply(args[0]), *args[1:])

    return hook
