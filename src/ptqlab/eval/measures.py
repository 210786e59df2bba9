"""The measures of an ``evaluate`` section, each an object that says when it is asked and where it can run.

A :class:`Measure` declares whether it runs on a layer-major model (:attr:`Measure.layer_major`): the
ones that need the whole model in memory at once (generation, the per-module sensitivity, adaptive
stopping) do not, and :func:`check_layer_major` refuses them before any work. :data:`MEASURES` is the
order in which :func:`ptqlab.eval.suite.evaluate` runs them. A new measure is one :class:`Measure` here.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..metrics import DIALOGUE_ANSWERS, DIALOGUE_JUDGE, DIALOGUE_UNRATED, Metric, perplexity_name, retrieval_name
from ..models.registry import get_adapter
from ..schema import KVCacheScheme
from .access import ModelAccess
from .adaptive import adaptive_perplexity, outcome_metrics
from .dialogue import load_conversations, run_dialogue
from .generation import greedy_sample
from .judge import judge_conversations, judge_of
from .lm import SCORING_TEXT
from .plan import EvalPlan
from .reference import Reference
from .result import Evaluation, record_tasks
from .retrieval import retrieval_accuracy
from .sensitivity import compare
from .speed import llama_cpp_cache_types, llama_cpp_speed, torch_speed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeFiles:
    """How a run writes its quantized model for a runtime (the run holds the grids; evaluation does not).

    Attributes:
        write_gguf: Write the model as GGUF to a path, with the tensors it keeps in full precision in a
            ``evaluate.speed.float_type`` (``auto``, ``f32``, ``f16``, ``bf16``).
        kv_cache: The run's ``scheme.kv_cache`` (llama.cpp holds some as its cache types), or None.

    """

    write_gguf: Callable[[Path, str], None]
    kv_cache: KVCacheScheme | None = None


@dataclass
class Context:
    """What a measure works with: the model's access, its tokenizer, the plan, the FP side and the result.

    ``files``: how the run writes its model for a runtime (the speed measure in llama.cpp), or None.
    """

    access: ModelAccess
    tokenizer: Any
    plan: EvalPlan
    ref: Reference
    result: Evaluation
    progress: bool
    peers: Sequence[tuple[float, float]]
    files: RuntimeFiles | None = None


@dataclass(frozen=True)
class Measure:
    """One section of ``evaluate``.

    Attributes:
        section: Its key in the ``evaluate`` section (what an error names).
        asked: Whether a plan asks for it.
        run: Measure it, adding to ``ctx.result``.
        layer_major: It runs on a model read layer by layer from disk.
        inference: It runs under ``torch.inference_mode`` (lm-eval manages its own).
        optional_default: A default evaluation that a layer-major model leaves out (not an error).

    """

    section: str
    asked: Callable[[EvalPlan], bool]
    run: Callable[[Context], None]
    layer_major: bool
    inference: bool = True
    optional_default: bool = False


def _perplexity(ctx: Context) -> None:
    plan, ref, result = ctx.plan, ctx.ref, ctx.result
    runs = ctx.access.window_nll(plan, ref, ctx.progress)
    for corpus, ids in plan.windows.items():
        r = runs[corpus]
        name = result.add_perplexity(corpus, ids.shape[0], ids.shape[1], r.ppl, list(r.nll),
                                     r.nll if ref.same_model else ref.nll.get(corpus))
        if r.seconds is not None:
            result.timings[f"eval.{corpus}_s"] = r.seconds
        if r.tokens_per_second is not None:
            result.timings[f"eval.{corpus}_tok_per_s"] = r.tokens_per_second
        log.info("%s = %.4f", name, r.ppl)


def _adaptive(ctx: Context) -> None:
    """Perplexity until the degradation is settled; each corpus's metric is the estimate of its full set."""
    plan, result = ctx.plan, ctx.result
    assert plan.config.adaptive is not None
    if not plan.windows:
        return
    run = adaptive_perplexity(ctx.access.model, plan.windows, ctx.ref.nll, plan.config.adaptive,
                              batch_size=plan.config.batch_size, peers=ctx.peers, progress=ctx.progress)
    for corpus, c in run.corpora.items():
        result.add_perplexity(corpus, c.total, c.ids.shape[1], c.estimate, c.nll, ctx.ref.nll[corpus])
        result.timings[f"eval.{corpus}_s"] = c.seconds
        result.timings[f"eval.{corpus}_tok_per_s"] = c.tokens / c.seconds if c.seconds > 0 else float("inf")
        log.info("%s ~ %.4f (%d of %d windows)", perplexity_name(corpus, c.ids.shape[1], c.total), c.estimate,
                 c.used, c.total)
    result.metrics += outcome_metrics(run.outcome)
    result.adaptive = run.outcome


