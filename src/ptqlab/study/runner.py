"""Run one configuration end to end: load, check, quantize, evaluate, store (one transaction)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass

import torch

from ..compile import bind, compile_config
from ..eval import build_reference, evaluate
from ..models.loading import load_model, resolve_device
from ..pipeline.quantize import place, quantize
from ..schema import RunConfig
from .identity import git_revision, normalized, package_versions, qmodel_key, run_id
from .store import RunRecord, Store

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """The stored run, and whether it was computed now or found in the store."""

    record: RunRecord
    reused: bool


def execute(cfg: RunConfig, store: Store, *, force: bool = False, progress: bool = True) -> RunOutcome:
    """Run a validated configuration and store the result.

    The configuration is compiled (once), the model loaded, the compiled configuration checked against it
    (errors so far raise and store nothing); then the model goes to the run's device, the FP reference of
    the evaluation is measured there (or read from the disk cache), the model is quantized and evaluated.
    A failure while quantizing or evaluating stores the run with status ``failed`` and the reason. A run
    already finished in the store is returned as it is unless ``force``.

    Args:
        cfg: The configuration (from :func:`~ptqlab.study.config.load_config` or ``parse_config``).
        store: Where results go.
        force: Recompute even when the store has the run.
        progress: Show progress bars.

    Returns:
        The stored run record.

    """
    t_start = time.perf_counter()
    compiled = compile_config(cfg)
    device = resolve_device(cfg.device)
    lm = load_model(cfg.model, cfg.dtype, "cpu", cfg.trust_remote_code)
    rid = run_id(cfg, lm.info.fingerprint)
    existing = store.get(rid)
    if existing is not None and existing.status == "done" and not force:
        log.info("run %s is already in the store; not recomputed (use --force)", rid)
        return RunOutcome(existing, reused=True)
    timings = {"load_s": time.perf_counter() - t_start}
    plan = bind(compiled, lm.model, lm.tokenizer)
    place(lm.model, device)
    reference = build_reference(lm.model, lm.tokenizer, plan.evaluation, fingerprint=lm.info.fingerprint,
                                progress=progress)
    timings.update(reference.timings)
    record = RunRecord(
        id=rid,
        qmodel_key=qmodel_key(cfg, lm.info.fingerprint),
        model=cfg.model,
        model_fingerprint=lm.info.fingerprint,
        architecture=lm.info.architecture,
        config=normalized(cfg),
        status="failed",
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        seed=cfg.calibration.seed,
        code_version=package_versions().get("ptqlab"),
        git_rev=git_revision(),
        versions=package_versions(),
        device=str(device),
        threads=torch.get_num_threads(),
    )
    try:
        report = quantize(lm.model, plan.quantization, progress=progress)
        result = evaluate(lm.model, lm.tokenizer, plan.evaluation, reference, progress=progress)
        timings.update(report.timings)
        timings.update(result.timings)
        record.metrics = result.metrics + report.metrics
        record.texts.update(result.texts)
        record.sensitivity = [vars(s) for s in result.sensitivity]
        record.windows = {name: {"nll": w.nll, "fp_nll": w.fp_nll} for name, w in result.windows.items()}
        record.layers = [vars(r) for r in report.records]
        record.status = "done"
    except Exception as exc:  # noqa: BLE001 - any failure while running is stored as the reason
        log.exception("run %s failed", rid)
        record.error = f"{type(exc).__name__}: {exc}"
        record.metrics, record.layers, record.texts, record.sensitivity, record.windows = [], [], {}, [], {}
    timings["total_s"] = time.perf_counter() - t_start
    record.timings = timings
    store.save(record)
    return RunOutcome(record, reused=False)
