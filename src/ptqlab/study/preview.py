"""What a run will compute, counted, and how long it will take: ``ptqlab run --dry-run``.

Only the tokenizer is loaded (and the weight files hashed for the run id); no model is loaded, nothing is
quantized or evaluated, and nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..compile import compile_config
from ..eval.plan import EvalPlan, plan_evaluation
from ..eval.reference import reference_cached
from ..eval.tasks import count_items
from ..memory import format_size
from ..models.loading import load_tokenizer, model_fingerprint, resolve_device
from ..schema import Evaluate, RunConfig
from ..store import Store, normalized, run_id
from .estimate import Estimate, Estimator, workload_of
from .streamed import StreamChoice, choose_stream, offload_root


@dataclass
class Preview:
    """A run before it runs.

    Attributes:
        run_id: Its id.
        status: ``done``/``failed`` when the store has it, else ``missing``.
        steps: ``(phase, what)`` for each thing it computes, in order.
        estimate: Seconds per phase from the store's timings.

    """

    run_id: str
    status: str
    steps: list[tuple[str, str]] = field(default_factory=list)
    estimate: Estimate = field(default_factory=Estimate)


def preview_run(cfg: RunConfig, store: Store | None) -> Preview:
    """Count what ``cfg`` computes and price it from ``store``'s finished runs, computing nothing.

    Raises:
        ConfigError: What compiling the configuration and planning its evaluation would raise.
        ModelLoadError: A model or tokenizer that cannot be found.

    """
    compiled = compile_config(cfg)
    fingerprint = model_fingerprint(cfg.model)
    rid = run_id(cfg, fingerprint)
    stored = store.get(rid) if store is not None else None
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    plan = plan_evaluation(cfg.evaluate, tokenizer)
    ev = cfg.evaluate
    choice = choose_stream(cfg)
    needs_data = compiled.scheme.recipe.needs_calibration or _static(cfg)
    errors_only = not needs_data and cfg.calibration.layer_errors and cfg.scheme.weight is not None
    steps = [("quantize", _scheme_line(cfg, needs_data or errors_only, errors_only)),
             ("runtime", _runtime_line(cfg, choice))]
    ppl_tokens = sum(int(ids.numel()) for ids in plan.windows.values())
    cached = reference_cached(plan.windows, fingerprint, resolve_device(cfg.device).type, cfg.dtype)
    if plan.windows:
        steps.append(("reference", "FP window NLLs: " + ("computed beside the quantized model, layer by layer"
                                                         if choice.stream else "in the disk cache" if cached
                                                         else "computed first")))
        for corpus, ids in plan.windows.items():
            steps.append(("perplexity", f"{corpus}: {ids.shape[0]} windows x {ids.shape[1]} tokens"))
        if ev.adaptive is not None:
            steps.append(("perplexity", f"adaptive: stops early once the class is settled (at least "
                                        f"{ev.adaptive.min_windows} windows per corpus)"))
    items = count_items(ev.tasks, ev.limit, ev.tasks_dir) if ev.tasks else {}
    steps += _evaluation_steps(ev, plan, items)
    counted = list(items.values())
    work = replace(  # the counts the keys give, made exact by the plan
        workload_of(normalized(cfg)),
        ppl_tokens=ppl_tokens,
        task_items=None if None in counted else sum(n for n in counted if n is not None) * len(ev.shot_counts()),
        divergence_tokens=0 if plan.divergence is None else int(plan.divergence.numel()),
        reference_cached=cached,
    )
    estimator = Estimator(store.timings() if store is not None else [])
    return Preview(rid, stored.status if stored is not None else "missing", steps, estimator.estimate(work))


def _runtime_line(cfg: RunConfig, choice: StreamChoice) -> str:
    """Whether the run streams its layers, and what that was decided from."""
    if not choice.stream:
        return "the whole model resident" + (f" ({format_size(choice.model_bytes)} at {cfg.dtype}; budget "
                                             f"{format_size(choice.budget)})" if choice.budget else "")
    return (f"streamed one decoder layer at a time ({format_size(choice.model_bytes)} at {cfg.dtype}, one layer "
            f"{format_size(choice.layer_bytes)}; budget {format_size(choice.budget)}); quantized model under "
            f"{offload_root(cfg)}")


def _evaluation_steps(ev: Evaluate, plan: EvalPlan, items: dict[str, int | None]) -> list[tuple[str, str]]:
    """What the evaluation computes beside perplexity, one line each."""
    steps: list[tuple[str, str]] = []
    counts = [k for k in ev.shot_counts() if k is not None]
    shots = "" if not counts else f", {'/'.join(map(str, counts))}-shot" + (
        f" (each item {len(counts)} times)" if len(counts) > 1 else "")
    for task, n in items.items():
        steps.append(("tasks", f"{task}: {'?' if n is None else n} items{shots}"))
    div = ev.divergence_config()
    if div is not None and plan.divergence is not None:
        steps.append(("divergence", f"{div.corpus}: {plan.divergence.shape[0]} windows x {div.seqlen} tokens, "
                                    f"top {div.top_k}"))
    if ev.long_context is not None:
        lengths = ", ".join(map(str, ev.long_context.lengths))
        steps.append(("long_context", f"retrieval at {lengths} tokens, {ev.long_context.samples} samples each"))
    if ev.sample is not None:
        steps.append(("sample", f"{ev.sample.max_new_tokens} greedy tokens after {ev.sample.prompt!r}"))
    if ev.dialogue is not None:
        judge = "" if ev.judge is None else f", each answer scored by {ev.judge.model} at {ev.judge.url}"
        steps.append(("dialogue", f"conversations of {ev.dialogue.path or 'the built-in set'}"
                                  f"{'' if ev.dialogue.limit is None else f' (first {ev.dialogue.limit})'}, "
                                  f"up to {ev.dialogue.max_new_tokens} tokens per answer{judge}"))
    if ev.sensitivity is not None and plan.sensitivity is not None:
        steps.append(("sensitivity", f"per-module error on {plan.sensitivity.shape[0]} window(s) x "
                                     f"{ev.sensitivity.seqlen} tokens of {ev.sensitivity.corpus}"))
    return steps


def _static(cfg: RunConfig) -> bool:
    act = cfg.scheme.activation
    return act is not None and not act.dynamic


def _scheme_line(cfg: RunConfig, calibrated: bool, errors_only: bool = False) -> str:
    sections = (("W", cfg.scheme.weight), ("A", cfg.scheme.activation), ("KV", cfg.scheme.kv_cache))
    parts = [_describe(target, section) for target, section in sections if section is not None]
    recipe = ", ".join(next(iter(step)) for step in cfg.recipe) or "rtn"
    line = f"{' + '.join(parts) or 'nothing (FP)'}; recipe {recipe}"
    if calibrated:
        cal = cfg.calibration
        line += f"; calibration {cal.samples} x {cal.seqlen} tokens from {cal.dataset}"
        if errors_only:
            line += " (only to measure each linear's error: calibration.layer_errors)"
    return line


def _describe(target: str, section: Any) -> str:
    """``W4 channel``, ``A8 token``, ``W fp4_e2m1 group 32``, ``KV4 group 64``."""
    label = target + (str(section.bits) if section.bits else "")
    fmt = getattr(section, "format", "int")
    if fmt != "int":
        label += f" {fmt}"
    if section.granularity:
        label += f" {section.granularity}"
        if section.granularity == "group" and section.group_size:
            label += f" {section.group_size}"
    return label