def _long_context(ctx: Context) -> None:
    """Retrieval accuracy at each length; the generated answers go to the texts."""
    lc = ctx.plan.config.long_context
    assert lc is not None
    for length in lc.lengths:
        t0 = time.perf_counter()
        acc, answers = retrieval_accuracy(ctx.access.model, ctx.tokenizer, length, lc.samples, lc.seed, lc.pairs)
        ctx.result.timings[f"retrieval.len{length}_s"] = time.perf_counter() - t0
        name = retrieval_name(length, lc.pairs, lc.samples)
        ctx.result.metrics.append(Metric(name, acc))
        ctx.result.texts[name] = json.dumps(answers)


def _sample(ctx: Context) -> None:
    sample = ctx.plan.config.sample
    assert sample is not None
    ctx.result.texts["sample"] = greedy_sample(ctx.access.model, ctx.tokenizer, sample.prompt, sample.max_new_tokens)


def _dialogue(ctx: Context) -> None:
    """Answer the conversations (stored as ``dialogue`` in the texts); with a judge, score every answer."""
    config, result = ctx.plan.config, ctx.result
    cfg = config.dialogue
    assert cfg is not None
    t0 = time.perf_counter()
    conversations = run_dialogue(ctx.access.model, ctx.tokenizer, load_conversations(cfg.path, cfg.limit),
                                 cfg.max_new_tokens)
    result.texts["dialogue"] = json.dumps([c.to_json() for c in conversations])
    result.metrics.append(Metric(DIALOGUE_ANSWERS, float(sum(len(c.answers) for c in conversations))))
    result.timings["dialogue_s"] = time.perf_counter() - t0
    if config.judge is None:
        return
    t0 = time.perf_counter()
    scores, unrated = judge_conversations(judge_of(config), conversations)
    rated = [s for row in scores for s in row if s is not None]
    if rated:
        result.metrics.append(Metric(DIALOGUE_JUDGE, sum(rated) / len(rated)))
    result.metrics.append(Metric(DIALOGUE_UNRATED, float(unrated)))
    result.texts["dialogue.judge"] = json.dumps({"model": config.judge.model, "scores": scores})
    result.timings["judge_s"] = time.perf_counter() - t0


def _divergence(ctx: Context) -> None:
    div, ids = ctx.plan.config.divergence_config(), ctx.plan.divergence
    assert div is not None and ids is not None
    t0 = time.perf_counter()
    d = ctx.access.divergence(ctx.plan, ctx.ref)
    ctx.result.timings["divergence_s"] = time.perf_counter() - t0
    ctx.result.add_divergence(d, div.corpus, ids.shape[0], ids.shape[1])


def _tasks(ctx: Context) -> None:
    """lm-eval metrics at each few-shot count, the self-calibration of multiple-choice tasks, paired measures."""
    t0 = time.perf_counter()
    run = ctx.access.tasks(ctx.tokenizer, ctx.plan, ctx.ref)
    ctx.result.timings["lm_eval_s"] = time.perf_counter() - t0
    ctx.result.texts[SCORING_TEXT] = json.dumps(run.scoring)
    record_tasks(ctx.result, ctx.plan, run.own, run.fp)


def _sensitivity(ctx: Context) -> None:
    assert ctx.plan.sensitivity is not None and ctx.ref.outputs is not None
    t0 = time.perf_counter()
    model = ctx.access.model
    ctx.result.sensitivity = compare(model, get_adapter(model), ctx.plan.sensitivity, ctx.ref.outputs)
    ctx.result.timings["sensitivity_s"] = time.perf_counter() - t0


