"""Specs of the runtime quantizers (activations, KV cache) built from the scheme's sections."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..quant.formats import MX_FORMATS
from ..quant.spec import QuantSpec

ACTIVATION_GRANULARITIES = ("token", "group", "tensor")
KV_GRANULARITIES = ("head", "group", "token", "channel")
_RUNTIME_KEYS = ("dynamic", "attention")


@dataclass(frozen=True)
class ActivationSpec:
    """How the inputs of linears (and optionally of the attention matmuls) are quantized.

    Attributes:
        spec: The grid and granularity (``token``, ``group`` or ``tensor``).
        dynamic: Ranges computed on the fly per token / sequence; False: one range per tensor from
            the calibration data.
        attention: Also quantize the query, key and value entering attention.

    """

    spec: QuantSpec
    dynamic: bool = True
    attention: bool = False

    @property
    def enabled(self) -> bool:
        """Whether anything is quantized."""
        return self.spec.enabled


@dataclass(frozen=True)
class KVSpec:
    """KV cache quantization.

    Attributes:
        key: Spec of K (granularity ``head``, ``group`` along head_dim, ``token`` or ``channel``).
        value: Spec of V.
        where: ``post_rope`` (K as cached) or ``pre_rope`` (K at the k projection's output).
        mode: ``all`` (prefill and decode) or ``decode`` (FP prefill, each new token quantized).
        rotate_keys: Quantize K in a per-head Hadamard basis (``Q(k H) H^T``): attention scores are
            those of rotated queries and keys, and outlier channels of K are spread before quantization.

    """

    key: QuantSpec
    value: QuantSpec
    where: str = "post_rope"
    mode: str = "all"
    rotate_keys: bool = False

    @property
    def enabled(self) -> bool:
        """Whether K or V is quantized."""
        return self.key.enabled or self.value.enabled


def _fields(section: Any) -> dict[str, Any]:
    if section is None:
        return {}
    if isinstance(section, Mapping):
        return dict(section)
    return dict(section.model_dump(exclude_none=False))


def activation_spec(section: Any, where: str = "scheme.activation") -> ActivationSpec | None:
    """Build the activation spec of a scheme section (mapping or schema object).

    Args:
        section: The ``activation`` section, or None.
        where: Path of the section, for error messages.

    Returns:
        The spec, or None when activations stay in full precision.

    Raises:
        ConfigError: Invalid bits, format, granularity, or a static range with MSE clipping.

    """
    fields = _fields(section)
    if not fields:
        return None
    runtime = {k: fields.pop(k) for k in _RUNTIME_KEYS if k in fields}
    if fields.get("granularity") is None:
        fields["granularity"] = None if fields.get("format") in MX_FORMATS else "token"
    try:
        spec = QuantSpec(**fields, where=where)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not spec.enabled:
        return None
    spec.require_granularity(ACTIVATION_GRANULARITIES)
    act = ActivationSpec(spec, bool(runtime.get("dynamic", True)), bool(runtime.get("attention", False)))
    if not act.dynamic and spec.clipping == "mse":
        raise ConfigError(f"{where}: clipping 'mse' needs dynamic ranges; use minmax or percentile when static")
    if not act.dynamic and spec.granularity != "tensor":
        raise ConfigError(f"{where}.granularity={spec.granularity!r}: a static (dynamic: false) range is per tensor")
    return act


def _side(base: dict[str, Any], side: Any, where: str) -> QuantSpec:
    fields = {**base, **{k: v for k, v in _fields(side).items() if v is not None}}
    fields.setdefault("bits", None)
    spec = QuantSpec(format="int", where=where, **fields)
    spec.require_granularity(KV_GRANULARITIES)
    return spec


def kv_specs(section: Any, where: str = "scheme.kv_cache") -> KVSpec | None:
    """Build the KV cache spec of a scheme section (mapping or schema object).

    Args:
        section: The ``kv_cache`` section, or None.
        where: Path of the section, for error messages.

    Returns:
        The spec, or None when neither K nor V is quantized.

    Raises:
        ConfigError: Invalid bits or granularity of K or V.

    """
    fields = _fields(section)
    if not fields:
        return None
    key, value = fields.pop("key", None), fields.pop("value", None)
    where_k, mode = fields.pop("where", "post_rope"), fields.pop("mode", "all")
    fields.setdefault("granularity", "head")
    kv = KVSpec(_side(fields, key, f"{where}.key"), _side(fields, value, f"{where}.value"), where_k, mode)
    if kv.where not in ("post_rope", "pre_rope"):
        raise ConfigError(f"{where}.where={kv.where!r} must be post_rope or pre_rope")
    if kv.mode not in ("all", "decode"):
        raise ConfigError(f"{where}.mode={kv.mode!r} must be all or decode")
    return kv if kv.enabled else None
