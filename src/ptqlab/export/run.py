"""Export what a run measured: the configuration's quantized model written in a format other tools load.

The model is quantized by the same path as the run (:func:`ptqlab.pipeline.quantize.quantize` on the plan
:func:`ptqlab.compile.bind` makes), so the weights written are the weights the study evaluated, bit for bit.
Everything that can be checked is checked before any weight changes and before anything is written; the
output directory appears complete (written beside it, then renamed) or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compile import RunPlan, bind, compile_config
from ..errors import ConfigError
from ..models.loading import load_model
from ..pipeline.quantize import quantize
from ..schema import RunConfig
from ..study.identity import run_id
from ..study.store import RunRecord, Store
from .common import save_checkpoint
from .compressed import check_compressed, write_compressed
from .gguf import check_gguf, write_gguf
from .hf import check_hf, model_card

log = logging.getLogger(__name__)

FORMATS = ("hf", "compressed-tensors", "gguf")
GGUF_FILE = "model.gguf"
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
    """Quantize ``cfg``'s model as the run does and write it to ``out`` in format ``fmt``.

    Args:
        cfg: The run's configuration.
        fmt: ``hf`` (fake-quantized safetensors any transformers user loads with ``from_pretrained``),
            ``compressed-tensors`` (``pack-quantized`` INT weights, the format vLLM loads) or ``gguf``
            (llama.cpp's block types, ``model.gguf`` in ``out``).
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
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not an export format; use one of {', '.join(FORMATS)}")
    target = Path(out)
    check_output(target, overwrite)
    t0 = time.perf_counter()
    compiled = compile_config(cfg)
    loaded = load_model(cfg.model, cfg.dtype, "cpu", cfg.trust_remote_code)
    rid = run_id(cfg, loaded.info.fingerprint)
    record = store.get(rid) if store is not None else None
    record = record if record is not None and record.id == rid and record.status == "done" else None
    plan = bind(compiled, loaded.model, loaded.tokenizer)
    layout = _check(fmt, plan, loaded.model.config)
    plan.quantization.keep_grids = fmt != "hf"  # the codes' grids are what a packed format writes
    report = quantize(loaded.model, plan.quantization, progress=progress)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "hf":
            save_checkpoint(loaded.model, loaded.tokenizer, tmp)
        elif fmt == "gguf":
            tmp.mkdir(parents=True)
            write_gguf(loaded.model, loaded.tokenizer, tmp / GGUF_FILE, report.grids, loaded.info.source)
        else:
            write_compressed(loaded.model, loaded.tokenizer, tmp, report.grids, layout)
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


def _check(fmt: str, plan: RunPlan, config: Any) -> str:
    """Check ``plan`` against ``fmt``; the format's layout (compressed-tensors' own format name)."""
    if fmt == "hf":
        check_hf(plan.quantization)
        return fmt
    if fmt == "gguf":
        check_gguf(plan.quantization, config)
        return fmt
    return check_compressed(plan.quantization)


def _manifest(cfg: RunConfig, fmt: str, rid: str, record: RunRecord | None) -> dict[str, Any]:
    return {"format": fmt, "run_id": rid, "config": cfg.model_dump(mode="json"),
            "metrics": {} if record is None else {m.name: m.value for m in record.metrics}}
