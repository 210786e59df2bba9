"""Commands on the store as a whole: ``report``, ``recommend``, ``compare``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..report import Budget, Recommendation, compare_runs, open_store, recommend, select_views, write_report
from ..report.compare import Comparison
from ..report.recommend import Candidate
from ..report.render import fmt
from .runs import store_path

__all__ = ["add_commands"]


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report folder and print the path of its page."""
    report = write_report(store_path(args), args.out, args.where, args.heatmap, args.title)
    verdicts = ", ".join(f"{f.key}: {f.verdict}" for f in report.findings)
    sys.stdout.write(f"{report.runs} runs, {len(report.tables)} tables, {len(report.figures)} figures\n"
                     f"findings: {verdicts}\n{report.index.resolve()}\n")
    return 0


def _candidate(c: Candidate, out: Any) -> None:
    v = c.view
    size = f"{v.size_bytes / 2**20:.1f} MiB" if v.size_bytes else "size unknown"
    out.write(f"  {v.id}  {v.label}  ({fmt(v.weight_bits)} bits/weight, {size})\n")
    for e in c.evidence:
        lo, hi = e.interval
        fp = f", FP {e.fp:.4g}" if e.fp else ""
        state = "met, sure" if e.sure else "met only inside the interval" if e.met else "not met"
        out.write(f"    {e.measure}: {e.value:.4g}{fp}; loss {e.loss:.4g} [95% {lo:.4g}, {hi:.4g}] "
                  f"vs limit {e.limit:g}: {state}\n")


def _print_recommendation(rec: Recommendation) -> None:
    out = sys.stdout
    out.write(f"budget: {rec.budget.describe()} ({rec.candidates} candidate runs)\n")
    if rec.choice is None:
        out.write("nothing meets the budget; the nearest runs:\n")
        for c in rec.nearest:
            _candidate(c, out)
        return
    out.write("choice:\n")
    _candidate(rec.choice, out)
    if not rec.choice.sure:
        out.write("flagged: the budget is met by the point estimate but not by the whole interval\n")
        if rec.sure_choice is not None:
            out.write("the smallest run that meets it surely:\n")
            _candidate(rec.sure_choice, out)


def cmd_recommend(args: argparse.Namespace) -> int:
    """Print the smallest run meeting the budget (exit 1 when none does)."""
    budget = Budget(args.max_class, args.max_ppl_increase, args.max_acc_drop, args.task, args.max_kl,
                    args.max_bits, args.max_bytes)
    views = select_views(open_store(store_path(args)), args.where)
    rec = recommend(views, budget)
    if args.json:
        sys.stdout.write(json.dumps(rec.to_json(), indent=2) + "\n")
    else:
        _print_recommendation(rec)
    return 0 if rec.choice is not None else 1


def _print_comparison(cmp: Comparison) -> None:
    out = sys.stdout
    for i, v in enumerate(cmp.runs):
        out.write(f"[{i}] {v.id}  {v.label}\n")
    width = max((len(r.metric) for r in cmp.rows), default=6)
    head = "".join(f"{'[' + str(i) + ']':>12}" for i in range(len(cmp.runs)))
    diffs = "".join(f"{'[' + str(i) + ']-[0]':>24}" for i in range(1, len(cmp.runs)))
    out.write(f"{'metric':<{width}}{head}{diffs}\n")
    for r in cmp.rows:
        values = "".join(f"{fmt(v):>12}" for v in r.values)
        cells = ""
        for d, se, paired in zip(r.diffs[1:], r.diff_se[1:], r.paired[1:], strict=True):
            text = fmt(d) + (f" ± {se:.2g}" if se is not None else "") + (" p" if paired else "")
            cells += f"{text:>24}"
        out.write(f"{r.metric:<{width}}{values}{cells}\n")
    out.write("± one standard error of the difference; p: paired over the same windows\n")


def cmd_compare(args: argparse.Namespace) -> int:
    """Print runs side by side."""
    cmp = compare_runs(open_store(store_path(args)), args.runs, args.metric)
    if args.json:
        sys.stdout.write(json.dumps(cmp.to_json(), indent=2) + "\n")
    else:
        _print_comparison(cmp)
    return 0


def _budget_options(p: argparse.ArgumentParser) -> None:
    quality = p.add_mutually_exclusive_group(required=True)
    quality.add_argument("--max-class", type=int, choices=(1, 2, 3), help="ZeroQuant-V2 class at most this")
    quality.add_argument("--max-ppl-increase", type=float, help="mean perplexity at most this much above FP")
    quality.add_argument("--max-acc-drop", type=float, help="accuracy drop (fraction) at most this, per task")
    quality.add_argument("--max-kl", type=float, help="KL divergence from FP at most this")
    p.add_argument("--task", default=None, help="with --max-acc-drop: only this task (default: every task)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-bits", type=float, help="effective bits per weight at most this")
    size.add_argument("--max-bytes", type=float, help="model size in bytes at most this")


def add_commands(sub: Any) -> list[argparse.ArgumentParser]:
    """Add ``report``, ``recommend`` and ``compare`` to the subcommands; returns their parsers."""
    report = sub.add_parser("report", help="tables, figures, checked findings and an HTML page from the store")
    report.add_argument("--out", default="report", help="report folder (default: ./report)")
    report.add_argument("--where", default=None, help="only runs matching, e.g. 'model=smollm2*,scheme.weight.bits<=4'")
    report.add_argument("--heatmap", action="append", default=None, metavar="RUN",
                        help="draw this run's per-module sensitivity (repeatable)")
    report.add_argument("--title", default="ptqlab report", help="page title")
    report.set_defaults(func=cmd_report)
    rec = sub.add_parser("recommend", help="the smallest stored configuration meeting a quality budget")
    _budget_options(rec)
    rec.add_argument("--where", default=None, help="only runs matching this filter")
    rec.add_argument("--json", action="store_true", help="print the choice and its evidence as JSON")
    rec.set_defaults(func=cmd_recommend)
    cmp = sub.add_parser("compare", help="stored runs side by side with paired differences")
    cmp.add_argument("runs", nargs="+", help="run ids (unique prefixes are enough); the first is the baseline")
    cmp.add_argument("--metric", default=None, help="only metrics matching this pattern (e.g. 'ppl.*')")
    cmp.add_argument("--json", action="store_true", help="print as JSON")
    cmp.set_defaults(func=cmd_compare)
    return [report, rec, cmp]
