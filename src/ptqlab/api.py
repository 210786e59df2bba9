"""The Python API: ``quantize`` a model in memory, measure its FP ``reference``, ``evaluate`` it.

Example:
    >>> import ptqlab
    >>> lm = ptqlab.load_model("stories260k")
    >>> ev = {"perplexity": ["wikitext2"], "seqlen": 256, "divergence": True}
    >>> fp = ptqlab.reference(lm.model, lm.tokenizer, ev)     # the FP side, before quantizing
    >>> report = ptqlab.quantize(lm.model, {"weight": {"bits": 4}}, [{"gptq": {}}],
    ...                          {"samples": 8, "seqlen": 128}, tokenizer=lm.tokenizer)
    >>> result = ptqlab.evaluate(lm.model, lm.tokenizer, ev, reference=fp)

Every argument is compiled by :mod:`ptqlab.compile`, quantized by :mod:`ptqlab.pipeline` and evaluated
by :func:`ptqlab.eval.evaluate`, exactly as ``ptqlab run`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .compile import compile_evaluate, compile_quantization, compile_scheme
from .errors import ConfigError
from .eval import EvalPlan, Evaluation, Reference, build_reference
from .eval import evaluate as _evaluate
from .eval.measures import RuntimeFiles
from .eval.reference import self_reference
from .formats.gguf import gguf_runtime_files
from .pipeline.driver import QuantizeReport
from .pipeline.plan import QuantizationPlan, RunOptions
from .pipeline.quantize import is_quantized
from .pipeline.quantize import quantize as _quantize
from .schema import Calibration, Evaluate, Scheme
from .store import Store
from .study.executors import Executor, LocalExecutor, ProcessExecutor
from .study.sweep import load_sweep
from .study.sweeper import SweepSummary, plan_sweep, run_sweep

log = logging.getLogger(__name__)

__all__ = ["Evaluation", "Reference", "evaluate", "plan_quantization", "quantize", "reference", "run_quantization"]


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
    return compile_quantization(model, compile_scheme(scheme, recipe), calibration, tokenizer)


def run_quantization(
    model: nn.Module, plan: QuantizationPlan, device: torch.device | str | None = None, progress: bool = True,
    *, options: RunOptions = RunOptions(),
) -> QuantizeReport:
    """Quantize ``model`` in place according to a prepared plan (see :func:`ptqlab.pipeline.quantize.quantize`).

    ``options`` (:class:`ptqlab.pipeline.plan.RunOptions`) say how it runs: the calibration's layer pass and
    memory budget, where spilled hidden states go, whether the report keeps each linear's grid.
    """
    return _quantize(model, plan, device=device, progress=progress, options=options)


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
        device: Where to run (the model is moved there); None keeps it where it is.
        progress: Show a progress bar.

    Returns:
        Per-linear records (relative output error, seconds), timings, size metrics, and each quantized
        linear's grid (what :func:`evaluate` writes when it times the model in llama.cpp).

    """
    plan = plan_quantization(model, scheme, recipe, calibration, tokenizer)
    return _quantize(model, plan, device=device, progress=progress, options=RunOptions(keep_grids=True))


def reference(
    model: nn.Module,
    tokenizer: Any,
    evaluate_config: Evaluate | Mapping[str, Any] | None = None,
    *,
    fingerprint: str | None = None,
    progress: bool = True,
) -> Reference:
    """Measure the FP side of an evaluation on ``model`` before it is quantized.

    Args:
        model: The FP model, where it will run.
        tokenizer: Its tokenizer.
        evaluate_config: The ``evaluate`` section the reference is for.
        fingerprint: The model's fingerprint (``load_model(...).info.fingerprint``): with it, the parts are
            read from and written to the disk cache.
        progress: Show progress bars.

    Raises:
        ConfigError: The model was already quantized by ptqlab.

    """
    if is_quantized(model):
        raise ConfigError("reference: this model was already quantized by ptqlab; measure the FP reference first")
    plan = compile_evaluate(evaluate_config, tokenizer, model)
    return build_reference(model, tokenizer, plan, fingerprint=fingerprint, progress=progress)


