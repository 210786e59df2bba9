"""Runs whose model is streamed: whether a run streams (``runtime``), and the streamed residency of a run.

A streamed run never loads the model: its skeleton lives on the meta device, the plan is bound to it
(shapes are all a plan needs), the quantized model is written layer by layer under ``runtime.offload_dir``
in a directory named by the weights key (a later run with the same weights reads it instead of
quantizing again), and the evaluation runs layer-major over the FP and the quantized checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..compile import RunPlan, bind, compile_config
from ..errors import ConfigError
from ..eval import evaluate
from ..eval.measures import check_layer_major
from ..eval.reference import Reference
from ..eval.result import Evaluation
from ..eval.streamed import LayerMajorModel
from ..memory import available_memory, format_size, parse_size
from ..metrics import Metric
from ..models.loading import load_tokenizer, model_directory, resolve_device, torch_dtype
from ..models.registry import get_adapter
from ..models.shards import Checkpoint, check_writable, module_prefix, skeleton
from ..paths import cache_root
from ..pipeline.driver import QuantizeReport
from ..pipeline.plan import QuantizationPlan
from ..pipeline.stream import check_quantization_streamable, quantize_streamed
from ..schema import RunConfig
from ..store.qmodels import QuantizedModels
from .resident import quantized_weights_key

log = logging.getLogger(__name__)

_RESIDENT_FACTOR = 2.5  # a shared worker keeps the FP state beside the quantized copy, plus activations


@dataclass(frozen=True)
class StreamChoice:
    """Whether a run streams, and what the decision was made from.

    Attributes:
        stream: Stream the run.
        checkpoint: The model's safetensors files (None when not streamed).
        budget: The memory budget in bytes.
        model_bytes: The model's weights at the run's dtype.
        layer_bytes: The largest decoder layer's weights at the run's dtype.

    """

    stream: bool
    checkpoint: Checkpoint | None = None
    budget: int = 0
    model_bytes: int = 0
    layer_bytes: int = 0


def choose_stream(cfg: RunConfig) -> StreamChoice:
    """Decide from ``cfg.runtime`` and the model's size whether the run streams; check its budget and directory.

    ``auto`` streams when the model would not fit the memory budget, or on a CUDA device its free memory
    (then each decoder layer is put on the GPU while it is worked on, its calibration activations and
    Hessians with it).

    Raises:
        ConfigError: A budget smaller than one decoder layer (or the embeddings and head), or an offload
            directory that cannot be written.
        ModelLoadError: The model's files are missing, or a shard is missing or truncated.

    """
    rt = cfg.runtime
    if rt.stream == "off":
        return StreamChoice(False)
    directory = model_directory(cfg.model, cfg.trust_remote_code)
    ckpt = Checkpoint(directory)
    dtype = torch_dtype(cfg.dtype)
    item = dtype.itemsize
    model = skeleton(directory, dtype, cfg.trust_remote_code)
    adapter = get_adapter(model)
    layers = [ckpt.bytes_of(module_prefix(model, layer), item) for layer in adapter.layers(model)]
    total = ckpt.bytes_of("", item)
    outer = total - sum(layers)
    budget = parse_size(rt.max_memory) if rt.max_memory is not None else available_memory()
    gpu = gpu_free_memory(resolve_device(cfg.device))
    stream = rt.stream == "on" or total * _RESIDENT_FACTOR > min(budget, gpu or budget)
    if not stream:
        return StreamChoice(False, budget=budget, model_bytes=total)
    need = max(max(layers, default=0), outer)
    for room, what in ((budget, f"runtime.max_memory={rt.max_memory or format_size(budget)}"),
                       (gpu or budget, f"the GPU's free memory ({format_size(gpu or 0)})")):
        if need > room:
            raise ConfigError(
                f"{what} is too small to stream {cfg.model}: one decoder layer needs "
                f"{format_size(max(layers, default=0))} at {cfg.dtype} and the embeddings and head "
                f"{format_size(outer)}; give at least {format_size(need)}"
            )
    check_writable(offload_root(cfg))
    log.info("streaming %s (%s at %s; budget %s%s)", cfg.model, format_size(total), cfg.dtype, format_size(budget),
             "" if gpu is None else f", GPU {format_size(gpu)} free")
    return StreamChoice(True, ckpt, budget, total, max(layers, default=0))


def gpu_free_memory(device: torch.device) -> int | None:
    """Free memory of a CUDA ``device`` in bytes; None for other devices.

    A model that would not fit it streams: one decoder layer at a time on the GPU.
    """
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def offload_root(cfg: RunConfig) -> Path:
    """Where a streamed run writes its quantized models (``runtime.offload_dir`` or ``$PTQLAB_CACHE/stream``)."""
    rt = cfg.runtime
    return Path(rt.offload_dir).expanduser() if rt.offload_dir else cache_root() / "stream"


@dataclass
class StreamedRun:
    """A streamed model bound to its plan: a skeleton on the meta device, its checkpoints on disk.

    One residency of :class:`ptqlab.study.worker.PreparedRun` (the other is
    :class:`ptqlab.study.resident.ResidentRun`). The quantized model is written layer by layer under
    ``runtime.offload_dir`` in a directory named by the weights key (a later run with the same weights reads
    it instead of quantizing again, unless ``reuse`` is off); the evaluation runs layer-major over the FP and
    the quantized checkpoints (:class:`ptqlab.eval.streamed.LayerMajorModel`).
    """

    model: torch.nn.Module
    tokenizer: Any
    plan: RunPlan
    fp: Checkpoint
    out: Path
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    progress: bool = True
    reuse: bool = True
    timings: dict[str, float] = field(default_factory=lambda: {"streamed": 1.0})
    q: Checkpoint | None = None

    @property
    def architecture(self) -> str:
        """The model's class name."""
        return type(self.model).__name__

    def quantize(self) -> QuantizeReport:
        """The quantized checkpoint: kept under the offload directory by weights key, or written now."""
        plan = self.plan.quantization
        report = self._quantized(plan) if plan.changes_weights else QuantizeReport()
        report.metrics += [Metric(k, v) for k, v in plan.size_metrics(self.model).items()]
        return report

    def _quantized(self, plan: QuantizationPlan) -> QuantizeReport:
        specs = plan.grid_specs()
        kept = QuantizedModels.load_checkpoint(self.out, self.model, specs) if self.reuse else None
        if kept is not None:
            self.timings["qmodel_reused"] = 1.0
            self.q = kept.checkpoint
            return kept.report
        QuantizedModels.clear_checkpoint(self.out)  # not reused: the model is written anew in its place
        report = quantize_streamed(self.model, plan, self.fp, self.out, device=self.device, dtype=self.dtype,
                                   progress=self.progress,
                                   options=dataclasses.replace(self.plan.options, keep_grids=True))
        self.q = QuantizedModels.finish_checkpoint(self.out, report, set(plan.size_metrics(self.model)))
        return report

    def evaluate(self, report: QuantizeReport, peers: Sequence[tuple[float, float]]) -> Evaluation:
        """Evaluate layer-major: the quantized checkpoint (or the FP one itself) against the FP checkpoint."""
        access = LayerMajorModel(self.model, self.plan.quantization.adapter, self.fp, self.q, device=self.device,
                                 dtype=self.dtype, progress=self.progress,
                                 own_embedding=self.plan.quantization.embedding is not None)
        return evaluate(access, self.tokenizer, self.plan.evaluation, Reference(), progress=self.progress)

    def release(self) -> None:
        """Nothing is held in memory between runs."""


def prepare_streamed(cfg: RunConfig, choice: StreamChoice, fingerprint: str, *, progress: bool = True,
                     reuse: bool = True) -> StreamedRun:
    """Bind ``cfg`` to its model's skeleton and check that everything it asks for streams.

    Raises:
        ConfigError: The recipe, scheme or evaluation cannot be streamed (before any work).

    """
    fp = choice.checkpoint
    assert fp is not None
    compiled = compile_config(cfg)
    device, dtype = resolve_device(cfg.device), torch_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = skeleton(fp.directory, dtype, cfg.trust_remote_code)
    plan = bind(compiled, model, tokenizer)
    check_quantization_streamable(plan.quantization)
    check_layer_major(plan.evaluation)
    out = offload_root(cfg) / f"{quantized_weights_key(cfg, fingerprint)}-{device.type}"
    return StreamedRun(model, tokenizer, plan, fp, out, fingerprint, device, dtype, progress, reuse)