def _speed(ctx: Context) -> None:
    """Prompt and generation tokens/s in the runtime asked for, with the file's bytes and the peak memory."""
    cfg = ctx.plan.config.speed
    assert cfg is not None
    t0 = time.perf_counter()
    if cfg.runtime == "torch":
        sample = torch_speed(ctx.access.model, prompt=cfg.prompt, generate=cfg.generate, repeats=cfg.repeats,
                             threads=cfg.threads, seed=ctx.plan.config.seed)
    elif cfg.runtime == "llama.cpp":
        assert ctx.files is not None  # check_files
        cache_k, cache_v = llama_cpp_cache_types(ctx.files.kv_cache)
        with tempfile.TemporaryDirectory(prefix="ptqlab-speed-") as tmp:
            path = Path(tmp) / "model.gguf"
            ctx.files.write_gguf(path, cfg.float_type)
            sample = llama_cpp_speed(path, prompt=cfg.prompt, generate=cfg.generate, repeats=cfg.repeats,
                                     threads=cfg.threads, cache_type_k=cache_k, cache_type_v=cache_v,
                                     seed=ctx.plan.config.seed)
    else:
        raise ConfigError(f"evaluate.speed runtime {cfg.runtime} is not measured here; use llama.cpp or torch")
    ctx.result.metrics += sample.metrics()
    ctx.result.timings["speed_s"] = time.perf_counter() - t0  # llama_cpp_speed / torch_speed log the medians


MEASURES: tuple[Measure, ...] = (
    Measure("perplexity", lambda p: p.config.adaptive is None and bool(p.windows), _perplexity, layer_major=True),
    Measure("adaptive", lambda p: p.config.adaptive is not None, _adaptive, layer_major=False),
    Measure("long_context", lambda p: p.config.long_context is not None, _long_context, layer_major=False),
    Measure("sample", lambda p: p.config.sample is not None, _sample, layer_major=False, optional_default=True),
    Measure("dialogue", lambda p: p.config.dialogue is not None, _dialogue, layer_major=False),
    Measure("divergence", lambda p: p.config.divergence_config() is not None and p.divergence is not None,
            _divergence, layer_major=True),
    Measure("tasks", lambda p: bool(p.config.tasks), _tasks, layer_major=True, inference=False),
    Measure("sensitivity", lambda p: p.sensitivity is not None, _sensitivity, layer_major=False, inference=False,
            optional_default=True),
    Measure("speed", lambda p: p.config.speed is not None, _speed, layer_major=False, inference=False),
)
"""Every measure, in the order an evaluation runs them."""


def check_files(plan: EvalPlan, files: RuntimeFiles | None) -> None:
    """Raise, before any work, when a measure needs the run's model written for a runtime and cannot have it.

    Raises:
        ConfigError: ``evaluate.speed`` in llama.cpp without the run's GGUF writer.

    """
    speed = plan.config.speed
    if speed is not None and speed.runtime == "llama.cpp" and files is None:
        raise ConfigError("evaluate.speed runtime llama.cpp times the model written as GGUF from its grids: run "
                          "the configuration with `ptqlab run`, or from the Python API pass report= (what "
                          "ptqlab.quantize returned; a model with activation or KV quantizers is timed by ptqlab run)")


def planned(plan: EvalPlan, layer_major: bool) -> list[Measure]:
    """The measures ``plan`` asks for that run on its model (a layer-major one leaves out the optional defaults).

    Raises:
        ConfigError: On a layer-major model, a measure asked for that cannot run layer-major (all are named).

    """
    asked = [m for m in MEASURES if m.asked(plan)]
    if not layer_major:
        return asked
    if plan.config.defaulted and any(m.optional_default for m in asked):
        log.info("runtime.stream: the default sample and sensitivity are not run on a streamed model")
        asked = [m for m in asked if not m.optional_default]
    refused = [m.section for m in asked if not m.layer_major]
    if refused:
        *most, last = [m.section for m in MEASURES if m.layer_major]
        raise ConfigError(f"runtime.stream: evaluate.{refused[0]} is not run on a streamed model yet "
                          f"({', '.join(most)} and {last} are); "
                          f"asked: {', '.join(refused)}")
    return asked


def check_layer_major(plan: EvalPlan) -> None:
    """Raise, before any work, when ``plan`` asks for a measure that does not run on a layer-major model.

    Raises:
        ConfigError: Naming the measures.

    """
    planned(plan, layer_major=True)
