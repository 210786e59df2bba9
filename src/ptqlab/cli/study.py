"""Commands on studies: ``sweep``, ``status`` and ``cache``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError
from ..store import Store, cache, check_store
from ..study.executors import Executor
from ..study.sweeper import PlannedRun, SweepPlan
from .runs import duration as _duration
from .runs import store_path

log = logging.getLogger(__name__)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 28 else text[:25] + "..."


def _table(runs: Iterable[PlannedRun], varied: list[str], extra: dict[str, str] | None = None) -> str:
    """The runs as an aligned text table: position, id, status, the varied values, estimate (or a metric)."""
    head = ["#", "run", "status", *varied, "estimate"]
    rows = []
    for r in runs:
        est = (extra or {}).get(r.run_id) or (_duration(r.estimate_s) if r.estimate_s is not None else "?")
        rows.append([str(r.position), r.run_id[:12], r.status, *(_short(r.values.get(p)) for p in varied), est])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=False)).rstrip() for row in [head, *rows]]
    return "\n".join(lines) + "\n"


def _counts(plan: SweepPlan, retry_failed: bool) -> str:
    left, unknown = plan.time_left(retry_failed)
    todo = len(plan.todo(retry_failed))
    estimate = f"about {_duration(left)}" + (f" (+{unknown} runs with no similar run stored)" if unknown else "")
    if unknown == todo and todo:
        estimate = "unknown (no similar run in the store yet)"
    return (f"sweep {plan.sweep.name}: {len(plan.runs)} runs ({plan.sweep.excluded} excluded): "
            f"{plan.count('done')} done, {plan.count('failed')} failed, {plan.count('running')} running elsewhere, "
            f"{plan.count('missing')} missing; time left {estimate}\n")


def _executor(args: argparse.Namespace) -> Executor:
    """The executor the options ask for (connecting to Ray checks the address first)."""
    if args.executor == "ray":
        from ..study.ray_executor import RayExecutor

        return RayExecutor(workers=args.workers or 2, address=args.address, num_cpus=args.num_cpus,
                           num_gpus=args.num_gpus)
    if args.address or args.num_gpus:
        raise ConfigError("--address and --num-gpus are options of --executor ray")
    if args.workers and args.workers > 1:
        from ..study.executors import ProcessExecutor

        return ProcessExecutor(args.workers)
    from ..study.executors import LocalExecutor

    return LocalExecutor(progress=not args.quiet)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Expand a sweep file; show its runs (``--dry-run``) or compute the missing ones."""
    from ..study.sweep import load_sweep
    from ..study.sweeper import plan_sweep, run_sweep

    sweep = load_sweep(args.file, args.set or [])
    path = store_path(args)
    check_store(path)
    if args.dry_run:
        store = Store(path) if os.path.isfile(path) else None
        plan = plan_sweep(sweep, store)
        if args.json:
            json.dump(_plan_json(plan, args.retry_failed), sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        sys.stdout.write(_table(plan.runs, sweep.varied))
        sys.stdout.write(_counts(plan, args.retry_failed))
        return 0
    if not getattr(args, "verbose", False):  # the sweep's bar and its own messages; each run's details with -v
        logging.getLogger("ptqlab").setLevel(logging.WARNING)
        logging.getLogger("ptqlab.study").setLevel(logging.INFO)
    executor = _executor(args)
    try:
        store = Store(path)
        plan = plan_sweep(sweep, store)
        sys.stderr.write(_counts(plan, args.retry_failed))
        summary = run_sweep(plan, store, executor, retry_failed=args.retry_failed, progress=not args.quiet)
    finally:
        executor.close()
    sys.stdout.write(f"sweep {sweep.name}: computed {summary.computed} runs in {_duration(summary.seconds)} "
                     f"({summary.failed} failed), {summary.already} were done before"
                     + (f", {summary.elsewhere} running elsewhere" if summary.elsewhere else "") + "\n")
    return 1 if summary.failed else 0


def _plan_json(plan: SweepPlan, retry_failed: bool) -> dict[str, Any]:
    left, unknown = plan.time_left(retry_failed)
    return {
        "name": plan.sweep.name,
        "varied": plan.sweep.varied,
        "excluded": plan.sweep.excluded,
        "counts": {s: plan.count(s) for s in ("done", "failed", "running", "missing")},
        "time_left_s": left,
        "without_estimate": unknown,
        "runs": [{"position": r.position, "id": r.run_id, "status": r.status, "values": r.values,
                  "estimate_s": r.estimate_s} for r in plan.runs],
    }


def cmd_status(args: argparse.Namespace) -> int:
    """Summarise a sweep stored in the store: counts, failures, time spent and left."""
    store = Store(store_path(args))
    entries = store.sweep_entries(args.sweep)
    if not entries:
        known = ", ".join(store.sweeps()) or "none"
        raise ConfigError(f"no sweep {args.sweep!r} in the store (sweeps: {known})")
    statuses = store.statuses([e.run_id for e in entries])
    leased = store.leased()
    records = {r.id: r for r in store.list_runs(sweep=args.sweep)}
    runs, shown = [], {}
    for e in entries:
        status = statuses.get(e.run_id) or ("running" if e.run_id in leased else "missing")
        runs.append(PlannedRun(e.position, e.run_id, "", e.config, e.values, status))
        rec = records.get(e.run_id)
        metric = next((m for m in rec.metrics if m.name.startswith("ppl.")), None) if rec else None
        shown[e.run_id] = f"{metric.name}={metric.value:.4g}" if metric else ""
    varied = sorted({k for e in entries for k in e.values})
    sys.stdout.write(_table(runs, varied, shown).replace("estimate", "metric  ", 1))
    spent = sum(r.timings.get("total_s", 0.0) for r in records.values())
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "failed", "running", "missing")}
    sys.stdout.write(f"sweep {args.sweep}: {len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                     + f"; {_duration(spent)} of compute stored\n")
    for r in records.values():
        if r.status == "failed":
            sys.stdout.write(f"failed {r.id}: {r.error}\n")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Show or empty the disk cache (``$PTQLAB_CACHE``)."""
    root = cache.cache_root()
    if args.action == "clear":
        freed = cache.clear(args.kind)
        sys.stdout.write(f"freed {freed / 1e6:.1f} MB from {root}\n")
        return 0
    listed = cache.entries()
    by_kind: dict[str, list[cache.CacheEntry]] = {}
    for e in listed:
        by_kind.setdefault(e.kind, []).append(e)
    sys.stdout.write(f"cache {root} (bound {cache.max_bytes() / 1024**3:.1f} GB, PTQLAB_CACHE_MAX_GB)\n")
    for kind, items in sorted(by_kind.items()):
        size = sum(e.size for e in items)
        sys.stdout.write(f"{kind:<12} {len(items):>6} entries  {size / 1e6:>10.1f} MB\n")
    sys.stdout.write(f"{'total':<12} {len(listed):>6} entries  {sum(e.size for e in listed) / 1e6:>10.1f} MB\n")
    return 0


def add_commands(sub: Any) -> list[argparse.ArgumentParser]:
    """Add ``sweep``, ``status`` and ``cache`` to the subcommands; returns their parsers."""
    sweep = sub.add_parser("sweep", help="run a sweep file (a grid of configurations); resumable")
    sweep.add_argument("file", help="sweep YAML file")
    sweep.add_argument("--dry-run", action="store_true", help="show the runs, what is done and the time left")
    sweep.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a key of the file")
    sweep.add_argument("--retry-failed", action="store_true", help="run the failed runs again")
    sweep.add_argument("--executor", choices=("local", "ray"), default="local", help="where runs are computed")
    sweep.add_argument("--workers", type=int, default=None, help="worker processes (local) or actors (ray)")
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a new one)")
    sweep.add_argument("--num-cpus", type=float, default=None, help="CPUs per Ray worker")
    sweep.add_argument("--num-gpus", type=float, default=None, help="GPUs per Ray worker")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.add_argument("--json", action="store_true", help="with --dry-run: print the runs as JSON")
    sweep.set_defaults(func=cmd_sweep)
    status = sub.add_parser("status", help="summarise a sweep in the store")
    status.add_argument("sweep", help="sweep name")
    status.set_defaults(func=cmd_status)
    cache_cmd = sub.add_parser("cache", help="show (ls) or empty (clear) the disk cache")
    cache_cmd.add_argument("action", choices=("ls", "clear"))
    cache_cmd.add_argument("--kind", default=None, help="with clear: only this kind (e.g. qmodels)")
    cache_cmd.set_defaults(func=cmd_cache)
    return [sweep, status, cache_cmd]
