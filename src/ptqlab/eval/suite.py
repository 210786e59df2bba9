"""The one evaluation path: every section of ``evaluate`` on a model in memory, against its FP reference.

:func:`evaluate` runs perplexity (GPTQ protocol, with each window's NLL beside the FP model's),
long-context retrieval, a greedy generation sample, the divergence from FP (KL, top-k agreement),
lm-eval tasks at each few-shot count with the paired measures against FP and the self-calibration of
multiple-choice tasks (:mod:`ptqlab.eval.calibration`), and the per-module sensitivity, and names every
metric through :mod:`ptqlab.metrics`. The runner, the Python API and the benchmarks all evaluate through it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..metrics import (
    DIALOGUE_ANSWERS,
    DIALOGUE_JUDGE,
    DIALOGUE_UNRATED,
    Metric,
    divergence_name,
    perplexity_name,
    retrieval_name,
    task_name,
)
from ..models.registry import get_adapter
from . import divergence as dv
from .adaptive import AdaptiveOutcome, adaptive_perplexity, check_reference, outcome_metrics
from .calibration import task_reliability
from .dialogue import load_conversations, run_dialogue
from .fewshot import shot_measure
from .generation import greedy_sample
from .judge import judge_conversations, judge_of
from .lm import SCORING_TEXT, scoring_path
from .perplexity import perplexity
from .plan import EvalPlan
from .reference import Reference
from .retrieval import retrieval_accuracy
from .sensitivity import Sensitivity, compare
from .tasks import ShotResults, TaskResults, paired, run_shots

log = logging.getLogger(__name__)


@dataclass
class WindowNLL:
    """Each perplexity window's mean token NLL, of the evaluated model and of the FP model (when known).

    ``nll`` is in window order; under adaptive evaluation a window that was not evaluated is None.
    """

    nll: list[float | None]
    fp_nll: list[float] | None = None


@dataclass
class Evaluation:
    """What one evaluation measured.

    Attributes:
        metrics: Named by protocol and size (``ppl.wikitext2.s2048.w40``), with standard errors where they exist.
        timings: Seconds of each part.
        texts: Texts for a person to read (the sample, the retrieval answers) and JSON records (the reliability
            curves of multiple-choice tasks).
        windows: Per-window NLLs by perplexity metric name (what paired statistics need).
        sensitivity: Each decoder linear's and layer's deviation from FP.
        adaptive: What adaptive perplexity settled (``evaluate.adaptive``), else None.

    """

    metrics: list[Metric] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    windows: dict[str, WindowNLL] = field(default_factory=dict)
    sensitivity: list[Sensitivity] = field(default_factory=list)
    adaptive: AdaptiveOutcome | None = None


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    plan: EvalPlan,
    reference: Reference | None = None,
    *,
    progress: bool = True,
    peers: Sequence[tuple[float, float]] = (),
) -> Evaluation:
    """Evaluate a (quantized) model in memory, every section of ``plan``.

    Args:
        model: The model, where it runs.
        tokenizer: Its tokenizer.
        plan: From :func:`ptqlab.eval.plan.plan_evaluation`.
        reference: The FP side (from :func:`ptqlab.eval.reference.build_reference`); the divergence and the
            sensitivity need it, the paired task measures and the FP window NLLs use it when present.
        progress: Show progress bars.
        peers: Under ``evaluate.adaptive`` with ``target: rank``, the degradation intervals ``(lo, hi)`` of the
            other runs of the sweep: perplexity stops once this run's interval overlaps none of them.

    Returns:
        Metrics, timings, texts, window NLLs, sensitivities and the adaptive outcome.

    Raises:
        ConfigError: The plan asks for the divergence, the sensitivity or adaptive perplexity without the
            FP reference.

    """
    ref = reference or Reference()
    if plan.config.adaptive is not None:
        if ref.same_model and plan.windows:
            raise ConfigError("evaluate.adaptive compares against the FP reference, but the model is evaluated as "
                              "its own FP model: pass the FP reference measured before quantizing")
        check_reference(plan.windows, ref.nll)
    if plan.divergence is not None and ref.topk is None:
        raise ConfigError("evaluate.divergence compares against the FP model, but no FP reference was given")
    if plan.sensitivity is not None and ref.outputs is None:
        raise ConfigError("evaluate.sensitivity compares against the FP model, but no FP reference was given")
    result = Evaluation()
    with torch.inference_mode():
        if plan.config.adaptive is not None:
            _adaptive(model, plan, ref, result, progress, peers)
        else:
            _perplexity(model, plan, ref, result, progress)
        _long_context(model, tokenizer, plan, result)
        if plan.config.sample is not None:
            sample = plan.config.sample
            result.texts["sample"] = greedy_sample(model, tokenizer, sample.prompt, sample.max_new_tokens)
        _dialogue(model, tokenizer, plan, result)
        _divergence(model, plan, ref, result)
    _tasks(model, tokenizer, plan, ref, result)
    if plan.sensitivity is not None and ref.outputs is not None:
        t0 = time.perf_counter()
        result.sensitivity = compare(model, get_adapter(model), plan.sensitivity, ref.outputs)
        result.timings["sensitivity_s"] = time.perf_counter() - t0
    return result


def _dialogue(model: nn.Module, tokenizer: Any, plan: EvalPlan, result: Evaluation) -> None:
    """Answer the conversations (stored as ``dialogue`` in the texts); with a judge, score every answer."""
    cfg = plan.config.dialogue
    if cfg is None:
        return
    t0 = time.perf_counter()
    conversations = run_dialogue(model, tokenizer, load_conversations(cfg.path, cfg.limit), cfg.max_new_tokens)
    result.texts["dialogue"] = json.dumps([c.to_json() for c in conversations])
    result.metrics.append(Metric(DIALOGUE_ANSWERS, float(sum(len(c.answers) for c in conversations))))
    result.timings["dialogue_s"] = time.perf_counter() - t0
    if plan.config.judge is None:
        return
    t0 = time.perf_counter()
    scores, unrated = judge_conversations(judge_of(plan.config), conversations)
    rated = [s for row in scores for s in row if s is not None]
    if rated:
        result.metrics.append(Metric(DIALOGUE_JUDGE, sum(rated) / len(rated)))
    result.metrics.append(Metric(DIALOGUE_UNRATED, float(unrated)))
    result.texts["dialogue.judge"] = json.dumps({"model": plan.config.judge.model, "scores": scores})
    result.timings["judge_s"] = time.perf_counter() - t0


def _perplexity(model: nn.Module, plan: EvalPlan, ref: Reference, result: Evaluation, progress: bool) -> None:
    for corpus, ids in plan.windows.items():
        t0 = time.perf_counter()
        res = perplexity(model, ids, batch_size=plan.config.batch_size, progress=progress, desc=f"ppl {corpus}")
        name = perplexity_name(corpus, ids.shape[1], ids.shape[0])
        result.metrics.append(Metric(name, res.ppl))
        nll: list[float | None] = list(res.nll)
        result.windows[name] = WindowNLL(nll, res.nll if ref.same_model else ref.nll.get(corpus))
        result.timings[f"eval.{corpus}_s"] = time.perf_counter() - t0
        result.timings[f"eval.{corpus}_tok_per_s"] = res.tokens_per_second
        log.info("%s = %.4f (%.1f tok/s)", name, res.ppl, res.tokens_per_second)


def _adaptive(
    model: nn.Module, plan: EvalPlan, ref: Reference, result: Evaluation, progress: bool,
    peers: Sequence[tuple[float, float]],
) -> None:
    """Perplexity until the degradation is settled; each corpus's metric is the estimate of its full set."""
    assert plan.config.adaptive is not None
    if not plan.windows:
        return
    run = adaptive_perplexity(model, plan.windows, ref.nll, plan.config.adaptive, batch_size=plan.config.batch_size,
                              peers=peers, progress=progress)
    for corpus, c in run.corpora.items():
        name = perplexity_name(corpus, c.ids.shape[1], c.total)
        result.metrics.append(Metric(name, c.estimate))
        result.windows[name] = WindowNLL(c.nll, ref.nll[corpus])
        result.timings[f"eval.{corpus}_s"] = c.seconds
        result.timings[f"eval.{corpus}_tok_per_s"] = c.tokens / c.seconds if c.seconds > 0 else float("inf")
        log.info("%s ~ %.4f (%d of %d windows)", name, c.estimate, c.used, c.total)
    result.metrics += outcome_metrics(run.outcome)
    result.adaptive = run.outcome


