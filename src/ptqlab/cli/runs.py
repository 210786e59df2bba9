"""Commands on single runs: ``run``, ``ls``, ``show``."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from ..memory import format_size
from ..report import describe_scheme
from ..schema import RunConfig
from ..store import RunRecord, Store

DEFAULT_STORE = "ptqlab.db"


def store_path(args: argparse.Namespace) -> str:
    """The store a command works on: ``--store``, else ``$PTQLAB_STORE``, else ``./ptqlab.db``."""
    return str(getattr(args, "store", None) or os.environ.get("PTQLAB_STORE") or DEFAULT_STORE)


def _store(args: argparse.Namespace) -> Store:
    return Store(store_path(args))


def describe_machine(machine: dict[str, Any]) -> str:
    """One line of a run's machine: CPU model, cores, memory, instruction-set extensions."""
    parts = [str(machine.get("cpu") or machine.get("arch") or "unknown CPU")]
    if machine.get("cores"):
        parts.append(f"{machine['cores']} cores")
    if machine.get("memory_bytes"):
        parts.append(format_size(int(machine["memory_bytes"])))
    if machine.get("isa"):
        parts.append(" ".join(machine["isa"]))
    return ", ".join(parts)


def _run_table(run: RunRecord, out: TextIO) -> None:
    cfg = run.config
    weight = (cfg.get("scheme") or {}).get("weight") or {}
    recipe = ", ".join(next(iter(s)) for s in cfg.get("recipe") or []) or ("rtn" if weight else "-")
    out.write(f"run {run.id}  status {run.status}  model {run.model} ({run.architecture})\n")
    out.write(f"scheme {describe_scheme(cfg.get('scheme') or {})}  recipe {recipe}\n")
    if run.error:
        out.write(f"error: {run.error}\n")
    if run.metrics:
        width = max(len(m.name) for m in run.metrics)
        out.write(f"{'metric':<{width}}  value\n")
        for m in run.metrics:
            err = f" ± {m.stderr:.4g}" if m.stderr is not None else ""
            out.write(f"{m.name:<{width}}  {m.value:.4f}{err}\n")
    if run.texts.get("sample"):
        out.write(f"sample: {run.texts['sample']!r}\n")
    if run.timings:
        t = run.timings
        threads = f", {run.threads} threads" if run.threads else ""
        peak = f", peak memory {format_size(t['peak_rss_bytes'])}" if t.get("peak_rss_bytes") else ""
        out.write(f"time: quantize {t.get('quantize_s', 0):.1f} s, total {t.get('total_s', 0):.1f} s{threads}{peak}\n")
    if run.machine:
        out.write(f"machine: {describe_machine(run.machine)}\n")


def cmd_run(args: argparse.Namespace) -> int:
    """Run one configuration file."""
    from ..study.config import load_config
    from ..study.runner import execute

    cfg = load_config(args.config)
    if args.dry_run:
        return _dry_run(cfg, args)
    if cfg.export is not None:  # an output directory that is in the way is known before any work
        from ..export.run import check_output

        check_output(Path(cfg.export.out), cfg.export.overwrite)
    store = _store(args)
    outcome = execute(cfg, store, force=args.force or args.no_reuse, progress=not args.quiet, reuse=not args.no_reuse)
    if args.json:
        json.dump(outcome.record.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if outcome.reused:
            sys.stdout.write("(already in the store; --force recomputes)\n")
        _run_table(outcome.record, sys.stdout)
    if outcome.record.status != "done":
        return 1
    if cfg.export is not None:
        from ..export.run import export_config

        result = export_config(cfg, cfg.export.format, cfg.export.out, overwrite=cfg.export.overwrite, store=store,
                               progress=not args.quiet)
        sys.stderr.write(f"exported ({result.format}) to {result.directory}\n")
    return 0


def _dry_run(cfg: RunConfig, args: argparse.Namespace) -> int:
    """Print what the run computes and its estimated time; store nothing."""
    from ..study.preview import preview_run

    path = store_path(args)
    preview = preview_run(cfg, Store(path) if os.path.isfile(path) else None)
    est = preview.estimate
    if args.json:
        json.dump({"id": preview.run_id, "status": preview.status, "steps": [list(s) for s in preview.steps],
                   "estimate_s": est.seconds, "total_s": est.total, "priced_s": est.priced, "unpriced": est.unpriced,
                   "borrowed": est.borrowed}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout
    stored = {"done": "done: in the store (--force recomputes)", "failed": "failed before: in the store",
              "missing": "not in the store"}[preview.status]
    out.write(f"run {preview.run_id} of {cfg.model} ({stored})\n")
    shown: set[str] = set()
    for phase, what in preview.steps:
        seconds = est.seconds.get(phase)
        when = f"~{duration(seconds)}" if seconds is not None and phase not in shown else ""
        shown.add(phase)
        out.write(f"  {phase:<12} {what:<72} {when}\n")
    total = f"~{duration(est.total)}" if est.total is not None else (
        f"more than ~{duration(est.priced)}" if est.seconds else "no estimate")
    out.write(f"estimated time: {total} (rates of {est.basis}")
    for phase, other in est.borrowed.items():
        out.write(f"; {phase} from {other}'s runs, scaled by the models' seconds per token")
    out.write(f"; not priced: {', '.join(est.unpriced)})\n" if est.unpriced else ")\n")
    out.write("dry run: nothing computed or stored\n")
    return 0


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_ls(args: argparse.Namespace) -> int:
    """List stored runs, one line each (filtered by sweep, status, model and metric)."""
    runs = _store(args).list_runs(sweep=args.sweep, status=args.status, model=args.model)
    pattern = args.metric or "ppl.*"
    rows = []
    for r in runs:
        metric = next((m for m in r.metrics if fnmatch.fnmatchcase(m.name, pattern)), None)
        if args.metric and metric is None:
            continue
        recipe = ",".join(next(iter(s)) for s in r.config.get("recipe") or []) or "-"
        shown = f"{metric.name}={metric.value:.4g}" if metric else ""
        scheme = describe_scheme(r.config.get("scheme") or {})
        rows.append(f"{r.id}  {r.status:<6}  {r.model:<14}  {scheme:<28}  {recipe:<12}  {shown}\n")
    if not rows:
        sys.stdout.write("no runs in the store\n" if not runs and not _filtered(args) else "no run matches\n")
        return 0
    sys.stdout.writelines(rows)
    return 0


def _filtered(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) for k in ("sweep", "status", "model", "metric"))


def cmd_show(args: argparse.Namespace) -> int:
    """Show one stored run (and where it was exported)."""
    store = _store(args)
    run = store.get(args.run)
    if run is None:
        sys.stderr.write(f"error: no run (or more than one) matches {args.run!r}\n")
        return 2
    exports = store.exports(run.id)
    if args.json:
        json.dump(run.to_json() | {"exports": exports}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _run_table(run, sys.stdout)
        for rec in run.layers:
            err = f"{rec['rel_error']:.5f}" if rec["rel_error"] is not None else "-"
            sys.stdout.write(f"  {rec['module']:<45} W{rec['bits']}  err {err}  {rec['seconds']:.2f} s\n")
        for e in exports:
            sys.stdout.write(f"exported: {e['format']} -> {e['directory']} ({e['created_at']})\n")
    return 0
