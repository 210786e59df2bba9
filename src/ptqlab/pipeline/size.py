"""The size of a quantized model and its effective bits, counted from what was installed."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from ..metrics import BITS_ACTIVATION, BITS_KV, BITS_WEIGHT, SIZE_MODEL_BYTES
from ..models.adapter import Adapter
from ..models.heads import attention_heads
from ..models.weights import in_features, input_embedding, out_features, weight_parameter
from ..nn.specs import ActivationSpec, KVSpec
from ..quant.outliers import outlier_weight_bits
from ..quant.size import bits_per_element, weight_storage_bits
from ..quant.spec import FULL_PRECISION_BITS, QuantSpec


def size_metrics(
    model: nn.Module,
    adapter: Adapter,
    specs: Mapping[str, QuantSpec],
    activations: list[tuple[str, str, ActivationSpec]] | None = None,
    kv: KVSpec | None = None,
    kv_tokens: int = 2048,
    extra_bits: Callable[[int, int], int] | None = None,
    outliers: Mapping[str, int] | None = None,
    embedding: QuantSpec | None = None,
) -> dict[str, float]:
    """Size in bytes and effective bits of a (planned) quantization.

    Every decoder-layer linear weight counts its codes and parameters (FP16 when not quantized), each
    expert's slice of a fused 3-D expert parameter as a linear of its own; every other parameter
    (embeddings, norms, biases, a router, an untied LM head) counts 16 bits.

    Args:
        model: The causal LM.
        adapter: Its family adapter.
        specs: The spec of each quantized linear, by full module name.
        activations: Quantized linear inputs, for ``bits.activation``.
        kv: KV cache quantization, for ``bits.kv``.
        kv_tokens: Tokens per range for KV ``channel`` granularity (ranges across tokens).
        extra_bits: Bits a recipe adds to a quantized (rows, cols) weight (LoRC factors).
        outliers: Input columns kept in FP16 by the outlier decomposition, by full linear name (their
            weight columns count 16 bits per element plus an index, their activations 16 bits).
        embedding: The input embedding's spec (``scheme.embedding``): its codes and parameters count instead of
            16 bits each (an output head tied to it is the same tensor, counted once).

    Returns:
        ``size.model_bytes``, ``bits.weight`` (per decoder-linear weight), and where quantized
        ``bits.activation`` (mean over quantized inputs) and ``bits.kv`` (mean of K and V).

    """
    linear_bits = linear_params = 0
    weights = set()
    for li, layer in enumerate(adapter.layers(model)):
        for rel in adapter.linear_names():
            module = layer.get_submodule(rel)
            rows, cols = out_features(module), in_features(module)
            name = f"{adapter.layers_path}.{li}.{rel}"
            spec = specs.get(name)
            linear_bits += weight_storage_bits(spec, rows, cols)
            if spec is not None and extra_bits is not None:
                linear_bits += extra_bits(rows, cols)
            if spec is not None and spec.enabled and outliers:
                linear_bits += outlier_weight_bits(spec.nbits, rows, outliers.get(name, 0))
            linear_params += rows * cols
            weights.add(id(weight_parameter(module)))  # an expert's: the fused parameter, counted per expert
    embedding_bits = 0
    table = None if embedding is None else input_embedding(model)
    if embedding is not None and table is not None:  # plan_embedding checked that the model has one
        embedding_bits = weight_storage_bits(embedding, int(table.weight.shape[0]), int(table.weight.shape[1]))
        weights.add(id(table.weight))
    other = sum(p.numel() for p in model.parameters() if id(p) not in weights)
    out = {
        SIZE_MODEL_BYTES: (linear_bits + embedding_bits + FULL_PRECISION_BITS * other) / 8,
        BITS_WEIGHT: linear_bits / max(1, linear_params),
    }
    if activations:
        vals = [_act_bits(model, name, a, (outliers or {}).get(name, 0)) for name, _, a in activations]
        out[BITS_ACTIVATION] = sum(vals) / len(vals)
    if kv is not None:
        out[BITS_KV] = (_kv_bits(model, kv.key, kv_tokens) + _kv_bits(model, kv.value, kv_tokens)) / 2
    return out


def _act_bits(model: nn.Module, name: str, act: ActivationSpec, kept: int = 0) -> float:
    """Bits per element of a linear's quantized input, ``kept`` of its ``width`` columns in FP16."""
    width = in_features(model.get_submodule(name))
    spec = act.spec
    size = spec.group_size if spec.granularity == "group" and spec.group_size else width
    bits = bits_per_element(spec, size)
    return (bits * (width - kept) + FULL_PRECISION_BITS * kept) / width


def _kv_bits(model: nn.Module, spec: QuantSpec, tokens: int) -> float:
    c = attention_heads(model.config)
    size = {"head": c.head_dim, "group": spec.group_size or c.head_dim, "token": c.num_kv_heads * c.head_dim}.get(
        spec.granularity or "head", tokens
    )
    return bits_per_element(spec, size)
