"""Evaluate models that are not resident, layer-major: each decoder layer is read once for all windows.

Every evaluation window is embedded once; then each decoder layer is made resident (read from its
checkpoint's shards), run over every window and released, for the FP model and beside it the quantized
one, so both models' hidden states advance together and each layer of each model is read once. Last,
the final norm and the head run on each window's final hidden states: the model's own forward runs with
its decoder layers replaced by one that hands over the computed states, so the family's post-processing
is its own, and the head is applied in chunks of positions as in :mod:`ptqlab.eval.perplexity`.

The windows are batched as the resident path batches them (``batch_size`` windows per perplexity forward,
one window per divergence forward), so the numbers equal the resident path's (see the tests).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..memory import return_freed
from ..metrics import Metric, divergence_name, perplexity_name
from ..models.adapter import Adapter
from ..models.shards import Checkpoint, outer_modules, resident
from ..nn.capture import LayerCall, capture_inputs, layer_output
from ..threads import fit_threads
from . import divergence as dv
from .lm import SCORING_TEXT, Request, Score, score_logits, split_blockers
from .perplexity import _exp, batch_nll
from .plan import EvalPlan
from .reference import Reference
from .suite import Evaluation, WindowNLL, record_tasks
from .tasks import run_shots

log = logging.getLogger(__name__)

_NOT_STREAMED = ("long_context", "sample", "sensitivity", "adaptive", "dialogue")


def check_streamable(plan: EvalPlan) -> None:
    """Raise when the plan asks for an evaluation the layer-major path does not run.

    Raises:
        ConfigError: Naming the evaluations (perplexity, divergence and tasks are streamed).

    """
    ev = plan.config
    asked = [k for k in _NOT_STREAMED if getattr(ev, k) not in (None, [], False)]
    if ev.defaulted:  # the defaults' sample and sensitivity are left out, not an error
        log.info("runtime.stream: the default sample and sensitivity are not run on a streamed model")
        asked = [k for k in asked if k not in ("sample", "sensitivity")]
    if asked:
        raise ConfigError(f"runtime.stream: evaluate.{asked[0]} is not run on a streamed model yet (perplexity, "
                          f"divergence and tasks are); asked: {', '.join(asked)}")


@dataclass
class _Set:
    """Windows run together: their token batches, each layer's call arguments and each model's hidden states."""

    ids: torch.Tensor
    batch: int
    chunks: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[LayerCall]] = field(default_factory=list)
    hidden: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@contextmanager
def _handing_over(layers: nn.ModuleList, final: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """The decoder layers replaced: the first returns ``final``, the others pass their input on."""

    def wrap(h: torch.Tensor) -> Any:
        return (h,) if as_tuple else h

    def first(*_args: Any, **_kwargs: Any) -> Any:
        return wrap(final)

    def passing(*args: Any, **kwargs: Any) -> Any:
        return wrap(args[0] if args else kwargs["hidden_states"])

    for i, layer in enumerate(layers):
        layer.forward = first if i == 0 else passing
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class LayerMajor:
    """Runs window sets through one or more checkpoints of the same skeleton, layer by layer.

    Args:
        model: The skeleton (parameters on the meta device).
        adapter: Its family adapter.
        sources: The checkpoints by name (``{"fp": ..., "q": ...}``); the first gives the layer-0 inputs.
        device: Where the layers run.
        dtype: The compute dtype.

    """

    def __init__(self, model: nn.Module, adapter: Adapter, sources: dict[str, Checkpoint], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model, self.adapter, self.sources = model, adapter, sources
        self.device, self.dtype = device, dtype
        self.layers = adapter.layers(model)
        self.as_tuple = False

    def _resident(self, modules: list[nn.Module], source: str) -> Any:
        return resident(self.model, modules, self.sources[source], self.device, self.dtype)

    @torch.inference_mode()
    def run(self, sets: list[_Set], progress: bool) -> None:
        """Embed every set's windows, then run each layer of each checkpoint over all of them."""
        first = next(iter(self.sources))
        with self._resident(outer_modules(self.model, self.adapter), first):
            for s in sets:
                s.chunks = [c.to(self.device) for c in s.ids.split(s.batch)]
                captured = capture_inputs(self.model, self.layers, s.chunks)
                s.calls = captured.calls
                s.hidden = {name: list(captured.hidden) for name in self.sources}
        for li in tqdm(range(len(self.layers)), desc="layers", unit="layer", disable=not progress):
            fit_threads()
            return_freed()  # the last window's freed buffers: peaks do not pile up on them
            for name in self.sources:
                with self._resident([self.layers[li]], name):
                    for s in sets:
                        self._layer(li, s, name)

    def _layer(self, li: int, s: _Set, name: str) -> None:
        for c, call in enumerate(s.calls[li]):
            out = self.layers[li](s.hidden[name][c], *call.args, **call.kwargs)
            self.as_tuple = isinstance(out, tuple | list)
            s.hidden[name][c] = layer_output(out)

    def tail(self, source: str) -> Any:
        """``source``'s modules outside the layers resident for the block (the final norm and the head)."""
        return self._resident(outer_modules(self.model, self.adapter), source)

    def handing(self, final: torch.Tensor) -> Any:
        """A block in which a forward of the model takes ``final`` as its last decoder layer's output.

        The layers themselves do not run; use it within :meth:`tail`.
        """
        return _handing_over(self.layers, final, self.as_tuple)


