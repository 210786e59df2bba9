"""The one compile step: a validated configuration becomes the plans a run executes, checked before any work.

Compiling has two stages, each done once:

1. :func:`compile_config` (no model): the recipe is built, the weight / activation / KV specs are made,
   the corpora and lm-eval tasks are checked. Unknown methods, bad options, bits out of range, unknown
   corpora fail here, before a model is loaded. The result is kept on the configuration.
2. :func:`bind` (with the loaded model and tokenizer): every linear's spec is resolved with the
   overrides and checked against its width, the recipe against each weight's shape and the family, the
   calibration and evaluation windows are tokenized; the result is the :class:`RunPlan` the run executes
   as it is.

The Python API compiles its ``scheme`` / ``recipe`` / ``calibration`` / ``evaluate`` arguments through
the same functions (:func:`compile_scheme`, :func:`compile_quantization`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data.calibration import calibration_windows
from .errors import ConfigError
from .eval.plan import EvalPlan, check_evaluate, plan_evaluation
from .eval.speed import check_llama_cpp, llama_cpp_cache_types
from .formats.gguf import check_gguf
from .memory import parse_size, return_freed
from .methods import Recipe, build_recipe
from .models.registry import get_adapter
from .nn.runtime import check_runtime
from .nn.specs import ActivationSpec, KVSpec, activation_spec, kv_specs
from .pipeline.plan import (
    LinearTarget,
    Override,
    QuantizationPlan,
    RunOptions,
    check_recipe_shapes,
    plan_activations,
    plan_embedding,
    plan_weights,
    spec_from,
)
from .quant.outliers import OutlierRule
from .quant.spec import QuantSpec
from .schema import Calibration, Evaluate, KVCacheScheme, RunConfig, Scheme, SpeedConfig, coerce


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme and recipe compiled without a model.

    Attributes:
        weight: The weight section's fields (merged with overrides per module), or None.
        weight_spec: The spec those fields make.
        activation: The activation section's fields, or None.
        activation_spec: The spec they make, or None (full precision).
        kv: KV cache quantization (keys rotated when a model transform asks), or None.
        overrides: The per-module overrides, in order.
        recipe: The methods, by kind.
        outliers: The outlier decomposition rule, or None.
        embedding: The input embedding's spec (``scheme.embedding``), or None.

    """

    weight: dict[str, Any] | None
    weight_spec: QuantSpec
    activation: dict[str, Any] | None
    activation_spec: ActivationSpec | None
    kv: KVSpec | None
    overrides: tuple[Override, ...]
    recipe: Recipe
    outliers: OutlierRule | None = None
    embedding: QuantSpec | None = None

    @property
    def attention(self) -> ActivationSpec | None:
        """The spec of the attention matmuls' inputs, when they are quantized."""
        act = self.activation_spec
        return act if act is not None and act.attention else None


@dataclass(frozen=True)
class CompiledConfig:
    """A configuration compiled without a model (stage 1)."""

    config: RunConfig
    scheme: SchemeSpec


@dataclass(frozen=True)
class RunPlan:
    """What a run executes (stage 2): the quantization and the evaluation, both checked against the model.

    Attributes:
        quantization: What is quantized, on what data.
        evaluation: What is measured.
        options: How the quantization runs (``runtime``'s layer pass, memory budget, offload directory).

    """

    quantization: QuantizationPlan
    evaluation: EvalPlan
    options: RunOptions = RunOptions()


def compile_scheme(scheme: Scheme | Mapping[str, Any] | None, recipe: Sequence[Mapping[str, Any]] = ()) -> SchemeSpec:
    """Build the specs and the recipe of a scheme and recipe, without a model.

    Raises:
        ConfigError: An invalid field, method or option, or a rotation of keys without a KV scheme.

    """
    sch = coerce(Scheme, scheme, "scheme")
    weight = sch.weight.model_dump() if sch.weight else None
    weight_spec = spec_from(weight, "scheme.weight")
    activation = sch.activation.model_dump() if sch.activation else None
    act = activation_spec(activation)
    kv = kv_specs(sch.kv_cache)
    built = build_recipe(recipe)
    if built.rotates_cached_keys:
        if kv is None:
            raise ConfigError("recipe rotation.kv=true rotates cached keys, but scheme.kv_cache quantizes nothing")
        kv = dataclasses.replace(kv, rotate_keys=True)
    overrides = tuple(
        Override(o.match, o.weight, o.activation, o.sets("weight"), o.sets("activation")) for o in sch.overrides
    )
    return SchemeSpec(weight, weight_spec, activation, act, kv, overrides, built, _outliers(sch, built),
                      _embedding(sch))


