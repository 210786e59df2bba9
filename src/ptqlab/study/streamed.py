"""Runs whose model is streamed: whether a run streams (``runtime``), and the streamed run itself.

A streamed run never loads the model: its skeleton lives on the meta device, the plan is bound to it
(shapes are all a plan needs), the quantized model is written layer by layer under ``runtime.offload_dir``
in a directory named by the weights key (a later run with the same weights reads it instead of
quantizing again), and the evaluation runs layer-major over the FP and the quantized checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..compile import bind, compile_config
from ..errors import ConfigError
from ..eval.streamed import check_streamable as check_eval
from ..eval.streamed import evaluate_streamed
from ..memory import available_memory, format_size, parse_size
from ..metrics import Metric
from ..models.loading import load_tokenizer, model_directory, resolve_device, torch_dtype
from ..models.registry import get_adapter
from ..models.shards import Checkpoint, check_writable, module_prefix, skeleton
from ..paths import cache_root
from ..pipeline.plan import QuantizationPlan
from ..pipeline.stream import check_streamable as check_quant
from ..pipeline.stream import quantize_streamed
from ..schema import RunConfig
from .identity import weights_key
from .store import RunRecord

log = logging.getLogger(__name__)

_RECORDS = "ptqlab-records.json"
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


def run_streamed(cfg: RunConfig, choice: StreamChoice, fingerprint: str, record: RunRecord,
                 progress: bool = True, reuse: bool = True) -> RunRecord:
    """Quantize and evaluate ``cfg`` streamed, filling ``record`` (a failure while running is its error).

    With ``reuse``, a quantized model that a run with the same weights key left in the offload directory is
    read instead of quantizing again.

    Raises:
        ConfigError: The recipe, scheme or evaluation cannot be streamed (before any work).

    """
    fp = choice.checkpoint
    assert fp is not None
    t_start = time.perf_counter()
    compiled = compile_config(cfg)
    device, dtype = resolve_device(cfg.device), torch_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = skeleton(fp.directory, dtype, cfg.trust_remote_code)
    plan = bind(compiled, model, tokenizer)
    check_quant(plan.quantization)
    check_eval(plan.evaluation)
    record.architecture, record.device = type(model).__name__, str(device)
    timings: dict[str, float] = {"streamed": 1.0}
    try:
        q, records = _quantized(cfg, plan.quantization, model, fp, fingerprint, device, dtype, progress, timings,
                                reuse)
        res = evaluate_streamed(model, plan.quantization.adapter, plan.evaluation, fp, q, tokenizer=tokenizer,
                                device=device, dtype=dtype, progress=progress)
        timings.update(res.evaluation.timings)
        sizes = plan.quantization.size_metrics(model)
        record.metrics = res.evaluation.metrics + [Metric(k, v) for k, v in sizes.items()]
        record.windows = {n: {"nll": w.nll, "fp_nll": w.fp_nll} for n, w in res.evaluation.windows.items()}
        record.layers = records
        record.status = "done"
    except Exception as exc:  # noqa: BLE001 - any failure while running is stored as the reason
        log.exception("run %s failed", record.id)
        record.error = f"{type(exc).__name__}: {exc}"
    timings["total_s"] = time.perf_counter() - t_start
    record.timings = timings
    return record


def _quantized(cfg: RunConfig, plan: QuantizationPlan, model: torch.nn.Module, fp: Checkpoint, fingerprint: str,
               device: torch.device, dtype: torch.dtype, progress: bool,
               timings: dict[str, float], reuse: bool = True) -> tuple[Checkpoint | None, list[dict[str, Any]]]:
    """The quantized checkpoint: kept under the offload directory by weights key, or written now."""
    if not plan.changes_weights:
        return None, []
    out = offload_root(cfg) / f"{weights_key(cfg, fingerprint)}-{device.type}"
    if reuse and (out / _RECORDS).is_file():
        timings["qmodel_reused"] = 1.0
        return Checkpoint(out), list(json.loads((out / _RECORDS).read_text()))
    shutil.rmtree(out, ignore_errors=True)  # not reused: the model is written anew in its place
    report = quantize_streamed(model, plan, fp, out, device=device, dtype=dtype, progress=progress)
    records = [dataclasses.asdict(r) for r in report.records]
    (out / _RECORDS).write_text(json.dumps(records))  # written last: its presence marks a finished model
    timings.update(report.timings)
    return Checkpoint(out), records