def _long_context(model: nn.Module, tokenizer: Any, plan: EvalPlan, result: Evaluation) -> None:
    """Retrieval accuracy at each length; the generated answers go to the texts."""
    lc = plan.config.long_context
    if lc is None:
        return
    for length in lc.lengths:
        t0 = time.perf_counter()
        acc, answers = retrieval_accuracy(model, tokenizer, length, lc.samples, lc.seed, lc.pairs)
        result.timings[f"retrieval.len{length}_s"] = time.perf_counter() - t0
        name = retrieval_name(length, lc.pairs, lc.samples)
        result.metrics.append(Metric(name, acc))
        result.texts[name] = json.dumps(answers)


def _divergence(model: nn.Module, plan: EvalPlan, ref: Reference, result: Evaluation) -> None:
    div = plan.config.divergence_config()
    if div is None or ref.topk is None:
        return
    t0 = time.perf_counter()
    d = dv.divergence(model, ref.topk)
    result.timings["divergence_s"] = time.perf_counter() - t0
    n_win, seqlen = ref.topk.ids.shape
    for kind, value in (("kl", d.kl), ("top1", d.top1), ("top5", d.top5)):
        result.metrics.append(Metric(divergence_name(kind, div.corpus, seqlen, n_win), value))


def _tasks(model: nn.Module, tokenizer: Any, plan: EvalPlan, ref: Reference, result: Evaluation) -> None:
    """lm-eval metrics at each few-shot count, the self-calibration of multiple-choice tasks, paired measures."""
    if not plan.config.tasks:
        return
    t0 = time.perf_counter()
    shots = run_shots(model, tokenizer, plan.config.tasks, plan.shots, **plan.task_settings)
    result.timings["lm_eval_s"] = time.perf_counter() - t0
    result.texts[SCORING_TEXT] = json.dumps(scoring_path(model))
    record_tasks(result, plan, shots, shots if ref.same_model else ref.tasks)


