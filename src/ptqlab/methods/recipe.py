"""The method registry and the typed recipe built from a config's ``recipe`` list.

A method is registered once, by name, with its class and (optionally) its options dataclass:
``register_method("gptq", GPTQ, GPTQConfig)``. Its class declares its kind (see :mod:`.kinds`), and
:func:`build_recipe` puts each step of a recipe in its kind's slot, checking the order of kinds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .base import WeightResult
from .kinds import (
    KINDS,
    RANK,
    Compensator,
    LayerRefiner,
    LayerTransform,
    Method,
    ModelRefiner,
    ModelTransform,
    Quantizer,
    protocol_members,
)
from .rtn import RTN


@dataclass(frozen=True)
class Registered:
    """A registered method: its class and the dataclass of its options (None: the class takes them itself)."""

    cls: type[Any]
    options: type[Any] | None = None


_METHODS: dict[str, Registered] = {}


def register_method(name: str, cls: type[Method], options: type[Any] | None = None) -> None:
    """Make ``name`` usable in recipes.

    Args:
        name: The key of the step in a recipe, e.g. ``gptq``.
        cls: The method's class; it declares ``kind`` (one of :data:`~ptqlab.methods.kinds.KINDS`) and
            ``needs_calibration``, and implements that kind's protocol, its capabilities included
            (a quantizer's ``permutes_columns`` and ``min_tokens``, a model transform's ``runtime_hooks``).
        options: The frozen dataclass of its options, passed to ``cls(options(**given))``; None when
            ``cls`` is itself a dataclass of its options (``cls(**given)``).

    Raises:
        ValueError: The class declares no known kind, or lacks a member of its kind's protocol.

    """
    kind = getattr(cls, "kind", None)  # cls may come from untyped code: checked, not trusted
    if kind not in KINDS:
        raise ValueError(f"method {name!r}: {cls.__name__}.kind={kind!r} is not one of {', '.join(KINDS)}")
    missing = [m for m in protocol_members(kind) if not hasattr(cls, m)]
    if missing:
        raise ValueError(f"method {name!r}: {cls.__name__} (kind {kind}) does not declare {', '.join(missing)} "
                         f"of its kind's protocol (ptqlab.methods.kinds)")
    _METHODS[name] = Registered(cls, options)


def registered_methods() -> dict[str, Registered]:
    """The registered methods by name (a copy)."""
    return dict(_METHODS)


def foreign_source(names: list[str]) -> str:
    """A sha256 of the source files of the named methods that are not ptqlab's own ("" when all are).

    A method registered from the user's code is outside the package's own code fingerprint; its source
    file keys the quantized weights it made, so weights an older version of it made are not reused.
    """
    digest = hashlib.sha256()
    found = False
    for name in sorted(set(names)):
        reg = _METHODS.get(name)
        for cls in () if reg is None else (reg.cls, reg.options):
            if cls is None or cls.__module__.split(".")[0] == "ptqlab":
                continue
            path = inspect.getsourcefile(cls)
            digest.update(f"{name}:{cls.__module__}.{cls.__qualname__}".encode())
            if path is not None:
                digest.update(Path(path).read_bytes())
            found = True
    return digest.hexdigest()[:16] if found else ""


def _names_of(kind: str) -> list[str]:
    return sorted(n for n, r in _METHODS.items() if r.cls.kind == kind)


@dataclass
class Recipe:
    """A recipe's steps by kind, in the order they run.

    Attributes:
        quantizer: The weight quantizer (RTN when the recipe names none, or the default of a transform).
        model_transforms: Before the layer loop (rotation).
        layer_transforms: Scales folded at each linear group (SmoothQuant, AWQ).
        layer_refiners: After each layer is quantized (ZeroQuant-Local).
        model_refiners: After the layer loop (ZeroQuant-Global).
        compensators: Corrections applied once a weight is final (LoRC).
        steps: Method names in the order they run (``rtn`` included when it is the default).

    """

    quantizer: Quantizer = field(default_factory=RTN)
    model_transforms: tuple[ModelTransform, ...] = ()
    layer_transforms: tuple[LayerTransform, ...] = ()
    layer_refiners: tuple[LayerRefiner, ...] = ()
    model_refiners: tuple[ModelRefiner, ...] = ()
    compensators: tuple[Compensator, ...] = ()
    steps: list[str] = field(default_factory=list)

    @property
    def needs_calibration(self) -> bool:
        """Whether any step needs calibration data."""
        steps: list[Any] = [
            self.quantizer, *self.model_transforms, *self.layer_transforms, *self.layer_refiners,
            *self.model_refiners, *self.compensators,
        ]
        return any(s.needs_calibration for s in steps)

    @property
    def name(self) -> str:
        """The steps joined by ``+``, e.g. ``gptq+lorc``."""
        return "+".join(self.steps)

    @property
    def rotates_cached_keys(self) -> bool:
        """Whether a model transform asks for the KV cache's keys to be quantized in a rotated basis."""
        return any(t.rotates_cached_keys for t in self.model_transforms)

    def check_shape(self, module: str, rows: int, cols: int) -> None:
        """Raise ConfigError when a compensator cannot work on a (rows, cols) weight (e.g. LoRC's rank)."""
        for c in self.compensators:
            c.check_shape(module, rows, cols)

    def extra_bits(self, rows: int, cols: int) -> int:
        """Bits the compensators add to a quantized (rows, cols) weight."""
        return sum(c.extra_bits(rows, cols) for c in self.compensators)

    def compensate(self, W: torch.Tensor, result: WeightResult) -> WeightResult:
        """Apply the compensators, in order, to the quantized ``result`` of the weight ``W``."""
        for c in self.compensators:
            result = c.compensate(W, result)
        return result


