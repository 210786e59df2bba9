"""``ptqlab search FILE``: per-module weight formats chosen to a budget, every allocation an ordinary stored run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from ..errors import ConfigError
from ..report.runs import json_ready
from ..report.search import SearchSummary, search_summary
from ..store import Store, check_store
from ..study.executors import Executor
from .runs import duration, store_path

log = logging.getLogger(__name__)


def _executor(args: argparse.Namespace) -> Executor:
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.workers and args.workers > 1:
        from ..study.executors import ProcessExecutor

        return ProcessExecutor(args.workers)
    from ..study.executors import LocalExecutor

    return LocalExecutor(progress=not args.quiet)


def _roles(roles: list[dict[str, Any]]) -> str:
    out = []
    for r in roles:
        if r["role"] in ("uniform", "rule"):
            out.append(f"{r['role']}[{r['menu']}]")
        elif r["role"] == "validation":
            out.append(f"validation@{r['budget']:g}#{r['k']}")
        else:
            out.append(f"searched@{r['budget']:g}" + (" (rule's)" if r.get("rule_budget") else ""))
    return ", ".join(out)


def _number(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _plan_text(plan: Any, statuses: dict[str, str]) -> str:
    """The search's runs: roles, planned bits, the signal's sum, status."""
    head = ["run", "status", "bits", "score", "roles"]
    rows = [[a.run_id[:12], statuses.get(a.run_id, "missing"), f"{a.bits:.4f}", _number(a.score), _roles(a.roles)]
            for a in plan.allocations]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=False)).rstrip() for row in [head, *rows]]
    return "\n".join(lines) + "\n"


def _describe(plan: Any) -> str:
    s = plan.search.section
    lo, hi = plan.feasible
    signal = plan.signal
    where = ("not measured yet (it is measured, once, when the search runs)" if signal is None else
             f"{'measured now' if plan.signal_measured else 'from the cache'} ({signal.evaluations} evaluations, "
             f"{duration(signal.seconds)} when measured)")
    base = "" if plan.base_point is None else (" from FP" if plan.base_point < 0 else
                                                f" from menu point {plan.base_point}")
    return (f"search {plan.name}: {len(plan.units.units)} units ({s.unit}), {len(plan.search.menu)} menu points, "
            f"budgets {s.budget.kind} {', '.join(f'{b:g}' for b in s.budget.values)} (feasible {lo:.6g} to "
            f"{hi:.6g}), solver {s.solver}; signal {s.signal}{base}: {where}\n")


def _summary_text(summary: SearchSummary) -> str:
    lines = [f"front of {summary.name} ({summary.metric or 'no KL measured'}; 95 % intervals):"]
    head = ["budget", "run", "bits", "KL", "±95%", "best uniform (bits, KL, reduction)", "rule (bits, KL, reduction)"]
    rows = []
    for r in summary.front:
        p = r.searched
        cells = []
        for other in (r.against(r.uniform), r.against(r.rule)):
            if other is None:
                cells.append("-")
                continue
            red = "-" if other["reduction"] is None else f"{100 * other['reduction']:+.1f} %"
            mark = " goal met" if other["goal_met"] else ""
            cells.append(f"{_number(other['bits'], '.3f')}, {_number(other['kl'])}, {red}{mark}")
        half = None if p.kl_se is None else 1.96 * p.kl_se
        rows.append([f"{r.budget:g}", p.run_id[:12], _number(p.bits, ".4f"), _number(p.kl), _number(half, ".2g"),
                     *cells])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=False)).rstrip() for row in [head, *rows]]
    add = summary.additivity
    if add is not None:
        rho = "n/a" if add.spearman is None else f"{add.spearman:.3f}"
        rel = "-" if add.mean_rel_error is None else f"{100 * add.mean_rel_error:.1f} %"
        lines.append(f"additivity on {add.n} validation runs: Spearman {rho}; predicted - measured KL: mean |error| "
                     f"{_number(add.mean_abs_error)} ({rel}), bias {_number(add.bias)}"
                     + ("" if add.scale in (None, 1.0) else f" (proxy scaled by {add.scale:.4g})"))
    return "\n".join(lines) + "\n"


def cmd_search(args: argparse.Namespace) -> int:
    """Plan a search file; show its runs (``--dry-run``) or compute what is missing and print its front."""
    from ..search import load_search, plan_search, run_search

    search = load_search(args.file)
    path = store_path(args)
    check_store(path)
    if args.dry_run:
        plan = plan_search(search, measure=False, progress=False)
        store = Store(path) if os.path.isfile(path) else None
        statuses = store.statuses([a.run_id for a in plan.allocations]) if store is not None else {}
        if args.json:
            data = {"name": plan.name, "units": len(plan.units.units), "feasible": list(plan.feasible),
                    "signal": None if plan.signal is None else plan.signal.to_json() | {"values": None},
                    "runs": [{"id": a.run_id, "status": statuses.get(a.run_id, "missing"), "bits": a.bits,
                              "score": a.score, "roles": a.roles} for a in plan.allocations]}
            json.dump(json_ready(data), sys.stdout, indent=2, allow_nan=False)
            sys.stdout.write("\n")
            return 0
        sys.stdout.write(_describe(plan))
        sys.stdout.write(_plan_text(plan, statuses))
        return 0
    if not getattr(args, "verbose", False):  # the sweep's bar and the search's own messages; details with -v
        logging.getLogger("ptqlab").setLevel(logging.WARNING)
        logging.getLogger("ptqlab.study").setLevel(logging.INFO)
        logging.getLogger("ptqlab.search").setLevel(logging.INFO)
    plan = plan_search(search, progress=not args.quiet)
    sys.stderr.write(_describe(plan))
    store = Store(path)
    executor = _executor(args)
    try:
        done = run_search(plan, store, executor, retry_failed=args.retry_failed, progress=not args.quiet)
    finally:
        executor.close()
    summary = search_summary(store, plan.name)
    if args.json:
        data = {"name": plan.name, "computed": done.computed, "failed": done.failed, "already": done.already,
                "signal_measured": plan.signal_measured, "summary": summary.to_json()}
        json.dump(json_ready(data), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(f"search {plan.name}: computed {done.computed} runs in {duration(done.seconds)} "
                         f"({done.failed} failed), {done.already} were done before\n")
        sys.stdout.write(_summary_text(summary))
    return 1 if done.failed else 0


def add_commands(sub: Any) -> list[argparse.ArgumentParser]:
    """Add ``search`` to the subcommands; returns its parser."""
    search = sub.add_parser("search", help="choose per-module weight formats to a budget; every allocation, the "
                                           "uniform points and a rule baseline stored as runs (resumable)")
    search.add_argument("file", help="search YAML file (a run config plus a search: section)")
    search.add_argument("--dry-run", action="store_true",
                        help="check the file and show the runs (and the allocations, when the signal is cached)")
    search.add_argument("--json", action="store_true", help="print the result (or, with --dry-run, the runs) as JSON")
    search.add_argument("--retry-failed", action="store_true", help="run the failed runs again")
    search.add_argument("--workers", type=int, default=None, help="worker processes")
    search.add_argument("--quiet", action="store_true", help="no progress bars")
    search.set_defaults(func=cmd_search)
    return [search]
