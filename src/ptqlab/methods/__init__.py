"""PTQ methods: one file per algorithm, each registered here by one line.

A method is a class that declares its kind (model transform, layer transform, quantizer, layer or model
refiner, compensator; see :mod:`.kinds`) and implements that kind's protocol, plus an options
dataclass. A recipe names methods in order, e.g. ``[{gptq: {damp: 0.01}}, {lorc: {rank: 8}}]``;
:func:`build_recipe` turns it into a typed :class:`Recipe`. A new method is its file and one
``register_method`` line (here, or in the user's own code before the config is read).
"""

from __future__ import annotations

from .awq import AWQClip, AWQConfig, AWQScale
from .base import GroupInputs, WeightResult
from .gptq import GPTQ, GPTQConfig
from .imatrix import IMatrix, IMatrixConfig
from .kinds import (
    KINDS,
    Compensator,
    LayerRefiner,
    LayerTransform,
    ModelRefiner,
    ModelTransform,
    QuantizedLinear,
    Quantizer,
    Refined,
)
from .lorc import LoRC, LoRCConfig
from .recipe import Recipe, build_recipe, register_method, registered_methods
from .rotation import ResidualRotation, RotationConfig
from .rtn import RTN, RTNConfig
from .smoothquant import SmoothQuant, SmoothQuantConfig
from .squeezellm import SqueezeLLM, SqueezeLLMConfig
from .zeroquant import LKDConfig, ZeroQuantGlobal, ZeroQuantLocal

register_method("rotation", ResidualRotation, RotationConfig)
register_method("smoothquant", SmoothQuant, SmoothQuantConfig)
register_method("awq", AWQScale, AWQConfig)
register_method("rtn", RTN, RTNConfig)
register_method("gptq", GPTQ, GPTQConfig)
register_method("zeroquant_local", ZeroQuantLocal, LKDConfig)
register_method("zeroquant_global", ZeroQuantGlobal, LKDConfig)
register_method("lorc", LoRC, LoRCConfig)
register_method("squeezellm", SqueezeLLM, SqueezeLLMConfig)
register_method("imatrix", IMatrix, IMatrixConfig)

__all__ = [
    "GPTQ",
    "KINDS",
    "RTN",
    "AWQClip",
    "AWQConfig",
    "AWQScale",
    "Compensator",
    "GPTQConfig",
    "GroupInputs",
    "LKDConfig",
    "LayerRefiner",
    "LayerTransform",
    "LoRC",
    "IMatrix",
    "IMatrixConfig",
    "LoRCConfig",
    "ModelRefiner",
    "ModelTransform",
    "QuantizedLinear",
    "Quantizer",
    "Recipe",
    "Refined",
    "ResidualRotation",
    "RotationConfig",
    "RTNConfig",
    "SmoothQuant",
    "SmoothQuantConfig",
    "SqueezeLLM",
    "SqueezeLLMConfig",
    "WeightResult",
    "ZeroQuantGlobal",
    "ZeroQuantLocal",
    "build_recipe",
    "register_method",
    "registered_methods",
]
