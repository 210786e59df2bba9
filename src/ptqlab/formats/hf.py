"""The ``hf`` format's check: fake-quantized safetensors hold weights only."""

from __future__ import annotations

from ..pipeline.plan import QuantizationPlan
from .common import refuse_runtime_ops, refuse_runtime_quantizers


def check_hf(plan: QuantizationPlan) -> None:
    """Refuse what a plain checkpoint cannot hold, naming the field.

    Raises:
        ConfigError: Runtime quantizers (``scheme.activation``, ``scheme.kv_cache``) or an online rotation.

    """
    refuse_runtime_quantizers(plan, "a plain HF checkpoint", "export the weights with the activation section "
                              "removed", "export the weights with the kv_cache section removed")
    refuse_runtime_ops(plan, "transformers")
