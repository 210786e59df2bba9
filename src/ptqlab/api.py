"""The Python API: ``quantize`` a model in memory and ``evaluate`` it.

Example:
    >>> import ptqlab
    >>> lm = ptqlab.load_model("stories260k")
    >>> report = ptqlab.quantize(lm.model, {"weight": {"bits": 4}}, [{"gptq": {}}],
    ...                          {"samples": 8, "seqlen": 128}, tokenizer=lm.tokenizer)
    >>> result = ptqlab.evaluate(lm.model, lm.tokenizer, {"perplexity": ["wikitext2"], "seqlen": 256})

"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from .data.calibration import calibration_windows
from .data.corpora import eval_windows
from .errors import ConfigError
from .eval.generation import greedy_sample
from .eval.perplexity import perplexity
from .eval.retrieval import retrieval_accuracy
from .methods import Recipe, build_quantizer
from .models.adapter import Adapter
from .models.registry import get_adapter
from .nn.runtime import check_runtime, install_runtime
from .nn.specs import ActivationSpec, KVSpec, activation_spec, kv_specs
from .pipeline.activations import calibrate_static_activations
from .pipeline.driver import QuantizeReport, quantize_model
from .pipeline.plan import LinearTarget, Override, check_recipe_shapes, plan_activations, plan_weights
from .pipeline.rotate import check_rotation
from .pipeline.size import size_metrics
from .study.config import Calibration, Evaluate, LongContextConfig, Scheme, format_validation_error
from .study.identity import ppl_metric_name
from .study.store import Metric

log = logging.getLogger(__name__)


@dataclass
class QuantizationPlan:
    """Everything checked and prepared before any weight changes."""

    adapter: Adapter
    targets: list[LinearTarget]
    method: Recipe
    calibration: torch.Tensor | None
    batch_size: int = 8
    activations: list[tuple[str, str, ActivationSpec]] = field(default_factory=list)
    attention: ActivationSpec | None = None
    kv: KVSpec | None = None

    @property
    def needs_calibration(self) -> bool:
        """Whether the weight method or a static activation range needs calibration data."""
        static = any(not a.dynamic for _, _, a in self.activations)
        weights = bool(self.targets) or bool(self.method.transforms)
        return (weights and self.method.needs_calibration) or static

    def size_metrics(self, model: nn.Module, kv_tokens: int = 2048) -> dict[str, float]:
        """Size in bytes and effective bits of this plan on ``model``."""
        return size_metrics(
            model, self.adapter, self.targets, self.activations, self.kv, kv_tokens, self.method.extra_bits
        )


@dataclass
class Evaluation:
    """Metrics of one evaluation, texts for a person to read (samples, answers) and the time of each part."""

    metrics: list[Metric] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


def _as(model_cls: type[Any], value: Any) -> Any:
    if value is None:
        return model_cls()
    if isinstance(value, model_cls):
        return value
    if isinstance(value, Mapping):
        try:
            return model_cls.model_validate(dict(value))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None
    raise ConfigError(f"expected a mapping for {model_cls.__name__}, got {type(value).__name__}")


def plan_quantization(
    model: nn.Module,
    scheme: Scheme | Mapping[str, Any] | None,
    recipe: Sequence[Mapping[str, Any]] = (),
    calibration: torch.Tensor | Calibration | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
) -> QuantizationPlan:
    """Check a scheme and recipe against a model and prepare the calibration data, changing nothing.

    Raises:
        ConfigError: Invalid scheme or recipe, a group size that does not divide a width, a calibrated
            method without calibration data.
        DataError: Calibration text missing, empty or too short.

    """
    sch: Scheme = _as(Scheme, scheme)
    adapter = get_adapter(model)
    weight = sch.weight.model_dump() if sch.weight else None
    overrides = [
        Override(o.match, o.weight, o.activation, o.sets("weight"), o.sets("activation")) for o in sch.overrides
    ]
    targets = plan_weights(model, adapter, weight, overrides)
    act_section = sch.activation.model_dump() if sch.activation else None
    activations = plan_activations(model, adapter, act_section, overrides)
    attention = activation_spec(act_section)
    attention = attention if attention is not None and attention.attention else None
    kv = kv_specs(sch.kv_cache)
    check_runtime(model, adapter, attention, kv)
    method = build_quantizer(recipe)
    check_recipe_shapes(model, adapter, targets, method)
    if method.rotation is not None:
        check_rotation(model, adapter)
        if method.rotation.kv:
            if kv is None:
                raise ConfigError("recipe rotation.kv=true rotates cached keys, but scheme.kv_cache quantizes nothing")
            kv = dataclasses.replace(kv, rotate_keys=True)
            check_runtime(model, adapter, None, kv)
    plan = QuantizationPlan(adapter, targets, method, None, 8, activations, attention, kv)
    if plan.needs_calibration:
        if calibration is None:
            what = "static activation ranges need" if not (targets and method.needs_calibration) else (
                f"method {method.name} needs"
            )
            raise ConfigError(f"{what} calibration data, but none was given")
        if isinstance(calibration, torch.Tensor):
            plan.calibration = calibration
        else:
            cal: Calibration = _as(Calibration, calibration)
            if tokenizer is None:
                raise ConfigError("calibration given as a config needs the tokenizer")
            plan.calibration = calibration_windows(
                tokenizer, cal.dataset, cal.samples, cal.seqlen, cal.seed, cal.path
            )
            plan.batch_size = cal.batch_size
    return plan


def run_quantization(
    model: nn.Module, plan: QuantizationPlan, device: torch.device | None = None, progress: bool = True
) -> QuantizeReport:
    """Quantize ``model`` in place according to a prepared plan.

    Weights are quantized first; then activation, attention-input and KV cache quantizers are installed
    (``report.runtime``; its ``remove()`` takes them off again) and static activation ranges calibrated.
    """
    report = quantize_model(
        model, plan.adapter, plan.targets, plan.method, plan.calibration, device, plan.batch_size, progress
    )
    if device is not None:
        model.to(device)
    report.runtime = install_runtime(model, plan.adapter, plan.activations, plan.kv, plan.attention)
    if plan.calibration is not None and any(not a.dynamic for _, _, a in plan.activations):
        t0 = time.perf_counter()
        calibrate_static_activations(model, report.runtime, plan.calibration, plan.batch_size, progress)
        report.timings["static_ranges_s"] = time.perf_counter() - t0
    return report


def quantize(
    model: nn.Module,
    scheme: Scheme | Mapping[str, Any] | None,
    recipe: Sequence[Mapping[str, Any]] = (),
    calibration: torch.Tensor | Calibration | Mapping[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize a Hugging Face causal LM in place.

    Args:
        model: The model (any family with an adapter).
        scheme: The ``scheme`` section of a config (mapping or :class:`Scheme`).
        recipe: The ``recipe`` section: methods in order, e.g. ``[{"gptq": {"damp": 0.01}}]``.
        calibration: Token ids (samples, seqlen), or the ``calibration`` section (needs ``tokenizer``).
        tokenizer: The model's tokenizer, to build calibration windows from a config.
        device: Where layers are processed (default: where the model is).
        progress: Show a progress bar.

    Returns:
        Per-linear records (relative output error, seconds) and timings.

    """
    plan = plan_quantization(model, scheme, recipe, calibration, tokenizer)
    dev = torch.device(device) if isinstance(device, str) else device
    return run_quantization(model, plan, dev, progress)


