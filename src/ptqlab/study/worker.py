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
import gc
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..compile import bind, compile_config
from ..eval import build_reference
from ..eval.reference import Reference
from ..eval.result import Evaluation
from ..memory import reset_peak, resident_bytes, return_freed
from ..models.loading import LoadedModel, load_model, model_fingerprint, resolve_device
from ..models.source_bits import model_source_metrics
from ..nn.capture import InputCache
from ..pipeline.driver import QuantizeReport
from ..pipeline.quantize import place
from ..schema import RunConfig
from ..store import RunRecord, git_revision, machine_info, normalized, package_versions, qmodel_key, run_id
from ..store.qmodels import QuantizedModels
from ..threads import thread_ceiling
from .resident import ResidentRun, quantized_weights_key
from .streamed import StreamChoice, choose_stream, prepare_streamed

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
        qmodels: The store of quantized models (default: ``$PTQLAB_CACHE/qmodels``): every run keeps its
            quantized model there by weights key (a streamed run in its offload directory), which is what
            ``ptqlab export`` reads.
        reuse: Restore quantized weights that an earlier run with the same weights key kept; False quantizes
            again and replaces them.

    """

    def __init__(self, *, progress: bool = True, share: bool = True, qmodels: QuantizedModels | None = None,
                 reuse: bool = True) -> None:
        self.progress = progress
        self.share = share
        self.reuse = reuse
        self.qmodels = qmodels if qmodels is not None else QuantizedModels()
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
        """The run id of ``cfg``, from its model's weight files (nothing is loaded, streaming is not decided)."""
        return run_id(cfg, self._fingerprint(cfg))

    def _fingerprint(self, cfg: RunConfig) -> str:
        """The model's fingerprint: the loaded model's, or its weight files' (hashed once per worker)."""
        key = (cfg.model, cfg.trust_remote_code)
        if key not in self._fingerprints:
            loaded = next((m.loaded for (model, _, trust), m in self._models.items()
                           if (model, trust) == key), None)
            self._fingerprints[key] = loaded.info.fingerprint if loaded is not None else model_fingerprint(cfg.model)
        return self._fingerprints[key]

    def _stream(self, cfg: RunConfig) -> StreamChoice:
        """Whether ``cfg`` streams (decided once per model, dtype and runtime section)."""
        key = json.dumps([cfg.model, cfg.dtype, cfg.trust_remote_code, cfg.runtime.model_dump(mode="json")])
        if key not in self._streams:
            self._streams[key] = choose_stream(cfg)
        return self._streams[key]

    def run(self, cfg: RunConfig, *, peers: Sequence[tuple[float, float]] = ()) -> RunRecord:
        """Quantize and evaluate ``cfg``; a failure while quantizing or evaluating is a ``failed`` record.

        The run is prepared for its residency (:meth:`prepare`: a resident copy of the FP model, or a
        streamed skeleton), then quantized and evaluated the same way whatever the residency.

        Args:
            cfg: A validated configuration.
            peers: Degradation intervals of other runs, for ``evaluate.adaptive.target: rank``.

        Raises:
            ConfigError / DataError: The configuration does not fit the model (nothing was computed).

        """
        try:
            return self._run(cfg, peers)
        finally:  # the run's locals are gone here: what they tied into cycles is freed now
            _collect_run_garbage()

    def _run(self, cfg: RunConfig, peers: Sequence[tuple[float, float]]) -> RunRecord:
        t_start = time.perf_counter()
        peak_known = reset_peak()
        prepared = self.prepare(cfg)
        record = _new_record(cfg, prepared.fingerprint, prepared.architecture, prepared.device)
        timings = prepared.timings
        try:
            report = prepared.quantize()
            result = prepared.evaluate(report, peers)
            timings.update(report.timings)
            timings.update(result.timings)
            _fill(record, report, result)
        except Exception as exc:  # noqa: BLE001 - any failure while running is stored as the reason
            log.exception("run %s failed", record.id)
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            prepared.release()
        timings["total_s"] = time.perf_counter() - t_start
        peak = resident_bytes(peak=True) if peak_known else None
        if peak is not None:  # the process's peak during this run (what the worker kept from earlier runs included)
            timings["peak_rss_bytes"] = float(peak)
        record.timings = timings
        return record

    def prepare(self, cfg: RunConfig) -> PreparedRun:
        """``cfg`` bound to its model, resident or streamed as ``runtime`` decides (before any quantization).

        Raises:
            ConfigError / DataError: The configuration does not fit the model.

        """
        choice = self._stream(cfg)
        if choice.stream:
            self._models.clear()  # a model kept resident would take the memory the stream saves
            return prepare_streamed(cfg, choice, self._fingerprint(cfg), progress=self.progress, reuse=self.reuse)
        return self._prepare_resident(cfg)

    def _prepare_resident(self, cfg: RunConfig) -> ResidentRun:
        compiled = compile_config(cfg)
        device = resolve_device(cfg.device)
        fp = self.fp_model(cfg)
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
        inputs = fp.inputs if self.share else None  # the layer-0 inputs the runs of this FP model share
        plan = dataclasses.replace(plan, options=dataclasses.replace(plan.options, inputs=inputs))
        timings["data_s"] = time.perf_counter() - t0
        place(model, device)
        reference = self._reference(cfg, fp, model, plan.evaluation, device)
        timings.update(reference.timings)
        info = fp.loaded.info
        return ResidentRun(model, fp.loaded.tokenizer, plan, reference, info.fingerprint, info.architecture, device,
                           timings, quantized_weights_key(cfg, info.fingerprint), self.qmodels,
                           fp.state if self.share else None, self.reuse, self.progress, on_quantized=self._count,
                           source=info.source, kv_cache=cfg.scheme.kv_cache)

    def _count(self, reused: bool) -> None:
        if reused:
            self.stats.qmodel_hits += 1
        else:
            self.stats.quantized += 1

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


