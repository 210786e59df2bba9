"""A worker runs configurations one after another and pays once for what they share.

What a sweep's runs share is kept by content: the FP model (loaded once per worker; each run quantizes a
copy), the FP reference of an ``evaluate`` section (in memory here, and its window NLLs, divergence
top-k and task answers on disk), the layer-0 inputs of a calibration set, and the quantized model itself
by the content that decides its weights (on disk), so a run that differs from a finished one only in
what it evaluates, or in its activation and KV quantization, is not quantized again. Tokenized corpora
are kept per tokenizer by :mod:`ptqlab.data`.

A worker computes and returns records; it never writes the store (the driver of a sweep, or
:func:`ptqlab.study.runner.execute`, does).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compile import bind, compile_config
from ..eval import build_reference, evaluate
from ..eval.reference import Reference
from ..metrics import Metric
from ..models.loading import LoadedModel, load_model, model_fingerprint, resolve_device
from ..nn.capture import InputCache
from ..pipeline.driver import LayerRecord, QuantizeReport
from ..pipeline.outliers import outlier_masks
from ..pipeline.quantize import place, quantize, restore
from ..schema import RunConfig
from ..threads import thread_ceiling
from .cache import QModelCache
from .identity import git_revision, normalized, package_versions, qmodel_key, run_id, weights_key
from .store import RunRecord
from .streamed import StreamChoice, choose_stream, run_streamed

log = logging.getLogger(__name__)


@dataclass
class _FPModel:
    """A loaded FP model kept for the runs of a worker, with what its runs share."""

    loaded: LoadedModel
    state: dict[str, torch.Tensor]
    load_s: float
    inputs: InputCache = field(default_factory=InputCache)
    runs: int = 0


@dataclass
class WorkerStats:
    """What a worker paid for and what it reused (for the benchmarks and the logs)."""

    loads: int = 0
    references: int = 0
    reference_hits: int = 0
    quantized: int = 0
    qmodel_hits: int = 0


class Worker:
    """Runs configurations, keeping the FP model, references and quantized models they share.

    Args:
        progress: Show progress bars.
        share: Keep the FP model for later runs (each run quantizes a copy). Without it the loaded model is
            quantized itself and dropped: one run, the least memory.
        qmodels: The cache of quantized models (default: ``$PTQLAB_CACHE/qmodels``; None with ``share``
            off keeps none).
        reuse: Restore quantized weights that an earlier run with the same weights key kept (the cache
            above, or a streamed run's offload directory); False quantizes again and replaces them.

    """

    def __init__(self, *, progress: bool = True, share: bool = True, qmodels: QModelCache | None = None,
                 reuse: bool = True) -> None:
        self.progress = progress
        self.share = share
        self.reuse = reuse
        self.qmodels = qmodels if qmodels is not None else QModelCache()
        self.stats = WorkerStats()
        self._models: OrderedDict[tuple[str, str, bool], _FPModel] = OrderedDict()
        self._references: OrderedDict[str, Reference] = OrderedDict()
        self._streams: dict[str, StreamChoice] = {}
        self._fingerprints: dict[tuple[str, bool], str] = {}

    def fp_model(self, cfg: RunConfig) -> _FPModel:
        """The FP model of ``cfg``, loaded on the CPU once (the last one is kept)."""
        key = (cfg.model, cfg.dtype, cfg.trust_remote_code)
        found = self._models.get(key)
        if found is None:
            self._models.clear()
            t0 = time.perf_counter()
            loaded = load_model(cfg.model, cfg.dtype, "cpu", cfg.trust_remote_code)
            found = _FPModel(loaded, loaded.model.state_dict() if self.share else {}, time.perf_counter() - t0)
            self.stats.loads += 1
            self._models[key] = found
        return found

    def run_id(self, cfg: RunConfig) -> str:
        """The run id of ``cfg`` (loads its model when not loaded and not streamed)."""
        return run_id(cfg, self._fingerprint(cfg))

    def _fingerprint(self, cfg: RunConfig) -> str:
        if self._stream(cfg).stream:
            key = (cfg.model, cfg.trust_remote_code)
            if key not in self._fingerprints:
                self._fingerprints[key] = model_fingerprint(cfg.model)
            return self._fingerprints[key]
        return self.fp_model(cfg).loaded.info.fingerprint

    def _stream(self, cfg: RunConfig) -> StreamChoice:
        """Whether ``cfg`` streams (decided once per model, dtype and runtime section)."""
        key = json.dumps([cfg.model, cfg.dtype, cfg.trust_remote_code, cfg.runtime.model_dump(mode="json")])
        if key not in self._streams:
            self._streams[key] = choose_stream(cfg)
        return self._streams[key]

    def run(self, cfg: RunConfig, *, peers: Sequence[tuple[float, float]] = ()) -> RunRecord:
        """Quantize and evaluate ``cfg``; a failure while quantizing or evaluating is a ``failed`` record.

        Args:
            cfg: A validated configuration.
            peers: Degradation intervals of other runs, for ``evaluate.adaptive.target: rank``.

        Raises:
            ConfigError / DataError: The configuration does not fit the model (nothing was computed).

        """
        choice = self._stream(cfg)
        if choice.stream:
            self._models.clear()  # a model kept resident would take the memory the stream saves
            fingerprint = self._fingerprint(cfg)
            return run_streamed(cfg, choice, fingerprint, _new_record(cfg, fingerprint, None, cfg.device),
                                progress=self.progress, reuse=self.reuse)
        t_start = time.perf_counter()
        compiled = compile_config(cfg)
        device = resolve_device(cfg.device)
        fp = self.fp_model(cfg)
        info = fp.loaded.info
        t0 = time.perf_counter()
        if self.share:
            model = copy.deepcopy(fp.loaded.model)
        else:  # the loaded model itself is quantized: the next run loads again
            model = fp.loaded.model
            self._models.clear()
        timings = {"load_s": fp.load_s if fp.runs == 0 else 0.0, "copy_s": time.perf_counter() - t0}
        fp.runs += 1
        t0 = time.perf_counter()
        plan = bind(compiled, model, fp.loaded.tokenizer)
        plan.quantization.inputs = fp.inputs if self.share else None
        timings["data_s"] = time.perf_counter() - t0
        place(model, device)
        reference = self._reference(cfg, fp, model, plan.evaluation, device)
        timings.update(reference.timings)
        record = _new_record(cfg, info.fingerprint, info.architecture, device)
        try:
            report = self._quantized(cfg, fp, model, plan, device, timings)
            result = evaluate(model, fp.loaded.tokenizer, plan.evaluation, reference, progress=self.progress,
                              peers=peers)
            timings.update(report.timings)
            timings.update(result.timings)
            record.metrics = result.metrics + report.metrics
            record.texts.update(result.texts)
            record.sensitivity = [vars(s) for s in result.sensitivity]
            record.windows = {name: {"nll": w.nll, "fp_nll": w.fp_nll} for name, w in result.windows.items()}
            record.layers = [vars(r) for r in report.records]
            record.adaptive = None if result.adaptive is None else dataclasses.asdict(result.adaptive)
            record.status = "done"
        except Exception as exc:  # noqa: BLE001 - any failure while running is stored as the reason
            log.exception("run %s failed", record.id)
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        timings["total_s"] = time.perf_counter() - t_start
        record.timings = timings
        return record

    def _reference(self, cfg: RunConfig, fp: _FPModel, model: nn.Module, plan: Any, device: torch.device) -> Reference:
        """The FP reference of ``cfg.evaluate`` on ``device`` (measured on ``model`` before it is quantized)."""
        key = json.dumps([fp.loaded.info.fingerprint, cfg.dtype, str(device),
                          cfg.evaluate.model_dump(mode="json")], sort_keys=True)
        found = self._references.get(key)
        if found is not None:
            self.stats.reference_hits += 1
            self._references.move_to_end(key)
            return dataclasses.replace(found, timings={}, computed=[])
        ref = build_reference(model, fp.loaded.tokenizer, plan, fingerprint=fp.loaded.info.fingerprint,
                              progress=self.progress)
        self.stats.references += 1
        if self.share:
            self._references[key] = ref
            while len(self._references) > 2:
                self._references.popitem(last=False)
        return ref

    def _quantized(self, cfg: RunConfig, fp: _FPModel, model: nn.Module, plan: Any, device: torch.device,
                   timings: dict[str, float]) -> QuantizeReport:
        """Quantize ``model``, or restore the quantized weights a run with the same weights key kept."""
        key = weights_key(cfg, fp.loaded.info.fingerprint)
        kept = self.qmodels.load(key, device.type) if self.share and self.reuse else None
        if kept is not None:
            t0 = time.perf_counter()
            weights, meta = kept
            report = QuantizeReport(records=[LayerRecord(**r) for r in meta["records"]], distill=meta["distill"],
                                    metrics=[Metric(**m) for m in meta["metrics"]],
                                    outliers=outlier_masks(meta.get("outliers", {}), model))
            restore(model, plan.quantization, {k: v.to(device) for k, v in weights.items()}, report,
                    progress=self.progress)  # measures this run's sizes (its activation and KV bits) again
            report.timings = {"qmodel_restore_s": time.perf_counter() - t0}
            timings["qmodel_reused"] = 1.0
            self.stats.qmodel_hits += 1
            return report
        report = quantize(model, plan.quantization, progress=self.progress)
        self.stats.quantized += 1
        if self.share and plan.quantization.changes_weights:
            sizes = set(plan.quantization.size_metrics(model))
            meta = {"records": [vars(r) for r in report.records], "distill": report.distill,
                    "metrics": [dataclasses.asdict(m) for m in report.metrics if m.name not in sizes],
                    "outliers": {n: m.nonzero().flatten().tolist() for n, m in report.outliers.items()}}
            self.qmodels.save(key, device.type, fp.state, model, meta, bool(report.hooks))
        return report


def _new_record(cfg: RunConfig, fingerprint: str, architecture: str | None, device: torch.device | str) -> RunRecord:
    """A ``failed`` record of ``cfg`` with its identity and provenance (the run fills in the rest)."""
    return RunRecord(
        id=run_id(cfg, fingerprint),
        qmodel_key=qmodel_key(cfg, fingerprint),
        model=cfg.model,
        model_fingerprint=fingerprint,
        architecture=architecture,
        config=normalized(cfg),
        status="failed",
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        seed=cfg.calibration.seed,
        code_version=package_versions().get("ptqlab"),
        git_rev=git_revision(),
        versions=package_versions(),
        device=str(device),
        threads=thread_ceiling(),
    )


def failed_record(cfg: RunConfig, fingerprint: str, error: BaseException | str) -> RunRecord:
    """The ``failed`` record of a run that could not start (its model or data did not fit)."""
    record = _new_record(cfg, fingerprint, None, cfg.device)
    record.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return record
