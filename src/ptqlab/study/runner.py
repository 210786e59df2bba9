"""Run one configuration end to end: load, check, quantize, evaluate, store (one transaction)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..api import evaluate, plan_quantization, prepare_eval_windows, run_quantization
from ..data.corpora import eval_windows
from ..errors import ConfigError
from ..eval.divergence import Reference, ReferenceCache, divergence
from ..eval.retrieval import make_sample, model_max_length, too_long
from ..eval.sensitivity import Outputs, compare, record_outputs
from ..eval.tasks import FPTaskCache, TaskResults, paired, run_tasks
from ..models.adapter import Adapter
from ..models.loading import LoadedModel, load_model, resolve_device
from .config import RunConfig
from .identity import git_revision, normalized, package_versions, qmodel_key, run_id, sized_metric_name
from .store import Metric, RunRecord, Store

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """The stored run, and whether it was computed now or found in the store."""

    record: RunRecord
    reused: bool


def execute(cfg: RunConfig, store: Store, *, force: bool = False, progress: bool = True) -> RunOutcome:
    """Run a validated configuration and store the result.

    Errors found while checking (model, scheme against the model, data) raise and store nothing. A
    failure while quantizing or evaluating stores the run with status ``failed`` and the reason.
    A run already finished in the store is returned as it is unless ``force``.

    Args:
        cfg: The configuration (from :func:`parse_config` or :func:`load_config`).
        store: Where results go.
        force: Recompute even when the store has the run.
        progress: Show progress bars.

    Returns:
        The stored run record.

    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    lm = load_model(cfg.model, cfg.dtype, "cpu", cfg.trust_remote_code)
    rid = run_id(cfg, lm.info.fingerprint)
    existing = store.get(rid)
    if existing is not None and existing.status == "done" and not force:
        log.info("run %s is already in the store; not recomputed (use --force)", rid)
        return RunOutcome(existing, reused=True)
    timings = {"load_s": time.perf_counter() - t_start}
    plan = plan_quantization(lm.model, cfg.scheme, cfg.recipe, cfg.calibration, lm.tokenizer)
    windows = prepare_eval_windows(lm.tokenizer, cfg.evaluate)
    _check_long_context(cfg, lm.model, lm.tokenizer)
    reference = _fp_reference(cfg, lm, timings)
    sens_ids, fp_outputs = _fp_outputs(cfg, lm, plan.adapter)
    fp_tasks = _fp_tasks(cfg, lm, timings)
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
    )
    try:
        report = run_quantization(lm.model, plan, device, progress)
        lm.model.to(device)  # type: ignore[arg-type]
        with torch.inference_mode():
            result = evaluate(lm.model, lm.tokenizer, cfg.evaluate, windows=windows, progress=progress)
        timings.update(report.timings)
        timings.update(result.timings)
        metrics = list(result.metrics)
        if reference is not None:
            metrics += _divergence_metrics(cfg, lm.model, reference, timings)
        if fp_outputs is not None and sens_ids is not None:
            found = compare(lm.model, plan.adapter, sens_ids, fp_outputs)
            record.sensitivity = [vars(x) for x in found]
        record.texts.update(result.texts)
        if cfg.evaluate.tasks:
            metrics += _task_metrics(cfg, lm, fp_tasks, timings)
        metrics += [Metric(k, v) for k, v in plan.size_metrics(lm.model, cfg.evaluate.seqlen).items()]
        record.metrics = metrics + _distill_metrics(report.distill)
        record.layers = [vars(r) for r in report.records]
        record.status = "done"
    except Exception as exc:  # noqa: BLE001 - any failure while running is stored as the reason
        log.exception("run %s failed", rid)
        record.error = f"{type(exc).__name__}: {exc}"
        record.metrics, record.layers = [], []
    timings["total_s"] = time.perf_counter() - t_start
    record.timings = timings
    store.save(record)
    return RunOutcome(record, reused=False)


def _distill_metrics(losses: list[dict[str, float]]) -> list[Metric]:
    """ZeroQuant losses: mean best/start ratio over layers (local), start and best KL (global)."""
    out = []
    local = [d for d in losses if d["layer"] >= 0 and d["start"] > 0]
    if local:
        out.append(Metric("zeroquant.local.loss_ratio", sum(d["best"] / d["start"] for d in local) / len(local)))
    for d in losses:
        if d["layer"] < 0:
            out += [Metric("zeroquant.global.kl_start", d["start"]), Metric("zeroquant.global.kl_best", d["best"])]
    return out