def record_tasks(result: Evaluation, plan: EvalPlan, shots: ShotResults, fp: ShotResults | None) -> None:
    """Add the task measures of each few-shot count to ``result``, and each reliability curve to its texts.

    On a few-shot curve (``evaluate.num_fewshot`` a list) every name says its count
    (``lm_eval.piqa.acc.fewshot5``); otherwise names are lm-eval's (``lm_eval.piqa.acc``). A multiple-choice
    task also gets its expected calibration error (``lm_eval.<task>.ece``) and its reliability curve, stored
    as JSON in the texts under ``lm_eval.<task>.reliability`` (both with the same count suffix).
    """
    for k, res in shots.items():
        label = plan.shot_label(k)
        result.metrics += task_metrics(res, None if fp is None else fp.get(k), label)
        for task, rel in task_reliability(res.loglik, res.correct).items():
            result.metrics.append(Metric(task_name(task, shot_measure("ece", label)), rel.ece))
            result.texts[task_name(task, shot_measure("reliability", label))] = json.dumps(rel.to_json())


def task_metrics(res: TaskResults, fp: TaskResults | None, shots: int | None = None) -> list[Metric]:
    """lm-eval's metrics (names kept, with stderr) and, given the FP answers, the paired measures.

    With ``shots``, each name says the few-shot count (``lm_eval.piqa.acc.fewshot5``).
    """
    out = []
    for task, metrics in res.metrics.items():
        out += [Metric(task_name(task, shot_measure(name, shots)), value, err)
                for name, (value, err) in metrics.items()]
        if fp is not None:
            out += [Metric(task_name(task, shot_measure(name, shots)), value)
                    for name, value in paired(fp, res, task).items()]
    return out
