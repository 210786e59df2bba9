"""Pure tensor math of quantization: specs, formats, parameters, quantize / dequantize / fake-quantize."""

from .core import choose_qparams, dequantize, fake_quantize, params_from_range, quantize, to_codes
from .integer import QParams, qparams_from_range
from .spec import QuantSpec

__all__ = [
    "QParams",
    "QuantSpec",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "params_from_range",
    "qparams_from_range",
    "quantize",
    "to_codes",
]