class PreparedRun(Protocol):
    """A run bound to its model and ready to quantize and evaluate, whatever the model's residency.

    :class:`~ptqlab.study.resident.ResidentRun` holds the model in memory;
    :class:`~ptqlab.study.streamed.StreamedRun` a skeleton whose layers are read from disk.
    """

    fingerprint: str
    device: torch.device
    timings: dict[str, float]

    @property
    def architecture(self) -> str | None:
        """The model's class name."""
        ...

    def quantize(self) -> QuantizeReport:
        """Quantize the model (or restore its kept quantized weights); the report holds its size metrics."""
        ...

    def evaluate(self, report: QuantizeReport, peers: Sequence[tuple[float, float]]) -> Evaluation:
        """Evaluate the quantized model against its FP model."""
        ...

    def release(self) -> None:
        """Free what the run holds."""
        ...


def _collect_run_garbage() -> None:
    """Free what a finished run left in reference cycles, now, and give the pages back to the OS.

    The hooks that quantize activations and the KV cache tie the run's model copy into reference cycles that
    only a full collection frees; in a process holding transformers' many long-lived objects Python runs one
    rarely, so a sweep worker kept one dead copy after another (21.5 GiB after twelve runs of a 1.5B model).
    """
    gc.collect()
    return_freed()


def _fill(record: RunRecord, report: QuantizeReport, result: Evaluation) -> None:
    """A finished run's measurements into its record."""
    record.metrics = result.metrics + report.metrics + model_source_metrics(record.model)  # bits.source of a GGUF
    record.texts.update(result.texts)
    record.sensitivity = [vars(s) for s in result.sensitivity]
    record.windows = {name: {"nll": w.nll, "fp_nll": w.fp_nll} for name, w in result.windows.items()}
    record.layers = [vars(r) for r in report.records]
    record.adaptive = None if result.adaptive is None else dataclasses.asdict(result.adaptive)
    record.status = "done"


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
        machine=dict(machine_info()),
    )


def failed_record(cfg: RunConfig, fingerprint: str, error: BaseException | str) -> RunRecord:
    """The ``failed`` record of a run that could not start (its model or data did not fit)."""
    record = _new_record(cfg, fingerprint, None, cfg.device)
    record.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return record