def _embedding(sch: Scheme) -> QuantSpec | None:
    """The spec of ``scheme.embedding`` (None: the embedding stays in full precision)."""
    if sch.embedding is None:
        return None
    spec = spec_from(sch.embedding.model_dump(), "scheme.embedding")
    if spec.is_codebook:
        raise ConfigError("scheme.embedding format kmeans: the embedding is rounded to a grid of ranges; use an "
                          "integer, minifloat, MX, NF4 or GGUF format")
    return spec if spec.enabled else None


def _outliers(sch: Scheme, recipe: Recipe) -> OutlierRule | None:
    """The outlier rule of ``scheme.outliers``, checked against the rest of the scheme and the recipe."""
    if sch.outliers is None:
        return None
    rule = OutlierRule(sch.outliers.threshold, sch.outliers.fraction)
    if sch.weight is None and sch.activation is None:
        raise ConfigError("scheme.outliers keeps input columns of quantized linears in FP16, but the scheme "
                          "quantizes no weight or activation")
    if recipe.layer_transforms:
        raise ConfigError("scheme.outliers with smoothquant/awq: those move activation outliers into the weights "
                          "before the columns could be chosen; use outliers with rtn, gptq or a rotation")
    return rule


def compile_config(cfg: RunConfig) -> CompiledConfig:
    """Stage 1: compile ``cfg`` without a model (once: the result is kept on ``cfg``).

    Raises:
        ConfigError: An invalid spec, method or option, an unknown corpus or task.

    """
    if cfg._compiled is None:
        scheme = compile_scheme(cfg.scheme, cfg.recipe)
        check_evaluate(cfg.evaluate)
        cfg._compiled = CompiledConfig(cfg, scheme)
    compiled: CompiledConfig = cfg._compiled
    return compiled


def compile_quantization(
    model: nn.Module,
    scheme: SchemeSpec,
    calibration: torch.Tensor | Calibration | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    kv_tokens: int = 2048,
) -> QuantizationPlan:
    """Resolve a compiled scheme against a model and prepare the calibration data, changing nothing.

    Args:
        model: The causal LM.
        scheme: From :func:`compile_scheme`.
        calibration: Token ids (samples, seqlen), or the ``calibration`` section (needs ``tokenizer``).
        tokenizer: The model's tokenizer.
        kv_tokens: Tokens per range of KV ``channel`` granularity, for the size accounting.

    Raises:
        ConfigError: A group size that does not divide a width, an override that matches nothing, a
            recipe step that does not fit a weight or the family, a calibrated recipe without data.
        DataError: Calibration text missing, empty or too short.

    """
    adapter = get_adapter(model)
    targets = plan_weights(model, adapter, scheme.weight, scheme.overrides, scheme.weight_spec)
    activations = plan_activations(model, adapter, scheme.activation, scheme.overrides, scheme.activation_spec)
    check_runtime(model, adapter, scheme.attention, scheme.kv)
    check_recipe_shapes(model, adapter, targets, scheme.recipe)
    _check_codebooks(targets, scheme.recipe)
    for transform in scheme.recipe.model_transforms:
        transform.check(model, adapter)
    cal = None if calibration is None or isinstance(calibration, torch.Tensor) else \
        coerce(Calibration, calibration, "calibration")
    plan = QuantizationPlan(adapter=adapter, targets=targets, recipe=scheme.recipe, activations=activations,
                            attention=scheme.attention, kv=scheme.kv, kv_tokens=kv_tokens, outliers=scheme.outliers,
                            layer_errors=cal is not None and cal.layer_errors,
                            embedding=plan_embedding(model, scheme.embedding))
    if not plan.needs_calibration:
        return plan
    if calibration is None:
        what = f"method {scheme.recipe.name} needs" if plan.recipe_needs_calibration else (
            "scheme.outliers needs" if plan.outliers is not None else "static activation ranges need")
        raise ConfigError(f"{what} calibration data, but none was given")
    if isinstance(calibration, torch.Tensor):
        return dataclasses.replace(plan, calibration=calibration)
    assert cal is not None
    if tokenizer is None:
        raise ConfigError("calibration given as a config needs the tokenizer")
    windows = calibration_windows(tokenizer, cal.dataset, cal.samples, cal.seqlen, cal.seed, cal.path)
    return dataclasses.replace(plan, calibration=windows, batch_size=cal.batch_size)


