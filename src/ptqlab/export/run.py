"""Export what a run measured: the configuration's quantized model written in a format other tools load.

The quantized model comes from the store of quantized models (:mod:`ptqlab.study.qmodels`) by the run's
weights key: the weights the run evaluated, bit for bit, with their grids; only when no run kept them is
the model quantized, by the run's own path, and kept for the next. A streamed configuration
(``runtime.stream``) is exported from its quantized checkpoint on disk, never loaded whole. Everything that
can be checked is checked before any weight changes and before anything is written; the output directory
appears complete (written beside it, then renamed) or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..compile import bind, compile_config
from ..errors import ConfigError
from ..formats.registry import EXPORTERS, Exporter, Written, exporter_for
from ..models.loading import load_model, model_fingerprint, resolve_device
from ..schema import RunConfig
from ..store import RunRecord, Store, run_id
from ..store.qmodels import QuantizedModels
from ..study.resident import quantize_or_restore, quantized_weights_key
from ..study.streamed import StreamChoice, choose_stream, prepare_streamed
from .hf import model_card

log = logging.getLogger(__name__)

FORMATS = tuple(EXPORTERS)
EXPORT_FILE = "ptqlab-export.json"


@dataclass
class ExportResult:
    """What an export wrote: the directory, the run id it reproduces, the format and the seconds."""

    directory: Path
    run_id: str
    format: str
    seconds: float


def check_output(out: Path, overwrite: bool) -> None:
    """An output directory must not exist (unless ``overwrite``) and its parent must be writable.

    Raises:
        ConfigError: It exists, it is a file, or its parent cannot be written.

    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {out}: cannot write in {parent}")


def export_config(cfg: RunConfig, fmt: str, out: str | Path, *, overwrite: bool = False,
                  store: Store | None = None, progress: bool = True) -> ExportResult:
    """Write ``cfg``'s quantized model (the run's own, from the store of quantized models) to ``out`` as ``fmt``.

    Args:
        cfg: The run's configuration.
        fmt: A registered format (:mod:`ptqlab.formats.registry`): ``hf`` (fake-quantized safetensors any
            transformers user loads with ``from_pretrained``), ``compressed-tensors`` (``pack-quantized`` INT
            weights, the format vLLM loads) or ``gguf`` (llama.cpp's block types, ``model.gguf`` in ``out``).
        out: The directory to create.
        overwrite: Replace ``out`` when it exists.
        store: Where the run of ``cfg`` may be stored: its metrics go into the model card, and the export is
            recorded there (``ptqlab show`` lists it with the run).
        progress: Show progress bars.

    Returns:
        What was written.

    Raises:
        ConfigError: An unknown format, an output directory that exists, or a scheme or recipe the format
            cannot hold (each named, before any weight changes).

    """
    exporter = exporter_for(fmt)
    target = Path(out)
    check_output(target, overwrite)
    t0 = time.perf_counter()
    choice = choose_stream(cfg)
    fingerprint, written = (_streamed(cfg, choice, exporter, progress) if choice.stream
                            else _resident(cfg, exporter, progress))
    rid = run_id(cfg, fingerprint)
    record = store.get(rid) if store is not None else None
    record = record if record is not None and record.id == rid and record.status == "done" else None
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if written.model is None:
            assert exporter.write_checkpoint is not None  # _streamed refused the format otherwise
            exporter.write_checkpoint(replace(written, out=tmp))
        else:
            exporter.write(replace(written, out=tmp))
        (tmp / "README.md").write_text(model_card(cfg, rid, record, fmt))
        (tmp / EXPORT_FILE).write_text(json.dumps(_manifest(cfg, fmt, rid, record), indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if store is not None:
        store.add_export(rid, fmt, target)
    seconds = time.perf_counter() - t0
    log.info("exported run %s as %s to %s in %.1f s", rid, fmt, target, seconds)
    return ExportResult(target, rid, fmt, seconds)


def _resident(cfg: RunConfig, exporter: Exporter, progress: bool) -> tuple[str, Written]:
    """The model loaded, checked against the format, and made the run's quantized model."""
    compiled = compile_config(cfg)
    loaded = load_model(cfg.model, cfg.dtype, "cpu", cfg.trust_remote_code)
    plan = bind(compiled, loaded.model, loaded.tokenizer)
    layout = exporter.check(plan.quantization, loaded.model.config)
    key = quantized_weights_key(cfg, loaded.info.fingerprint)
    report, _ = quantize_or_restore(loaded.model, plan.quantization, QuantizedModels(), key,
                                    resolve_device(cfg.device).type, progress=progress, options=plan.options)
    return loaded.info.fingerprint, Written(loaded.model, loaded.tokenizer, Path(), report.grids, layout,
                                            loaded.info.source)


def _streamed(cfg: RunConfig, choice: StreamChoice, exporter: Exporter, progress: bool) -> tuple[str, Written]:
    """The streamed run's quantized checkpoint (read from its offload directory, or written now).

    Raises:
        ConfigError: The format is not written from a checkpoint on disk yet.

    """
    if exporter.write_checkpoint is None:
        raise ConfigError(f"--format {exporter.name} writes from a model in memory, and runtime.stream streams "
                          f"{cfg.model}; export it with --format hf, or with runtime.stream: off if it fits")
    fingerprint = model_fingerprint(cfg.model)
    run = prepare_streamed(cfg, choice, fingerprint, progress=progress)
    layout = exporter.check(run.plan.quantization, run.model.config)
    report = run.quantize()
    checkpoint = run.q.directory if run.q is not None else run.fp.directory
    return fingerprint, Written(None, run.tokenizer, Path(), report.grids, layout, checkpoint=checkpoint)


def _manifest(cfg: RunConfig, fmt: str, rid: str, record: RunRecord | None) -> dict[str, Any]:
    return {"format": fmt, "run_id": rid, "config": cfg.model_dump(mode="json"),
            "metrics": {} if record is None else {m.name: m.value for m in record.metrics}}