def prepare_eval_windows(tokenizer: Any, config: Evaluate) -> dict[str, torch.Tensor]:
    """Tokenize every perplexity corpus of ``config`` (before any work, so data errors come first)."""
    out = {}
    for corpus in config.perplexity:
        out[corpus] = eval_windows(corpus, tokenizer, config.seqlen, config.max_windows).input_ids
    return out


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    evaluate_config: Evaluate | Mapping[str, Any] | None = None,
    *,
    windows: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate a (quantized) model in memory.

    Args:
        model: The model, on the device to evaluate on.
        tokenizer: Its tokenizer.
        evaluate_config: The ``evaluate`` section (mapping or :class:`Evaluate`).
        windows: Pre-tokenized windows per corpus (from :func:`prepare_eval_windows`).
        progress: Show progress bars.

    Returns:
        Metrics named by protocol and size (``ppl.wikitext2.s2048.w40``) and timings.

    """
    cfg: Evaluate = _as(Evaluate, evaluate_config)
    windows = windows or prepare_eval_windows(tokenizer, cfg)
    result = Evaluation()
    for corpus, ids in windows.items():
        t0 = time.perf_counter()
        res = perplexity(model, ids, batch_size=cfg.batch_size, progress=progress, desc=f"ppl {corpus}")
        name = ppl_metric_name(corpus, ids.shape[1], ids.shape[0])
        result.metrics.append(Metric(name, res.ppl))
        result.timings[f"eval.{corpus}_s"] = time.perf_counter() - t0
        result.timings[f"eval.{corpus}_tok_per_s"] = res.tokens_per_second
        log.info("%s = %.4f (%.1f tok/s)", name, res.ppl, res.tokens_per_second)
    if cfg.long_context is not None:
        _long_context(model, tokenizer, cfg.long_context, result)
    if cfg.sample is not None:
        result.texts["sample"] = greedy_sample(model, tokenizer, cfg.sample.prompt, cfg.sample.max_new_tokens)
    return result


def _long_context(model: nn.Module, tokenizer: Any, lc: LongContextConfig, result: Evaluation) -> None:
    """Retrieval accuracy at each length; the generated answers go to the texts."""
    for length in lc.lengths:
        t0 = time.perf_counter()
        acc, answers = retrieval_accuracy(model, tokenizer, length, lc.samples, lc.seed, lc.pairs)
        result.timings[f"retrieval.len{length}_s"] = time.perf_counter() - t0
        name = f"retrieval.len{length}.p{lc.pairs}.n{lc.samples}"
        result.metrics.append(Metric(name, acc))
        result.texts[name] = json.dumps(answers)
