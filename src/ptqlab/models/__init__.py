"""Model families as data (adapters), weight access, and loading.

Public API: :func:`load_model`, :func:`get_adapter`, :func:`supported_classes`, :data:`ADAPTERS`, the
adapter dataclasses, the weight helpers, the fused-qkv row helpers and the linear-input hooks. Names are
imported lazily, so ``import ptqlab.models.adapter`` does not pull in transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ptqlab.models.adapter import Adapter, FusedExperts, FusedQKV, LinearGroup
    from ptqlab.models.experts import ExpertLinear
    from ptqlab.models.families import ADAPTERS
    from ptqlab.models.heads import HeadCounts, fused_head_counts, fused_qkv_rows, prev_rows_read
    from ptqlab.models.inputs import InputSite, input_site, linear_input_site, register_input_hook
    from ptqlab.models.loading import ALIASES, LoadedModel, ModelInfo, fingerprint_files, load_model, resolve_device
    from ptqlab.models.registry import get_adapter, supported_classes
    from ptqlab.models.weights import (
        in_features,
        out_features,
        set_weight_matrix,
        stored_transposed,
        weight_matrix,
        weight_parameter,
    )

_HOMES = {
    "Adapter": "adapter",
    "FusedExperts": "adapter",
    "FusedQKV": "adapter",
    "ExpertLinear": "experts",
    "LinearGroup": "adapter",
    "ADAPTERS": "families",
    "HeadCounts": "heads",
    "fused_head_counts": "heads",
    "fused_qkv_rows": "heads",
    "prev_rows_read": "heads",
    "InputSite": "inputs",
    "input_site": "inputs",
    "linear_input_site": "inputs",
    "register_input_hook": "inputs",
    "ALIASES": "loading",
    "LoadedModel": "loading",
    "ModelInfo": "loading",
    "fingerprint_files": "loading",
    "load_model": "loading",
    "resolve_device": "loading",
    "get_adapter": "registry",
    "supported_classes": "registry",
    "in_features": "weights",
    "out_features": "weights",
    "set_weight_matrix": "weights",
    "stored_transposed": "weights",
    "weight_matrix": "weights",
    "weight_parameter": "weights",
}

__all__ = [
    "ADAPTERS",
    "ALIASES",
    "Adapter",
    "ExpertLinear",
    "FusedExperts",
    "FusedQKV",
    "HeadCounts",
    "InputSite",
    "LinearGroup",
    "LoadedModel",
    "ModelInfo",
    "fingerprint_files",
    "fused_head_counts",
    "fused_qkv_rows",
    "get_adapter",
    "in_features",
    "input_site",
    "linear_input_site",
    "load_model",
    "out_features",
    "prev_rows_read",
    "register_input_hook",
    "resolve_device",
    "set_weight_matrix",
    "stored_transposed",
    "supported_classes",
    "weight_matrix",
    "weight_parameter",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
