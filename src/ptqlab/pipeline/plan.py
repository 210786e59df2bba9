"""The quantization plan: which linear gets which weight and activation spec, the recipe, the data.

The scheme's weight and activation sections plus per-module overrides are resolved here for every linear
of every decoder layer, and checked against the model (a group size must divide each width, a pattern
must match a module) before any weight changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..methods import Recipe
from ..models.adapter import Adapter
from ..models.weights import in_features, input_embedding, out_features
from ..nn.capture import InputCache
from ..nn.specs import ActivationSpec, KVSpec, activation_spec
from ..quant.outliers import OutlierRule
from ..quant.spec import QuantSpec
from .size import size_metrics


@dataclass(frozen=True)
class Override:
    """One override: modules whose full name fully matches ``match`` get ``weight`` / ``activation`` merged in.

    ``None`` keeps the matched modules in full precision for that part; ``sets_weight`` /
    ``sets_activation`` say whether the entry gives that part at all.
    """

    match: str
    weight: Mapping[str, Any] | None
    activation: Mapping[str, Any] | None = None
    sets_weight: bool = True
    sets_activation: bool = False


@dataclass(frozen=True)
class LinearTarget:
    """A quantizable linear: its full name, decoder layer, group and spec."""

    name: str
    layer: int
    group: int
    relative: str
    spec: QuantSpec


@dataclass(frozen=True)
class EmbeddingTarget:
    """The input embedding matrix (``scheme.embedding``): its full module name and spec."""

    name: str
    spec: QuantSpec


ActivationTarget = tuple[str, str, ActivationSpec]
"""``(module name, sharing key, spec)``: linears of one group share the key (they read the same tensor)."""


@dataclass(frozen=True)
class RunOptions:
    """How a plan is run: memory, where spilled states go, what the report keeps; never what is quantized.

    Passed beside a :class:`QuantizationPlan` (``quantize(model, plan, options=...)``); neither changes a number.

    Attributes:
        layer_pass: ``one`` (one pass per layer, every chunk held at each group), ``per_group`` (a pass per
            group, one chunk in flight) or ``auto`` (``per_group`` when the held chunks would not fit half the
            memory left; see :mod:`ptqlab.pipeline.sequential`).
        max_memory: The run's memory budget in bytes (None: what the machine has available).
        offload_dir: Where calibration hidden states past the budget are memory-mapped (None: the cache's
            ``stream`` directory).
        keep_grids: Record each quantized linear's scales and zero points in the report (an exporter asks for
            them; they are an eighth of the weights' size at group 64, so runs do not keep them).
        inputs: Layer-0 inputs captured before, shared by the runs of one FP model (None: capture anew).

    """

    layer_pass: str = "auto"
    max_memory: int | None = None
    offload_dir: str | None = None
    keep_grids: bool = False
    inputs: InputCache | None = None


@dataclass(frozen=True)
class QuantizationPlan:
    """Everything checked and prepared before any weight changes; the pipeline runs it as it is.

    What is quantized and on what data; how it runs (memory, spills, kept grids) is :class:`RunOptions`.

    Attributes:
        adapter: The model's family adapter.
        targets: The linears whose weights are quantized, with their specs, in forward order.
        recipe: The methods, by kind.
        calibration: Token ids (samples, seqlen), or None when nothing needs calibration data.
        batch_size: Calibration windows per chunk.
        activations: The linear inputs quantized at run time.
        attention: The spec of the attention matmuls' inputs, when they are quantized.
        kv: KV cache quantization, or None.
        kv_tokens: Tokens per range for KV ``channel`` granularity, for the size accounting.
        outliers: The outlier decomposition rule (``scheme.outliers``), or None.
        layer_errors: Measure each linear's output error on the calibration data also when the recipe needs
            none (``calibration.layer_errors``): the layer loop runs on the data, the weights are the same.
        embedding: The input embedding, rounded to nearest after the layer loop, or None.

    """

    adapter: Adapter
    targets: list[LinearTarget]
    recipe: Recipe
    calibration: torch.Tensor | None = None
    batch_size: int = 8
    activations: list[ActivationTarget] = field(default_factory=list)
    attention: ActivationSpec | None = None
    kv: KVSpec | None = None
    kv_tokens: int = 2048
    outliers: OutlierRule | None = None
    layer_errors: bool = False
    embedding: EmbeddingTarget | None = None

    @property
    def changes_weights(self) -> bool:
        """Whether running the plan changes any weight (a transform, a quantized linear or the embedding)."""
        return (bool(self.targets) or bool(self.recipe.layer_transforms) or bool(self.recipe.model_transforms)
                or self.embedding is not None)

    @property
    def recipe_needs_calibration(self) -> bool:
        """Whether the recipe, on the planned weights, needs calibration data."""
        weights = bool(self.targets) or bool(self.recipe.layer_transforms)
        return weights and self.recipe.needs_calibration

    @property
    def measures_layer_errors(self) -> bool:
        """Whether a recipe that needs no data runs the calibrated layer loop to measure each linear's error."""
        return self.layer_errors and bool(self.targets) and not self.recipe_needs_calibration

    @property
    def needs_calibration(self) -> bool:
        """Whether the recipe (on the planned weights), a static activation range or the layer errors need data."""
        return (self.recipe_needs_calibration or self.outliers is not None or self.measures_layer_errors
                or any(not a.dynamic for _, _, a in self.activations))

    def grid_specs(self) -> dict[str, QuantSpec]:
        """The spec of every weight the plan puts on a grid, by module name: the linears and the embedding."""
        specs = {t.name: t.spec for t in self.targets}
        if self.embedding is not None:
            specs[self.embedding.name] = self.embedding.spec
        return specs

    def size_metrics(self, model: nn.Module, kv_tokens: int | None = None,
                     outliers: Mapping[str, int] | None = None) -> dict[str, float]:
        """Size in bytes and effective bits of this plan on ``model`` (see :func:`size_metrics`).

        ``outliers`` gives the FP16 input columns of each linear the decomposition kept, by full name.
        """
        tokens = self.kv_tokens if kv_tokens is None else kv_tokens
        specs = {t.name: t.spec for t in self.targets}
        return size_metrics(model, self.adapter, specs, self.activations, self.kv, tokens, self.recipe.extra_bits,
                            outliers, None if self.embedding is None else self.embedding.spec)


