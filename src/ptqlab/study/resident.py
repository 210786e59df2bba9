"""A run whose model is resident: a copy of the worker's FP model, quantized (or restored) and evaluated in memory.

:class:`ResidentRun` is one residency of :class:`ptqlab.study.worker.PreparedRun` (the other is
:class:`ptqlab.study.streamed.StreamedRun`); the worker prepares it, and :meth:`Worker.run
<ptqlab.study.worker.Worker.run>` quantizes and evaluates it as it does every run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..compile import RunPlan
from ..eval import evaluate
from ..eval.reference import Reference
from ..eval.result import Evaluation
from ..formats.gguf import gguf_runtime_files
from ..methods.recipe import foreign_source
from ..pipeline.driver import QuantizeReport
from ..pipeline.plan import QuantizationPlan, RunOptions
from ..pipeline.quantize import quantize, restore
from ..schema import KVCacheScheme, RunConfig
from ..store import weights_key
from ..store.qmodels import QuantizedModels


@dataclass
class ResidentRun:
    """A resident model bound to its plan, with its FP reference, ready to quantize and evaluate.

    Attributes:
        model: The model to quantize (a copy of the FP model when the worker shares it).
        tokenizer: Its tokenizer.
        plan: The bound plan.
        reference: The FP side of the evaluation, measured before quantizing.
        fingerprint: The FP model's fingerprint.
        architecture: The model's class name.
        device: Where it runs.
        timings: Seconds of the preparation (loading, copying, data, reference); the run adds its own.
        weights_key: The key of its quantized weights in ``qmodels``.
        qmodels: The store of quantized models.
        fp_state: The FP model's tensors (a kept quantized model holds only the tensors that differ from them);
            None keeps every tensor.
        reuse: Restore kept quantized weights instead of quantizing again (they are replaced either way).
        progress: Show progress bars.
        on_quantized: Called with whether the weights were restored (True) or quantized (False).
        source: Where the FP model was loaded from (a GGUF source's pre-tokenizer is kept in a GGUF written).
        kv_cache: The run's ``scheme.kv_cache`` (a runtime that holds it is told, as llama.cpp's cache types).

    """

    model: nn.Module
    tokenizer: Any
    plan: RunPlan
    reference: Reference
    fingerprint: str
    architecture: str | None
    device: torch.device
    timings: dict[str, float]
    weights_key: str
    qmodels: QuantizedModels
    fp_state: dict[str, torch.Tensor] | None
    reuse: bool = True
    progress: bool = True
    on_quantized: Callable[[bool], None] | None = None
    source: str | None = None
    kv_cache: KVCacheScheme | None = None

    def quantize(self) -> QuantizeReport:
        """Quantize the model, or restore the quantized weights a run with the same weights key kept."""
        report, reused = quantize_or_restore(self.model, self.plan.quantization, self.qmodels, self.weights_key,
                                             self.device.type, self.fp_state, reuse=self.reuse,
                                             progress=self.progress, options=self.plan.options)
        if reused:
            self.timings["qmodel_reused"] = 1.0
        if self.on_quantized is not None:
            self.on_quantized(reused)
        return report

    def evaluate(self, report: QuantizeReport, peers: Sequence[tuple[float, float]]) -> Evaluation:
        """Evaluate the quantized model in memory against its FP reference (a runtime reads it from its grids)."""
        files = gguf_runtime_files(self.model, self.tokenizer, report.grids, self.source, self.kv_cache)
        return evaluate(self.model, self.tokenizer, self.plan.evaluation, self.reference, progress=self.progress,
                        peers=peers, files=files)

    def release(self) -> None:
        """Drop the quantized model (and the GPU's cached blocks)."""
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def quantize_or_restore(model: nn.Module, plan: QuantizationPlan, qmodels: QuantizedModels, key: str, device: str,
                        fp_state: dict[str, torch.Tensor] | None = None, *, reuse: bool = True,
                        progress: bool = True, options: RunOptions = RunOptions()) -> tuple[QuantizeReport, bool]:
    """Make ``model`` (the FP model ``plan`` was bound to) its quantized model; the report and whether it was kept.

    The quantized weights kept in ``qmodels`` by weights ``key`` and ``device`` type are restored (with
    ``reuse``); otherwise ``plan`` is run and the quantized model kept there with its grids (what export
    reads), replacing an entry that was not reused.

    Args:
        model: The FP model.
        plan: Its bound quantization plan.
        qmodels: The store of quantized models.
        key: The run's weights key.
        device: The device type the entry is kept under (where the run quantizes).
        fp_state: The FP model's tensors: only what differs from them is kept (None: every tensor).
        reuse: Restore a kept entry rather than quantizing again.
        progress: Show progress bars.
        options: How the quantization runs (its grids are kept whatever ``options.keep_grids`` says).

    """
    specs = plan.grid_specs()
    kept = qmodels.load(key, device, model, specs) if reuse and plan.changes_weights else None
    if kept is not None:
        t0 = time.perf_counter()
        kept.restore_into(model)
        report = restore(model, plan, {}, kept.report, progress=progress)  # this run's sizes measured again
        report.timings = {"qmodel_restore_s": time.perf_counter() - t0}
        return report, True
    if not plan.changes_weights:
        return quantize(model, plan, progress=progress, options=options), False
    report = quantize(model, plan, progress=progress, options=dataclasses.replace(options, keep_grids=True))
    qmodels.save(key, device, model, report, set(plan.size_metrics(model)), fp_state)
    return report, False


def quantized_weights_key(cfg: RunConfig, fingerprint: str) -> str:
    """The key ``cfg``'s quantized weights are kept under.

    :func:`ptqlab.store.weights_key`, with the source of any method of its recipe registered from outside
    ptqlab (:func:`ptqlab.methods.recipe.foreign_source`).
    """
    return weights_key(cfg, fingerprint, foreign_source([next(iter(step)) for step in cfg.recipe]))
