"""SqueezeLLM-style non-uniform quantization (Kim et al., 2024): weighted k-means codebooks per row.

Each output row gets its own ``2**bits`` centroids, placed by k-means weighted by each input column's
importance, here the diagonal of the input Hessian (the mean square of that input over the calibration
tokens; SqueezeLLM uses the Fisher diagonal, its first-order counterpart), and every weight is rounded to
its row's nearest centroid. The weight format must be ``kmeans``; GPTQ with ``format: kmeans`` fits the
same codebooks and rounds to them with its error feedback instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..quant.core import choose_qparams
from ..quant.spec import QuantSpec
from .base import WeightResult
from .rtn import round_with


@dataclass(frozen=True)
class SqueezeLLMConfig:
    """SqueezeLLM has no knobs here: the bits are the weight spec's, the codebook size ``2**bits``."""


class SqueezeLLM:
    """Quantize each row to its Hessian-weighted k-means codebook (a quantizer)."""

    kind: ClassVar[str] = "quantizer"
    needs_calibration: ClassVar[bool] = True
    permutes_columns: ClassVar[bool] = False
    min_tokens: ClassVar[int] = 1

    def __init__(self, config: SqueezeLLMConfig | None = None) -> None:
        self.config = config or SqueezeLLMConfig()

    def check_spec(self, spec: QuantSpec) -> None:
        """Refuse a weight format other than ``kmeans``.

        Raises:
            ConfigError: The spec's format is not ``kmeans``.

        """
        if not spec.is_codebook:
            raise ConfigError(f"recipe squeezellm fits k-means codebooks: set {spec.where}.format: kmeans "
                              f"(it is {spec.format!r})")

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        """Quantize ``W`` (out, in) to per-row codebooks weighted by ``diag(H)``.

        Args:
            W: Weight matrix (out_features, in_features).
            spec: Weight spec; its format must be ``kmeans``.
            H: Hessian of the inputs (in, in); its diagonal weighs the columns.

        Returns:
            The dequantized weight (float32), codes (centroid indices) and the codebooks.

        Raises:
            ConfigError: The spec's format is not ``kmeans``.

        """
        self.check_spec(spec)
        Wf = W.detach().float()
        weights = None if H is None else torch.diag(H).float()
        return round_with(Wf, choose_qparams(Wf, spec, weights), spec)