def spec_from(fields: Mapping[str, Any] | None, where: str) -> QuantSpec:
    """The weight spec ``fields`` make (full precision for None), a field error named by ``where``."""
    if not fields:
        return QuantSpec(bits=16, where=where)
    try:
        return QuantSpec(**dict(fields), where=where)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def plan_embedding(model: nn.Module, spec: QuantSpec | None) -> EmbeddingTarget | None:
    """The model's input embedding under ``spec`` (``scheme.embedding``), checked against its width.

    Raises:
        ConfigError: A model without an input embedding matrix, or a group size that does not divide its width.

    """
    if spec is None:
        return None
    module = input_embedding(model)
    if module is None or module.weight.dim() != 2:
        raise ConfigError("scheme.embedding: the model has no input embedding matrix to quantize")
    name = next(n for n, m in model.named_modules() if m is module)
    spec.check_width(int(module.weight.shape[1]), name)
    return EmbeddingTarget(name, spec)


def _compile(model: nn.Module, overrides: Sequence[Override]) -> list[tuple[int, re.Pattern[str], Override]]:
    names = [n for n, _ in model.named_modules()]
    compiled = []
    for k, ov in enumerate(overrides):
        try:
            pattern = re.compile(ov.match)
        except re.error as exc:
            raise ConfigError(f"scheme.overrides[{k}].match={ov.match!r} is not a valid regex: {exc}") from exc
        if not any(pattern.fullmatch(n) for n in names):
            raise ConfigError(f"scheme.overrides[{k}].match={ov.match!r} matches no module of the model")
        compiled.append((k, pattern, ov))
    return compiled


def plan_weights(
    model: nn.Module,
    adapter: Adapter,
    weight: Mapping[str, Any] | None,
    overrides: Sequence[Override] = (),
    base: QuantSpec | None = None,
) -> list[LinearTarget]:
    """Resolve the weight spec of every linear of every decoder layer, and check it fits.

    Args:
        model: The causal LM.
        adapter: Its family adapter.
        weight: The scheme's weight section (QuantSpec fields) or None for full precision.
        overrides: Applied in order; later entries win.
        base: The spec ``weight`` makes, when already built; every module no override touches shares it.

    Returns:
        One target per linear whose spec quantizes (bits < 16), in forward order.

    Raises:
        ConfigError: A pattern matches no module, a field is invalid, or a group size does not divide a
            module's width (the message names the module and the width).

    """
    compiled = _compile(model, overrides)
    base = base if base is not None else spec_from(weight, "scheme.weight")
    targets: list[LinearTarget] = []
    for li, layer in enumerate(adapter.layers(model)):
        for gi, group in enumerate(adapter.groups):
            for rel in group.linears:
                full = f"{adapter.layers_path}.{li}.{rel}"
                fields, where, touched = _merged(full, "weight", weight, compiled)
                spec = spec_from(fields, where) if touched else base
                spec.check_width(in_features(layer.get_submodule(rel)), full)
                if spec.enabled:
                    targets.append(LinearTarget(full, li, gi, rel, spec))
    return targets


