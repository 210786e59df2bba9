"""The model-level rotation phase (before the layer loop): fuse norms, untie, rotate, add the online rotation.

Exact on pre-norm RMSNorm families: each norm's weight is folded into the linears that read it (the norm
becomes a plain RMS normalisation, which commutes with an orthogonal Q); the embeddings and every
linear that writes the residual stream are multiplied by Q on their output side, every linear that
reads it (and the LM head) on their input side. ``down_proj``'s input can be rotated online as well.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..methods.rotation import Rotation, RotationConfig, random_rotation
from ..models.adapter import Adapter
from ..models.weights import set_weight_matrix, weight_matrix

log = logging.getLogger(__name__)

SUPPORTED_NORMS = ("rmsnorm", "gemma_rmsnorm")
REFUSED = {"gemma2": "normalises sublayer outputs before the residual add", "gemma3": "normalises sublayer "
           "outputs before the residual add"}


def check_rotation(model: nn.Module, adapter: Adapter) -> None:
    """Raise ConfigError when the rotation cannot be folded exactly into this family."""
    if adapter.family in REFUSED:
        raise ConfigError(f"rotation: family {adapter.family} {REFUSED[adapter.family]}, so a fused rotation "
                          "would change its output; it is not supported")
    if adapter.norm_kind not in SUPPORTED_NORMS:
        raise ConfigError(f"rotation: family {adapter.family} uses {adapter.norm_kind}; rotations fold exactly only "
                          "into RMSNorm pre-norm families (llama, mistral, qwen2, qwen3, gemma, phi3)")
    lm: Any = model
    if _final_norm(model) is None or lm.get_output_embeddings() is None:
        raise ConfigError(f"rotation: cannot find the final norm and LM head of {type(model).__name__}")


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    return norm if isinstance(norm, nn.Module) else None


def _norm_scale(norm: nn.Module, kind: str) -> torch.Tensor:
    """The per-channel factor the norm multiplies by, and reset the norm to the identity factor."""
    w = norm.get_parameter("weight")
    factor = ((1.0 + w.float()) if kind == "gemma_rmsnorm" else w.float()).detach().clone()
    with torch.no_grad():
        w.fill_(0.0 if kind == "gemma_rmsnorm" else 1.0)
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
        config: Any = model.config
        config.tie_word_embeddings = False


def rotate_model(model: nn.Module, adapter: Adapter, cfg: RotationConfig) -> list[Any]:
    """Rotate ``model`` in place; return the handles of the online hooks it installed.

    Raises:
        ConfigError: The family cannot be rotated exactly.

    """
    check_rotation(model, adapter)
    _untie(model)
    config: Any = model.config
    Q = random_rotation(int(config.hidden_size), cfg.seed).matrix()
    for layer in adapter.layers(model):
        for group in adapter.groups:
            if group.fold == "norm" and group.prev_op is not None:
                factor = _norm_scale(layer.get_submodule(group.prev_op), adapter.norm_kind)
                for rel in group.linears:
                    _scale_columns(layer.get_submodule(rel), factor, Q)
            else:  # o_proj and down_proj write the residual stream
                for rel in group.linears:
                    _rotate_output(layer.get_submodule(rel), Q)
    norm = _final_norm(model)
    assert norm is not None
    lm: Any = model
    _scale_columns(lm.get_output_embeddings(), _norm_scale(norm, adapter.norm_kind), Q)
    emb = lm.get_input_embeddings()
    with torch.no_grad():
        emb.weight.copy_((emb.weight.double() @ Q).to(emb.weight.dtype))
    handles = _online_down(model, adapter, cfg) if cfg.online_down else []
    log.info("rotation: residual width %d%s", Q.shape[0], ", down_proj input rotated online" if handles else "")
    return handles


def _online_down(model: nn.Module, adapter: Adapter, cfg: RotationConfig) -> list[Any]:
    down = adapter.groups[-1]
    handles = []
    for layer in adapter.layers(model):
        for rel in down.linears:
            module = layer.get_submodule(rel)
            W = weight_matrix(module).detach().double()
            R = random_rotation(W.shape[1], cfg.seed + 1)
            set_weight_matrix(module, W @ R.matrix())
            handles.append(module.register_forward_pre_hook(_rotate_input(R)))
    return handles


def _rotate_input(R: Rotation) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (R.apply(args[0]), *args[1:])

    return hook
