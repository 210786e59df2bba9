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

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..memory import return_freed
from ..models.adapter import Adapter
from ..models.shards import Checkpoint, outer_modules, resident
from ..nn.capture import LayerCall, capture_inputs, handing_over, run_layer
from ..threads import fit_threads
from . import divergence as dv
from .access import TaskRun, WindowRun
from .lm import Request, Score, score_logits, split_blockers
from .perplexity import batch_nll, perplexity_of
from .plan import EvalPlan
from .reference import Reference
from .tasks import run_shots

log = logging.getLogger(__name__)

@dataclass
class _Set:
    """Windows run together: their token batches, each layer's call arguments and each model's hidden states."""

    ids: torch.Tensor
    batch: int
    chunks: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[LayerCall]] = field(default_factory=list)
    hidden: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class LayerMajor:
    """Runs window sets through one or more checkpoints of the same skeleton, layer by layer.

    Args:
        model: The skeleton (parameters on the meta device).
        adapter: Its family adapter.
        sources: The checkpoints by name (``{"fp": ..., "q": ...}``); the first gives the layer-0 inputs.
        own_inputs: Each checkpoint gives its own layer-0 inputs (its modules outside the layers differ from
            the first's: a quantized embedding).
        device: Where the layers run.
        dtype: The compute dtype.

    """

    def __init__(self, model: nn.Module, adapter: Adapter, sources: dict[str, Checkpoint], device: torch.device,
                 dtype: torch.dtype, own_inputs: bool = False) -> None:
        self.model, self.adapter, self.sources = model, adapter, sources
        self.device, self.dtype, self.own_inputs = device, dtype, own_inputs
        self.layers = adapter.layers(model)
        self.as_tuple = False

    def _resident(self, modules: list[nn.Module], source: str) -> Any:
        return resident(self.model, modules, self.sources[source], self.device, self.dtype)

    @torch.inference_mode()
    def run(self, sets: list[_Set], progress: bool) -> None:
        """Embed every set's windows, then run each layer of each checkpoint over all of them."""
        for s in sets:
            s.chunks = [c.to(self.device) for c in s.ids.split(s.batch)]
        for embedder in list(self.sources) if self.own_inputs else [next(iter(self.sources))]:
            with self._resident(outer_modules(self.model, self.adapter), embedder):
                for s in sets:
                    captured = capture_inputs(self.model, self.layers, s.chunks)
                    s.calls = captured.calls  # positions and masks: the same from every checkpoint
                    for name in self.sources if not self.own_inputs else [embedder]:
                        s.hidden[name] = list(captured.hidden)
        for li in tqdm(range(len(self.layers)), desc="layers", unit="layer", disable=not progress):
            fit_threads()
            return_freed()  # the last window's freed buffers: peaks do not pile up on them
            for name in self.sources:
                with self._resident([self.layers[li]], name):
                    for s in sets:
                        self._layer(li, s, name)

    def _layer(self, li: int, s: _Set, name: str) -> None:
        for c, call in enumerate(s.calls[li]):
            s.hidden[name][c], self.as_tuple = run_layer(self.layers[li], s.hidden[name][c], call)

    def tail(self, source: str) -> Any:
        """``source``'s modules outside the layers resident for the block (the final norm and the head)."""
        return self._resident(outer_modules(self.model, self.adapter), source)

    def handing(self, final: torch.Tensor) -> Any:
        """A block in which a forward of the model takes ``final`` as its last decoder layer's output.

        The layers themselves do not run; use it within :meth:`tail`.
        """
        return handing_over(self.layers, final, self.as_tuple)


