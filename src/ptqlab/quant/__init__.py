"""Pure tensor math of quantization: specs, parameters, quantize / dequantize / fake-quantize."""

from .integer import QParams, choose_qparams, dequantize, fake_quantize, qparams_from_range, quantize
from .spec import QuantSpec

__all__ = ["QParams", "QuantSpec", "choose_qparams", "dequantize", "fake_quantize", "qparams_from_range", "quantize"]