_CODEBOOK_STEPS = frozenset({"rtn", "gptq", "squeezellm", "lorc"})


def _check_codebooks(targets: Sequence[LinearTarget], recipe: Recipe) -> None:
    """Codebook weights (format kmeans) go with the steps that round to a codebook, nothing that needs ranges."""
    if not any(t.spec.is_codebook for t in targets):
        return
    other = [s for s in recipe.steps if s not in _CODEBOOK_STEPS]
    if other:
        raise ConfigError(f"scheme.weight format kmeans: recipe {', '.join(other)} works on scaled ranges, which a "
                          f"codebook has not; use {', '.join(sorted(_CODEBOOK_STEPS))}")


def bind(compiled: CompiledConfig, model: nn.Module, tokenizer: Any) -> RunPlan:
    """Stage 2: check the compiled configuration against the loaded model and prepare its data.

    Raises:
        ConfigError: See :func:`compile_quantization` and :func:`ptqlab.eval.plan.plan_evaluation`.
        DataError: A calibration or evaluation text missing or too short.

    """
    cfg = compiled.config
    quantization = compile_quantization(model, compiled.scheme, cfg.calibration, tokenizer, cfg.evaluate.seqlen)
    rt = cfg.runtime
    max_memory = None if rt.max_memory is None else parse_size(rt.max_memory)
    options = RunOptions(layer_pass=rt.layer_pass, max_memory=max_memory, offload_dir=rt.offload_dir)
    evaluation = plan_evaluation(cfg.evaluate, tokenizer, model)
    check_speed(cfg.evaluate.speed, quantization, cfg.scheme.kv_cache, model)
    return_freed()  # the tokenizer's transient buffers (about 170 MB for wikitext2's test split)
    return RunPlan(quantization, evaluation, options)


def check_speed(speed: SpeedConfig | None, plan: QuantizationPlan, kv_cache: KVCacheScheme | None,
                model: nn.Module) -> None:
    """Refuse, before any work, a speed measurement its runtime cannot make of this run.

    llama.cpp runs the run written as GGUF (what :func:`ptqlab.formats.gguf.check_gguf` refuses, it cannot
    time), with the KV-cache scheme as its cache types (one it has no type for is refused); vLLM needs a
    CUDA device.

    Raises:
        ConfigError: Naming the setting.

    """
    if speed is None or speed.runtime == "torch":
        return

    if speed.runtime == "vllm":
        if not torch.cuda.is_available():
            raise ConfigError("evaluate.speed runtime vllm times a compressed-tensors export in vLLM on a CUDA "
                              "device, and this machine has none; use runtime llama.cpp or torch")
        raise ConfigError("evaluate.speed runtime vllm is not measured by ptqlab yet; use runtime llama.cpp or torch")
    check_llama_cpp()
    try:
        check_gguf(dataclasses.replace(plan, kv=None), getattr(model, "config", None))  # KV: llama.cpp's cache types
    except ConfigError as e:
        raise ConfigError(f"evaluate.speed runtime llama.cpp runs the model written as GGUF: {e}") from e
    llama_cpp_cache_types(kv_cache)


def compile_evaluate(evaluate: Evaluate | Mapping[str, Any] | None, tokenizer: Any, model: nn.Module) -> EvalPlan:
    """An ``evaluate`` section (mapping or :class:`Evaluate`) checked and its windows tokenized."""
    cfg = coerce(Evaluate, evaluate, "evaluate")
    check_evaluate(cfg)
    return plan_evaluation(cfg, tokenizer, model)