def _merged(
    name: str,
    part: str,
    base: Mapping[str, Any] | None,
    compiled: list[tuple[int, re.Pattern[str], Override]],
) -> tuple[dict[str, Any] | None, str, bool]:
    """The ``part`` (``weight`` or ``activation``) fields of module ``name`` after the overrides.

    Returns the fields (None: full precision), the config path they came from, and whether an override
    touched them; later entries win.
    """
    fields: dict[str, Any] | None = dict(base) if base else None
    where = f"scheme.{part}"
    touched = False
    for k, pattern, ov in compiled:
        if getattr(ov, f"sets_{part}") and pattern.fullmatch(name):
            where, touched = f"scheme.overrides[{k}].{part}", True
            given = getattr(ov, part)
            fields = None if given is None else {**(fields or {}), **dict(given)}
    return fields, where, touched


def plan_activations(
    model: nn.Module,
    adapter: Adapter,
    activation: Mapping[str, Any] | None,
    overrides: Sequence[Override] = (),
    base: ActivationSpec | None = None,
) -> list[ActivationTarget]:
    """Resolve the activation spec of the input of every linear of every decoder layer.

    Args:
        model: The causal LM.
        adapter: Its family adapter.
        activation: The scheme's activation section, or None.
        overrides: Applied in order; later entries win (``activation: null`` keeps inputs in FP).
        base: The spec ``activation`` makes, when already built; every module no override touches shares it.

    Returns:
        ``(module name, sharing key, spec)`` for each linear whose input is quantized; linears of one
        group share a key (they read the same tensor).

    Raises:
        ConfigError: An invalid field, a pattern that matches no module, or dynamic per-tensor ranges of an
            expert's input (it holds only its routed tokens, from every sequence of the batch).

    """
    compiled = _compile(model, overrides)
    base = base if base is not None else activation_spec(activation)
    out = []
    for li, layer in enumerate(adapter.layers(model)):
        for gi, group in enumerate(adapter.groups):
            for rel in group.linears:
                full = f"{adapter.layers_path}.{li}.{rel}"
                fields, where, touched = _merged(full, "activation", activation, compiled)
                act = activation_spec(fields, where) if touched else base
                if act is not None:
                    if act.spec.granularity == "group":
                        act.spec.check_width(in_features(layer.get_submodule(rel)), full)
                    if group.routed and act.dynamic and act.spec.granularity == "tensor":
                        raise ConfigError(f"{where}: dynamic per-tensor ranges are taken per sequence, but {full} "
                                          "(an expert) reads only its routed tokens, gathered from every sequence "
                                          "of the batch; use granularity token or group, or dynamic: false")
                    out.append((full, f"{li}.{gi}", act))
    return out


def layer_module(model: nn.Module, adapter: Adapter, layer: int, relative: str) -> nn.Module:
    """The module ``relative`` of decoder layer ``layer``."""
    return adapter.layers(model)[layer].get_submodule(relative)


def check_recipe_shapes(model: nn.Module, adapter: Adapter, targets: list[LinearTarget], recipe: Recipe) -> None:
    """Let the recipe check the shape of every target weight (e.g. LoRC's rank), before any work.

    Raises:
        ConfigError: A weight shape a step cannot work on, or scaling transforms or refiners on a family that
            refuses them.

    """
    no_scaling = adapter.scaling_refusal()
    if recipe.layer_transforms and no_scaling is not None:
        raise ConfigError(f"recipe {recipe.name}: per-channel scaling (SmoothQuant, AWQ) cannot run on family "
                          f"{adapter.family}: it {no_scaling}; it is not supported")
    no_refining = adapter.refinement_refusal()
    if (recipe.layer_refiners or recipe.model_refiners) and no_refining is not None:
        raise ConfigError(f"recipe {recipe.name}: the refiners (ZeroQuant-Local/Global) cannot run on family "
                          f"{adapter.family}: it {no_refining}; it is not supported")
    for t in targets:
        module = layer_module(model, adapter, t.layer, t.relative)
        recipe.check_shape(t.name, out_features(module), in_features(module))
        recipe.quantizer.check_spec(t.spec)
