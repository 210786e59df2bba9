"""The one evaluation path: every measure of ``evaluate`` on a model, resident or read layer by layer.

:func:`evaluate` runs perplexity (GPTQ protocol, with each window's NLL beside the FP model's),
long-context retrieval, a greedy generation sample, dialogue, the divergence from FP (KL, top-k
agreement), lm-eval tasks at each few-shot count with the paired measures against FP and the
self-calibration of multiple-choice tasks (:mod:`ptqlab.eval.calibration_error`), the per-module
sensitivity, and the speed in a runtime (llama.cpp, torch): the measures of :mod:`ptqlab.eval.measures`,
through the model's access (:mod:`ptqlab.eval.access`: a model in memory, or
:class:`ptqlab.eval.streamed.LayerMajorModel`). The runner, the Python API and the benchmarks all evaluate through it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .access import ModelAccess, ResidentModel
from .measures import Context, RuntimeFiles, check_files, planned
from .plan import EvalPlan
from .reference import Reference
from .result import Evaluation, WindowNLL

__all__ = ["Evaluation", "RuntimeFiles", "WindowNLL", "evaluate"]

log = logging.getLogger(__name__)


def evaluate(
    model: nn.Module | ModelAccess,
    tokenizer: Any,
    plan: EvalPlan,
    reference: Reference | None = None,
    *,
    progress: bool = True,
    peers: Sequence[tuple[float, float]] = (),
    files: RuntimeFiles | None = None,
) -> Evaluation:
    """Evaluate a (quantized) model, every section of ``plan``.

    Args:
        model: The model in memory, where it runs, or an access to it (a layer-major model on disk).
        tokenizer: Its tokenizer.
        plan: From :func:`ptqlab.eval.plan.plan_evaluation`.
        reference: The FP side (from :func:`ptqlab.eval.reference.build_reference`); the divergence and the
            sensitivity need it, the paired task measures and the FP window NLLs use it when present. A
            layer-major access fills it in the same pass.
        progress: Show progress bars.
        peers: Under ``evaluate.adaptive`` with ``target: rank``, the degradation intervals ``(lo, hi)`` of the
            other runs of the sweep: perplexity stops once this run's interval overlaps none of them.
        files: How the run writes its model for a runtime (``evaluate.speed`` in llama.cpp needs it).

    Returns:
        Metrics, timings, texts, window NLLs, sensitivities and the adaptive outcome.

    Raises:
        ConfigError: The plan asks for the divergence, the sensitivity or adaptive perplexity without the
            FP reference, on a layer-major model for a measure that needs the whole model, or for the speed in
            llama.cpp without ``files`` (before any work).

    """
    access: ModelAccess = ResidentModel(model) if isinstance(model, nn.Module) else model
    ref = reference if reference is not None else Reference()
    measures = planned(plan, access.layer_major)
    check_files(plan, files)
    access.check(plan, ref)
    ctx = Context(access, tokenizer, plan, ref, Evaluation(), progress, peers, files)
    for measure in measures:
        if measure.inference:
            with torch.inference_mode():
                measure.run(ctx)
        else:
            measure.run(ctx)
    ctx.result.timings.update(access.timings)
    return ctx.result
