"""ptqlab: post-training quantization studies of Hugging Face causal LMs.

Python API:
    ``load_model(spec)`` -> a LoadedModel (model, tokenizer, info);
    ``reference(model, tokenizer, evaluate_config)`` measures the FP side of an evaluation, before quantizing;
    ``quantize(model, scheme, recipe, calibration, tokenizer=...)`` quantizes in place;
    ``evaluate(model, tokenizer, evaluate_config, reference=...)`` measures it;
    ``sweep(path, store=...)`` runs a sweep file (what is missing of it) as ``ptqlab sweep`` does.
"""

from __future__ import annotations

import os
from typing import Any

# MKL's strict reproducible mode, read when MKL starts: matrix products give the same bits whatever the
# thread count (ptqlab.threads explains why and switches it on where MKL has already started)
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .errors import ConfigError, DataError, ModelLoadError, PtqlabError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "PtqlabError",
    "UnsupportedModelError",
    "__version__",
    "evaluate",
    "load_model",
    "quantize",
    "reference",
    "sweep",
]


def __getattr__(name: str) -> Any:
    """Import the heavy API lazily, so ``import ptqlab.quant`` stays light."""
    if name in ("quantize", "evaluate", "reference", "sweep"):
        from . import api

        return getattr(api, name)
    if name == "load_model":
        from .models.loading import load_model

        return load_model
    raise AttributeError(f"module 'ptqlab' has no attribute {name!r}")
