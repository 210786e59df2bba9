"""The FP side of an evaluation, built once per (model fingerprint, dtype, device, evaluate section).

Everything an evaluation compares a quantized model against is measured on the FP model before it is
quantized, on the device the run uses: each perplexity window's NLL, the top-k log-probabilities for the
divergence, the answers to the lm-eval tasks, and the output of every decoder linear and layer for the
sensitivity. With the model's fingerprint the first three are kept on disk (``$PTQLAB_CACHE``), so a
sweep over one model pays for them once; the per-module outputs are large and cheap to recompute (one
forward over a few tokens), so they stay in memory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.registry import get_adapter
from ..paths import cache_root
from . import divergence
from .cache import entry, load_or_compute
from .perplexity import perplexity
from .plan import EvalPlan
from .sensitivity import Outputs, record_outputs
from .tasks import FPTaskCache, ShotResults


@dataclass
class Reference:
    """The FP model's side of an evaluation; a part is None (or missing) when it was not asked for.

    Attributes:
        nll: Each perplexity window's mean token NLL per corpus, in window order.
        topk: The top-k log-probabilities on the divergence windows.
        tasks: The lm-eval answers and metrics at each few-shot count (for the paired measures).
        outputs: The output of every decoder linear and layer on the sensitivity windows.
        timings: Seconds each part took (read from disk or computed).
        computed: The parts computed now (the rest came from the disk cache).
        same_model: The evaluated model is the FP model itself: its own window NLLs and task answers are
            the FP side (so they are not measured twice).

    """

    nll: dict[str, list[float]] = field(default_factory=dict)
    topk: divergence.TopKReference | None = None
    tasks: ShotResults | None = None
    outputs: Outputs | None = None
    timings: dict[str, float] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    same_model: bool = False


def self_reference(model: nn.Module, tokenizer: Any, plan: EvalPlan, *, progress: bool = True) -> Reference:
    """The reference of a model evaluated as its own FP model: only what its evaluation cannot give itself."""
    lean = replace(plan, windows={}, config=plan.config.model_copy(update={"tasks": []}))
    ref = build_reference(model, tokenizer, lean, progress=progress)
    ref.same_model = True
    return ref


def _dtype(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def build_reference(
    model: nn.Module, tokenizer: Any, plan: EvalPlan, *, fingerprint: str | None = None, progress: bool = True
) -> Reference:
    """Measure the FP side of ``plan`` on ``model`` (which must still be the FP model).

    Args:
        model: The FP model, on the device the run uses.
        tokenizer: Its tokenizer.
        plan: The evaluation.
        fingerprint: The model's fingerprint; with it the disk cache is used, without it all is computed.
        progress: Show progress bars.

    Returns:
        The reference.

    """
    ref = Reference()
    dtype = _dtype(model)
    t0 = time.perf_counter()
    for corpus, ids in plan.windows.items():
        ref.nll[corpus] = _window_nll(model, ids, plan.config.batch_size, fingerprint, dtype, ref, progress, corpus)
    if plan.windows:
        ref.timings["reference.ppl_s"] = time.perf_counter() - t0
    div = plan.config.divergence_config()
    if div is not None and plan.divergence is not None:
        t0 = time.perf_counter()
        cache = divergence.ReferenceCache()
        ref.topk = cache.get(model, fingerprint, dtype, plan.divergence, div.top_k)
        if cache.computed:
            ref.computed.append("divergence")
        ref.timings["divergence.reference_s"] = time.perf_counter() - t0
    if plan.config.tasks:
        t0 = time.perf_counter()
        tasks_cache = FPTaskCache()
        ref.tasks = tasks_cache.get_shots(model, tokenizer, fingerprint, dtype, plan.config.tasks, plan.shots,
                                          **plan.task_settings)
        if tasks_cache.computed:
            ref.computed.append("tasks")
        ref.timings["lm_eval.fp_s"] = time.perf_counter() - t0
    if plan.sensitivity is not None:
        ref.outputs = record_outputs(model, get_adapter(model), plan.sensitivity)
    return ref


def _nll_entry(where: nn.Module | str, fingerprint: str | None, dtype: str, ids: Any) -> Path | None:
    """The disk-cache file of the FP window NLLs of ``ids`` (``where``: the model or its device type)."""
    return entry(cache_root() / "perplexity", ".json", where, fingerprint, dtype=dtype, ids=ids)


def reference_cached(windows: dict[str, torch.Tensor], fingerprint: str, device_type: str, dtype: str) -> bool:
    """Whether the FP window NLLs of every corpus of ``windows`` are in the disk cache."""
    return all(
        (path := _nll_entry(device_type, fingerprint, dtype, ids)) is not None and path.is_file()
        for ids in windows.values()
    )


def _window_nll(
    model: nn.Module, ids: Any, batch_size: int, fingerprint: str | None, dtype: str, ref: Reference, progress: bool,
    corpus: str,
) -> list[float]:
    """The FP per-window NLLs of one corpus (from the disk cache when the model has a fingerprint)."""

    def compute() -> list[float]:
        return perplexity(model, ids, batch_size=batch_size, progress=progress, desc=f"FP ppl {corpus}").nll

    def save(nll: list[float], p: Path) -> None:
        p.write_text(json.dumps(nll))

    path = _nll_entry(model, fingerprint, dtype, ids)
    nll, computed = load_or_compute(path, lambda p: list(json.loads(p.read_text())), compute, save)
    if computed:
        ref.computed.append(f"ppl.{corpus}")
    return nll