def _instantiate(name: str, registered: Registered, options: Mapping[str, Any] | None, where: str) -> Any:
    """The method object for ``options``, unknown options refused with the known ones listed."""
    options = dict(options or {})
    holder = registered.options or registered.cls
    known = {f.name for f in dataclasses.fields(holder)} if dataclasses.is_dataclass(holder) else set()
    unknown = sorted(set(options) - known)
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"{where}.{unknown[0]}: unknown option of {name}; known: {names}")
    if registered.options is None:
        return registered.cls(**options)
    return registered.cls(registered.options(**options))


_ORDER_HINTS = {
    "model_transform": "{name} is a model-level transform that runs first; put it first",
    "layer_transform": ("transform {name!r} is placed after a quantizer or compensator; transforms go first "
                        "(e.g. [smoothquant, gptq, lorc])"),
    "quantizer": ("quantizer {name!r} comes after a compensator or refiner; the order is transforms, quantizer, "
                  "zeroquant_local/global, lorc"),
    "layer_refiner": "{name!r} comes after a compensator; put {later} last",
    "model_refiner": "{name!r} comes after a compensator; put {later} last",
    "compensator": "{name!r} comes after {later!r}",
}


def _parse_steps(recipe: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """``(name, method object)`` per step, in recipe order, with the order of kinds checked."""
    out: list[tuple[str, Any]] = []
    for k, step in enumerate(recipe):
        if not isinstance(step, Mapping) or len(step) != 1:
            raise ConfigError(f"recipe[{k}] must have exactly one key (the method name), got {step!r}")
        ((name, options),) = step.items()
        registered = _METHODS.get(name)
        if registered is None:
            raise ConfigError(f"recipe[{k}]: unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
        kind = registered.cls.kind
        later = next((n for n, m in out if RANK[m.kind] > RANK[kind]), None)
        if later is not None:
            raise ConfigError(f"recipe[{k}]: " + _ORDER_HINTS[kind].format(name=name, later=later))
        if kind != "layer_transform" and any(n == name for n, _ in out):
            raise ConfigError(f"recipe[{k}]: {name!r} is named twice")
        out.append((name, _instantiate(name, registered, options, f"recipe[{k}].{name}")))
    return out


def build_recipe(recipe: Sequence[Mapping[str, Any]]) -> Recipe:
    """Build the typed recipe of a config's ``recipe`` list.

    Args:
        recipe: Steps, each a one-key mapping ``{method_name: options}``.

    Returns:
        The recipe; when it names no quantizer, the last layer transform's default quantizer (AWQ's
        clipping search), else RTN.

    Raises:
        ConfigError: Unknown method or option, steps out of the order of kinds, a method named twice, or
            more than one quantizer.

    """
    parsed = _parse_steps(recipe)
    by_kind: dict[str, list[Any]] = {kind: [m for _, m in parsed if m.kind == kind] for kind in KINDS}
    steps = [name for name, _ in parsed]
    quantizers = by_kind["quantizer"]
    if len(quantizers) > 1:
        known = ", ".join(_names_of("quantizer"))
        raise ConfigError(f"recipe names more than one weight quantizer; use one of {known}")
    defaults = [q for q in (t.default_quantizer() for t in by_kind["layer_transform"]) if q is not None]
    if quantizers:
        quantizer = quantizers[0]
    elif defaults:
        quantizer = defaults[-1]
    else:
        quantizer = RTN()
        steps.insert(len(by_kind["model_transform"]) + len(by_kind["layer_transform"]), "rtn")
    return Recipe(
        quantizer=quantizer,
        model_transforms=tuple(by_kind["model_transform"]),
        layer_transforms=tuple(by_kind["layer_transform"]),
        layer_refiners=tuple(by_kind["layer_refiner"]),
        model_refiners=tuple(by_kind["model_refiner"]),
        compensators=tuple(by_kind["compensator"]),
        steps=steps,
    )