def _fp_reference(cfg: RunConfig, lm: LoadedModel, timings: dict[str, float]) -> Reference | None:
    """The FP model's top-k reference for divergence (from the on-disk cache, or computed before quantizing)."""
    div = cfg.evaluate.divergence_config()
    if div is None:
        return None
    t0 = time.perf_counter()
    ids = eval_windows(div.corpus, lm.tokenizer, div.seqlen, div.windows).input_ids
    ref = ReferenceCache().get(lm.model, lm.info.fingerprint, cfg.dtype, ids, div.top_k)
    timings["divergence.reference_s"] = time.perf_counter() - t0
    return ref


def _divergence_metrics(
    cfg: RunConfig, model: torch.nn.Module, ref: Reference, timings: dict[str, float]
) -> list[Metric]:
    div = cfg.evaluate.divergence_config()
    assert div is not None
    t0 = time.perf_counter()
    d = divergence(model, ref)
    timings["divergence_s"] = time.perf_counter() - t0
    n_win, seqlen = ref.ids.shape
    return [Metric(sized_metric_name(kind, div.corpus, seqlen, n_win), value)
            for kind, value in (("kl", d.kl), ("top1", d.top1), ("top5", d.top5))]


def _check_long_context(cfg: RunConfig, model: torch.nn.Module, tokenizer: Any) -> None:
    """Lengths past the model's context, or too short for the records, are an error before any work."""
    lc = cfg.evaluate.long_context
    if lc is None:
        return
    bad = too_long(model, lc.lengths)
    if bad:
        limit = model_max_length(model)
        raise ConfigError(f"evaluate.long_context.lengths {bad} exceed the model's context of {limit} tokens")
    try:
        make_sample(tokenizer, min(lc.lengths), lc.seed, 0, lc.pairs)
    except ValueError as exc:
        raise ConfigError(f"evaluate.long_context: {exc}") from None


def _fp_outputs(cfg: RunConfig, lm: LoadedModel, adapter: Adapter) -> tuple[torch.Tensor | None, Outputs | None]:
    """The FP outputs of every decoder linear and layer, recorded before quantization."""
    sc = cfg.evaluate.sensitivity
    if sc is None:
        return None, None
    ids = eval_windows(sc.corpus, lm.tokenizer, sc.seqlen, sc.windows).input_ids
    return ids, record_outputs(lm.model, adapter, ids)


def _task_settings(cfg: RunConfig) -> dict[str, Any]:
    ev = cfg.evaluate
    return {"limit": ev.limit, "batch_size": ev.batch_size, "num_fewshot": ev.num_fewshot, "seed": ev.seed,
            "tasks_dir": ev.tasks_dir}


def _fp_tasks(cfg: RunConfig, lm: LoadedModel, timings: dict[str, float]) -> TaskResults | None:
    """The FP model's task results (cached on disk), for the paired measures."""
    if not cfg.evaluate.tasks:
        return None
    t0 = time.perf_counter()
    res = FPTaskCache().get(lm.model, lm.tokenizer, lm.info.fingerprint, cfg.dtype, cfg.evaluate.tasks,
                            **_task_settings(cfg))
    timings["lm_eval.fp_s"] = time.perf_counter() - t0
    return res


def _task_metrics(
    cfg: RunConfig, lm: LoadedModel, fp: TaskResults | None, timings: dict[str, float]
) -> list[Metric]:
    """lm-eval metrics of the quantized model (names kept, with stderr) and paired measures against FP."""
    t0 = time.perf_counter()
    res = run_tasks(lm.model, lm.tokenizer, cfg.evaluate.tasks, **_task_settings(cfg))
    timings["lm_eval_s"] = time.perf_counter() - t0
    out = []
    for task, metrics in res.metrics.items():
        out += [Metric(f"lm_eval.{task}.{name}", value, err) for name, (value, err) in metrics.items()]
        if fp is not None:
            out += [Metric(f"lm_eval.{task}.{name}", value) for name, value in paired(fp, res, task).items()]
    return out