@dataclass
class StreamedResult:
    """What the layer-major pass measured: the quantized model's evaluation and the FP reference."""

    evaluation: Evaluation
    reference: Reference


def evaluate_streamed(
    model: nn.Module,
    adapter: Adapter,
    plan: EvalPlan,
    fp: Checkpoint,
    q: Checkpoint | None = None,
    *,
    tokenizer: Any = None,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> StreamedResult:
    """Perplexity, divergence and tasks of the model in ``q`` against the FP model in ``fp``, both streamed.

    Args:
        model: The skeleton of the model (its parameters on the meta device).
        adapter: Its family adapter.
        plan: The evaluation (see :func:`check_streamable`).
        fp: The FP checkpoint.
        q: The quantized checkpoint (None: the FP model is evaluated as itself).
        tokenizer: The model's tokenizer (needed for tasks).
        device: Where layers run.
        dtype: The compute dtype.
        progress: Show a progress bar over the layers.

    Returns:
        The evaluation (metrics named as the resident path names them, window NLLs beside the FP ones) and
        the FP reference (window NLLs, top-k log-probabilities).

    """
    check_streamable(plan)
    t0 = time.perf_counter()
    sources = {"fp": fp} if q is None else {"fp": fp, "q": q}
    runner = LayerMajor(model, adapter, sources, device, dtype)
    sets = {f"ppl:{c}": _Set(ids, plan.config.batch_size) for c, ids in plan.windows.items()}
    div = plan.config.divergence_config()
    if div is not None and plan.divergence is not None:
        sets["div"] = _Set(plan.divergence, 1)
    runner.run(list(sets.values()), progress)
    nll = {(name, src): _nll_of(runner, s, src) for src in sources for name, s in sets.items() if name != "div"}
    ref = Reference(nll={c: nll[(f"ppl:{c}", "fp")] for c in plan.windows})
    result = Evaluation()
    last = "q" if q is not None else "fp"
    for corpus, ids in plan.windows.items():
        name = perplexity_name(corpus, ids.shape[1], ids.shape[0])
        own = nll[(f"ppl:{corpus}", last)]
        result.metrics.append(Metric(name, _exp(sum(own) / len(own))))
        result.windows[name] = WindowNLL(list(own), ref.nll[corpus])
    if "div" in sets and div is not None:
        d = _tail_divergence(runner, sets["div"], last, div.top_k, ref)
        n_win, seqlen = sets["div"].ids.shape
        for kind, value in (("kl", d.kl), ("top1", d.top1), ("top5", d.top5)):
            result.metrics.append(Metric(divergence_name(kind, div.corpus, seqlen, n_win), value))
    result.timings["eval.streamed_s"] = time.perf_counter() - t0
    if plan.config.tasks:
        t0 = time.perf_counter()
        scores = {name: run_shots(model, tokenizer, plan.config.tasks, plan.shots, **plan.task_settings,
                                  scorer=StreamedScorer(adapter, ckpt, device, dtype, progress))
                  for name, ckpt in sources.items()}
        ref.tasks = scores["fp"]
        record_tasks(result, plan, scores[last], scores["fp"])
        result.timings["lm_eval_s"] = time.perf_counter() - t0
        result.texts[SCORING_TEXT] = json.dumps({"path": "layer-major", "reasons": split_blockers(model)})
    return StreamedResult(result, ref)


def _nll_of(runner: LayerMajor, s: _Set, source: str, chunk: int = 256) -> list[float]:
    """Window NLLs of a set from ``source``'s final hidden states, through its own norm and head."""
    out: list[float] = []
    with torch.inference_mode(), runner.tail(source):
        for ids, final in zip(s.chunks, s.hidden[source], strict=True):
            with runner.handing(final):
                out.extend(batch_nll(runner.model, ids, chunk))
    return out


def _tail_divergence(runner: LayerMajor, s: _Set, last: str, k: int, ref: Reference) -> dv.Divergence:
    """KL and top-k agreement of ``last`` against FP on the divergence windows (one per chunk)."""
    tops: list[tuple[torch.Tensor, torch.Tensor]] = []
    with runner.tail("fp"):
        for ids, final in zip(s.chunks, s.hidden["fp"], strict=True):
            with runner.handing(final):
                tops.append(dv.window_top_k(dv.logprob_chunks(runner.model, ids), k))
    ref.topk = dv.TopKReference(s.ids, torch.stack([t[1] for t in tops]), torch.stack([t[0] for t in tops]))
    acc = dv.DivergenceSum()
    with runner.tail(last):
        for (p_top, idx), ids, final in zip(tops, s.chunks, s.hidden[last], strict=True):
            with runner.handing(final):
                acc.add_window(dv.logprob_chunks(runner.model, ids), p_top, idx)
    return acc.result()


class StreamedScorer:
    """Scores lm-eval loglikelihood requests on a streamed model, layer-major (a :class:`~.lm.Scorer`).

    All requests of a call (lm-eval gathers every task's requests into one call) are embedded, each
    layer is read once and run over all of them, then the head scores each continuation. Requests run
    whole (context + continuation, no padding: only requests of one length share a batch), so each is
    scored as lm-eval's HF model scores it alone.

    Args:
        adapter: The skeleton's family adapter.
        source: The checkpoint of the model to score.
        device: Where layers run.
        dtype: The compute dtype.
        progress: Show a progress bar over the layers.

    """

    def __init__(self, adapter: Adapter, source: Checkpoint, device: torch.device, dtype: torch.dtype,
                 progress: bool = False) -> None:
        self.adapter, self.source, self.device, self.dtype, self.progress = adapter, source, device, dtype, progress

    def __call__(self, model: Any, requests: Sequence[Request], *, batch_size: int) -> list[Score]:
        """Score each request (context ids, continuation ids): the continuation's log-probability, greedy."""
        if split_blockers(model):  # runtime roundings: each request alone, as lm-eval scores it
            batch_size = 1
        by_length: dict[int, list[int]] = {}
        for i, (ctx, cont) in enumerate(requests):
            by_length.setdefault(len(ctx) + len(cont) - 1, []).append(i)
        groups = list(by_length.values())
        sets = [_Set(torch.tensor([[*requests[i][0], *requests[i][1]][:-1] for i in group]), max(1, batch_size))
                for group in groups]
        runner = LayerMajor(model, self.adapter, {"m": self.source}, self.device, self.dtype)
        runner.run(sets, self.progress)
        out: list[Score | None] = [None] * len(requests)
        with torch.inference_mode(), runner.tail("m"):
            for group, s in zip(groups, sets, strict=True):
                rows = iter(group)
                for ids, final in zip(s.chunks, s.hidden["m"], strict=True):
                    with runner.handing(final):
                        logits = runner.model(input_ids=ids, use_cache=False).logits.float()
                    for row in range(ids.shape[0]):
                        i = next(rows)
                        ctx, cont = requests[i]
                        out[i] = score_logits(logits[row, len(ctx) - 1 : len(ctx) - 1 + len(cont)], cont)
        return [s for s in out if s is not None]