def _reference_for(
    model: nn.Module, tokenizer: Any, plan: EvalPlan, given: Reference | nn.Module | None, progress: bool
) -> tuple[EvalPlan, Reference]:
    """The FP reference to evaluate against, and the plan (without parts that cannot be had)."""
    if isinstance(given, Reference):
        return plan, given
    if isinstance(given, nn.Module):
        return plan, build_reference(given, tokenizer, plan, progress=progress)
    if not is_quantized(model):
        return plan, self_reference(model, tokenizer, plan, progress=progress)
    asked = set() if plan.config.defaulted else set(plan.config.names())
    needs = [k for k in ("divergence", "sensitivity") if k in asked and getattr(plan, k) is not None]
    if needs:
        raise ConfigError(
            f"evaluate.{needs[0]} compares against the FP model, but this model was quantized by ptqlab and no "
            "reference was given: pass reference=ptqlab.reference(model, tokenizer, evaluate) measured before "
            "quantizing, or reference=<the FP model>"
        )
    if plan.sensitivity is not None:
        log.info("evaluate: no FP reference for a quantized model; the sensitivity (on by default) is skipped")
        plan = plan.without_sensitivity()
    if plan.config.tasks:
        log.info("evaluate: no FP reference for a quantized model; the paired task measures are left out")
    return plan, Reference()


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    evaluate_config: Evaluate | Mapping[str, Any] | None = None,
    *,
    reference: Reference | nn.Module | None = None,
    report: QuantizeReport | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate a (quantized) model in memory: every key of the ``evaluate`` section, as ``ptqlab run`` does.

    Args:
        model: The model, where it is to run.
        tokenizer: Its tokenizer.
        evaluate_config: The ``evaluate`` section (mapping or :class:`Evaluate`): what it names runs; naming no
            evaluation (or None), the defaults (wikitext2 perplexity, sample, sensitivity).
        reference: The FP side: a :class:`Reference` from :func:`reference` measured before quantizing, or
            the FP model itself. Left out, an unquantized ``model`` is its own reference; for a model
            quantized by ptqlab, asking for the divergence or the sensitivity is then an error, and the
            paired task measures, the FP window NLLs and the default sensitivity are left out.
        report: What :func:`quantize` returned for ``model``: ``evaluate.speed`` in llama.cpp writes the model
            as GGUF from its grids (an unquantized model needs none). KV-cache schemes are passed to llama.cpp
            by ``ptqlab run``, not here.
        progress: Show progress bars.

    Returns:
        Metrics named by protocol and size (``ppl.wikitext2.s2048.w40``, ``kl.wikitext2.s512.w16``,
        ``lm_eval.piqa.acc``), texts, per-window NLLs, sensitivities and timings.

    """
    plan = compile_evaluate(evaluate_config, tokenizer, model)
    plan, ref = _reference_for(model, tokenizer, plan, reference, progress)
    return _evaluate(model, tokenizer, plan, ref, progress=progress, files=_gguf_files(model, tokenizer, report))


def _gguf_files(model: nn.Module, tokenizer: Any, report: QuantizeReport | None) -> RuntimeFiles | None:
    """How the API writes ``model`` as GGUF: from its report's grids, or as it is when it is not quantized."""
    if is_quantized(model) and (report is None or not report.grids):
        return None  # evaluate refuses the speed in llama.cpp, before any work
    if report is not None and report.runtime is not None and report.runtime.installed:
        return None
    return gguf_runtime_files(model, tokenizer, {} if report is None else report.grids)


def sweep(
    path: str,
    *,
    store: str = "ptqlab.db",
    sets: Sequence[str] = (),
    retry_failed: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> SweepSummary:
    """Run a sweep file as ``ptqlab sweep`` does, in this process (or ``workers`` processes).

    Args:
        path: The sweep YAML file.
        store: The results store.
        sets: ``PATH=VALUE`` overrides of the file's keys.
        retry_failed: Run the failed runs again.
        workers: Processes to run in (1: this process).
        progress: Show the sweep's bar and each run's bars.

    Returns:
        What was computed now (``records``), failed, already done or running elsewhere.

    Raises:
        ConfigError: A bad sweep file (nothing is computed).
        StoreError: A store this version cannot use.

    """
    sw = load_sweep(path, sets)
    results = Store(store)
    executor: Executor = ProcessExecutor(workers) if workers > 1 else LocalExecutor(progress=progress)
    try:
        return run_sweep(plan_sweep(sw, results), results, executor, retry_failed=retry_failed, progress=progress)
    finally:
        executor.close()