class LayerMajorModel:
    """A model on disk, evaluated layer-major against its FP checkpoint (a :class:`~.access.ModelAccess`).

    The perplexity and divergence windows run in one pass (each layer of each checkpoint read once for all
    of them), the FP checkpoint beside the quantized one, and the pass fills the FP side of the reference.

    Args:
        model: The skeleton of the model (its parameters on the meta device).
        adapter: Its family adapter.
        fp: The FP checkpoint.
        q: The quantized checkpoint (None: the FP model is evaluated as itself).
        device: Where layers run.
        dtype: The compute dtype.
        progress: Show a progress bar over the layers.
        own_embedding: The quantized checkpoint's embedding differs from the FP one (``scheme.embedding``): its
            windows are embedded by it.

    """

    layer_major = True

    def __init__(self, model: nn.Module, adapter: Adapter, fp: Checkpoint, q: Checkpoint | None, *,
                 device: torch.device, dtype: torch.dtype, progress: bool = True, own_embedding: bool = False) -> None:
        self.skeleton, self.adapter, self.own_embedding = model, adapter, own_embedding and q is not None
        self.sources = {"fp": fp} if q is None else {"fp": fp, "q": q}
        self.last = "q" if q is not None else "fp"
        self.device, self.dtype, self.progress = device, dtype, progress
        self.timings: dict[str, float] = {}
        self._nll: dict[str, list[float]] | None = None
        self._div: dv.Divergence | None = None

    @property
    def model(self) -> nn.Module:
        """The skeleton (parameters on the meta device)."""
        return self.skeleton

    def check(self, plan: EvalPlan, ref: Reference) -> None:
        """Nothing to check: the pass measures the FP side itself."""

    def window_nll(self, plan: EvalPlan, ref: Reference, progress: bool) -> dict[str, WindowRun]:
        """Each corpus's windows, from the one layer-major pass (which fills ``ref.nll``)."""
        nll = self._pass(plan, ref)
        return {c: WindowRun(perplexity_of(sum(nll[c]) / len(nll[c])), nll[c]) for c in plan.windows}

    def divergence(self, plan: EvalPlan, ref: Reference) -> dv.Divergence:
        """From the one layer-major pass (which fills ``ref.topk``)."""
        self._pass(plan, ref)
        assert self._div is not None  # the pass ran the divergence windows the plan asks for
        return self._div

    def tasks(self, tokenizer: Any, plan: EvalPlan, ref: Reference) -> TaskRun:
        """Each checkpoint's answers, every request scored layer-major (:class:`StreamedScorer`)."""
        scores = {name: run_shots(self.skeleton, tokenizer, plan.config.tasks, plan.shots, **plan.task_settings,
                                  scorer=StreamedScorer(self.adapter, ckpt, self.device, self.dtype, self.progress))
                  for name, ckpt in self.sources.items()}
        ref.tasks = scores["fp"]
        return TaskRun(scores[self.last], scores["fp"],
                       {"path": "layer-major", "reasons": split_blockers(self.skeleton)})

    def _pass(self, plan: EvalPlan, ref: Reference) -> dict[str, list[float]]:
        """Run the perplexity and divergence windows of ``plan`` through every checkpoint (once)."""
        if self._nll is not None:
            return self._nll
        t0 = time.perf_counter()
        runner = LayerMajor(self.skeleton, self.adapter, self.sources, self.device, self.dtype, self.own_embedding)
        sets = {c: _Set(ids, plan.config.batch_size) for c, ids in plan.windows.items()}
        div = plan.config.divergence_config()
        div_set = _Set(plan.divergence, 1) if div is not None and plan.divergence is not None else None
        runner.run([*sets.values(), *([div_set] if div_set is not None else [])], self.progress)
        ref.nll = {c: _nll_of(runner, s, "fp") for c, s in sets.items()}
        self._nll = ref.nll if self.last == "fp" else {c: _nll_of(runner, s, self.last) for c, s in sets.items()}
        if div_set is not None and div is not None:
            self._div = _tail_divergence(runner, div_set, self.last, div.top_k, ref)
        self.timings["eval.streamed_s"] = time.perf_counter() - t0
        return self._nll


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
    tops: list[dv.WindowTop] = []
    with runner.tail("fp"):
        for ids, final in zip(s.chunks, s.hidden["fp"], strict=True):
            with runner.handing(final):
                tops.append(dv.window_reference(dv.logprob_chunks(runner.model, ids), ids[0], k))
    ref.topk = dv.TopKReference.stack(s.ids, tops)
    acc = dv.DivergenceSum()
    with runner.tail(last):
        for top, ids, final in zip(tops, s.chunks, s.hidden[last], strict=True):
            with runner.handing(final):
                acc.add_window(dv.logprob_chunks(runner.model, ids), top, ids[0])
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
