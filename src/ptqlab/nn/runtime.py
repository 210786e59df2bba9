"""Install (and remove) everything that quantizes a model at run time: activations, attention inputs, KV."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..models.adapter import Adapter
from ..models.inputs import linear_input_site
from .activation import InstalledActivations, install_activation_quantizers
from .attention import check_attention, install_attention_quantization
from .context import ForwardContext, track_forward
from .kv_cache import InstalledKV, check_kv, install_kv_quantization
from .specs import ActivationSpec, KVSpec

log = logging.getLogger(__name__)


@dataclass
class RuntimeQuantization:
    """What is installed on a model; ``remove()`` restores the plain model."""

    ctx: ForwardContext = field(default_factory=ForwardContext)
    activations: InstalledActivations | None = None
    kv: InstalledKV | None = None
    attention: ActivationSpec | None = None  # the attention matmul inputs' spec, when they are quantized
    undo: list[Callable[[], None]] = field(default_factory=list)

    @property
    def installed(self) -> bool:
        """Whether anything quantizes at run time."""
        return bool(self.activations and self.activations.quantizers) or self.kv is not None or bool(self.undo)

    def remove(self) -> None:
        """Remove every hook and restore the attention implementation."""
        if self.activations is not None:
            self.activations.remove()
        if self.kv is not None:
            self.kv.remove()
        for fn in self.undo:
            fn()
        self.undo.clear()
        self.ctx.remove()


_REGISTRY = "_ptqlab_runtime"


def installed_runtime(model: nn.Module) -> RuntimeQuantization | None:
    """The runtime quantization :func:`install_runtime` installed on ``model`` (None when there is none)."""
    rt = model.__dict__.get(_REGISTRY)
    return rt if isinstance(rt, RuntimeQuantization) else None


def check_runtime(
    model: nn.Module, adapter: Adapter, attention: ActivationSpec | None, kv: KVSpec | None
) -> None:
    """Check, before any work, that the runtime quantization fits the model (raises ConfigError)."""
    if kv is not None:
        check_kv(model, adapter, kv)
    if attention is not None and attention.attention:
        no_attention = adapter.attention_refusal()
        if no_attention is not None:
            raise ConfigError(f"scheme.activation.attention: family {adapter.family} {no_attention}; "
                              "set attention: false")
        check_attention(model)


def install_runtime(
    model: nn.Module,
    adapter: Adapter,
    activation_targets: list[tuple[str, str, ActivationSpec]],
    kv: KVSpec | None = None,
    attention: ActivationSpec | None = None,
) -> RuntimeQuantization:
    """Install activation, attention-input and KV cache quantization on ``model``.

    Nothing is installed for full-precision parts: with no targets, no KV spec and no attention spec
    the model is untouched.

    Args:
        model: The causal LM.
        adapter: Its family adapter.
        activation_targets: From :func:`ptqlab.pipeline.plan.plan_activations`.
        kv: KV cache quantization, or None.
        attention: The activation spec, when the attention matmul inputs are quantized too.

    Returns:
        The installed quantization (call ``remove()`` to undo it).

    """
    rt = RuntimeQuantization()
    if not activation_targets and kv is None and attention is None:
        return rt
    model.__dict__[_REGISTRY] = rt  # what installed_runtime() reads; not a submodule, not in the state dict
    rt.undo.append(lambda: model.__dict__.pop(_REGISTRY, None))
    track_forward(model, rt.ctx)
    if activation_targets:
        sites = functools.partial(linear_input_site, model, adapter)
        rt.activations = install_activation_quantizers(model, activation_targets, rt.ctx, sites)
    if attention is not None and attention.attention:
        rt.undo.append(install_attention_quantization(model, adapter.attention_modules(model), attention.spec, rt.ctx))
        rt.attention = attention
    if kv is not None:
        rt.kv = install_kv_quantization(model, adapter, kv, rt.ctx)
    log.info(
        "runtime quantization: %d linear inputs, attention inputs %s, KV %s",
        len(activation_targets),
        "on" if attention is not None and attention.attention else "off",
        "on" if kv is not None else "off",
    )
    return rt
