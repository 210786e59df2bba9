"""Commands on the store as a whole: ``report``, ``recommend``, ``compare``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from ..metrics import parse_name
from ..report import Budget, Recommendation, compare_runs, open_store, select_views, write_report
from ..report.compare import Comparison
from ..report.cost import MIB
from ..report.recommend import Candidate, nearest_size, recommend_each
from ..report.runs import Z95, by_cohort, fmt_number, fmt_signed, json_ready
from ..report.sizes import parse_params
from .runs import store_path

__all__ = ["add_commands"]


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report folder and print the path of its page."""
    report = write_report(store_path(args), args.out, args.where, args.heatmap, args.title)
    verdicts = ", ".join(f"{f.key}: {f.verdict}" for f in report.findings)
    sys.stdout.write(f"{report.runs} runs, {len(report.tables)} tables, {len(report.figures)} figures\n"
                     f"findings: {verdicts}\n{report.index.resolve()}\n")
    return 0


def _dumps(obj: Any) -> str:
    """Strict JSON (no NaN or Infinity: those become null), as jq and browsers read it."""
    return json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n"


def _cost_text(c: Candidate) -> str:
    """``85.2 MiB (measured GGUF file), llama.cpp tg128 45.1 ± 0.84 tokens/s``: the size and speed used."""
    size = "size unknown" if c.size is None else f"{c.size.mib:.1f} MiB ({c.size.source})"
    s = c.speed
    if s is None:
        return f"{size}, no generation speed measured"
    half = "" if s.half_width is None else f" ± {fmt_number(s.half_width, '.2g')}"
    return f"{size}, {s.metric.words} {fmt_number(s.value)}{half} tokens/s"


def _candidate(c: Candidate, out: Any) -> None:
    v = c.view
    out.write(f"  {v.id}  {v.label}  ({fmt_number(v.weight_bits)} bits/weight, {_cost_text(c)})\n")
    for e in c.evidence:
        what = f"{e.measure} ({e.of})" if e.of else e.measure
        fp = f", FP {fmt_number(e.fp)}" if e.fp is not None else ""
        iv = "no interval: no standard error" if e.interval is None else (
            f"95% {fmt_number(e.interval[0])}, {fmt_number(e.interval[1])}")
        limit = f"limit {e.limit:g}" if math.isfinite(e.limit) else "no limit"
        state = ("met, sure" if e.sure else "met only by the point estimate" if e.met else "not met")
        out.write(f"    {what}: {fmt_number(e.value)}{fp}; loss {fmt_number(e.loss)} [{iv}] vs {limit}: {state}\n")


def _print_recommendation(rec: Recommendation, out: Any) -> None:
    out.write(f"cohort {rec.cohort}: {rec.model}; {rec.protocol}\n"
              f"  ({rec.runs} runs, {rec.candidates} candidates within the size and speed bounds; "
              f"ranked by size: {rec.ranked_by})\n")
    needs = {"speed": "no generation speed measured (--min-tps needs one)", "size": "no size known (--max-bytes)"}
    for what, n in rec.left_out.items():
        if n:
            out.write(f"  {n} run{'s' if n > 1 else ''} left out: {needs[what]}\n")
    if rec.choice is None:
        out.write("nothing meets the budget; the nearest runs:\n")
        for c in rec.nearest:
            _candidate(c, out)
        return
    out.write("choice:\n")
    _candidate(rec.choice, out)
    if not rec.choice.sure:
        out.write("flagged: the budget is met by the point estimate but not surely (the 95% interval crosses "
                  "the limit, or there is no interval)\n")
        if rec.sure_choice is not None:
            out.write("the smallest run of this cohort that meets it surely:\n")
            _candidate(rec.sure_choice, out)


def cmd_recommend(args: argparse.Namespace) -> int:
    """Print the smallest run meeting the budget, one per cohort (exit 1 when no cohort has one)."""
    budget = Budget(args.max_class, args.max_ppl_increase, args.max_acc_drop, args.task, args.max_kl,
                    args.max_bits, args.max_bytes, args.min_tps)
    views = select_views(open_store(store_path(args)), args.where)
    size = None
    if args.params is not None:  # the nearest measured model size, when the store holds several
        views, size = nearest_size(views, args.params)
    recs = recommend_each(views, budget)
    if args.json:
        sys.stdout.write(_dumps({"budget": budget.describe(), **({"size": size.to_json()} if size else {}),
                                 "recommendations": [r.to_json() for r in recs]}))
    else:
        out = sys.stdout
        out.write(f"budget: {budget.describe()}\n")
        if size is not None:
            out.write(f"model size: {size.note}\n")
        if len(recs) > 1:
            out.write(f"{len(recs)} cohorts (model and evaluation protocol): one recommendation each; runs of "
                      "different cohorts are never ranked together (--where cohort=ID keeps one)\n")
        unmeasured = sorted({v.cohort_id for v in views} - {r.cohort for r in recs})
        if unmeasured:
            out.write(f"cohorts without runs that have these measurements: {', '.join(unmeasured)}\n")
        for rec in recs:
            out.write("\n")
            _print_recommendation(rec, out)
    return 0 if any(r.choice is not None for r in recs) else 1


def _unit(metric: str) -> tuple[float, str]:
    """How a compared metric is printed: bytes (sizes, memory) in MiB, tokens/s as they are."""
    kind = parse_name(metric).kind
    if kind in ("size", "memory"):
        return MIB, " (MiB)"
    return (1.0, " (t/s)") if kind == "speed" else (1.0, "")


def _print_comparison(cmp: Comparison) -> None:
    out = sys.stdout
    for i, (v, ok) in enumerate(zip(cmp.runs, cmp.comparable, strict=True)):
        mark = "" if ok else "  (another cohort than [0]: not comparable, no differences)"
        out.write(f"[{i}] {v.id}  {v.label}  cohort {v.cohort_id}{mark}\n")
    for members in by_cohort(cmp.runs):
        out.write(f"cohort {members[0].cohort_id}: {members[0].record.model}; {members[0].protocol.describe()}\n")
    width = max((len(r.metric) + len(_unit(r.metric)[1]) for r in cmp.rows), default=6)
    head = "".join(f"{'[' + str(i) + ']':>12}" for i in range(len(cmp.runs)))
    diffs = "".join(f"{'[' + str(i) + ']-[0]':>24}" for i in range(1, len(cmp.runs)))
    out.write(f"{'metric':<{width}}{head}{diffs}\n")
    for r in cmp.rows:
        scale, unit = _unit(r.metric)
        values = "".join(f"{fmt_number(None if v is None else v / scale):>12}" for v in r.values)
        cells = ""
        for d, se, paired, ok in zip(r.diffs[1:], r.diff_se[1:], r.paired[1:], cmp.comparable[1:], strict=True):
            half = f" ± {fmt_number(Z95 * se / scale, '.2g')}" if se is not None else ""
            text = "n/c" if not ok else fmt_signed(None if d is None else d / scale) + half + (" p" if paired else "")
            cells += f"{text:>24}"
        out.write(f"{r.metric + unit:<{width}}{values}{cells}\n")
    out.write("± half the 95% interval (1.96 standard errors of the difference); p: paired over the same windows; "
              "n/c: not comparable (another model or protocol)\n")


def cmd_compare(args: argparse.Namespace) -> int:
    """Print runs side by side."""
    cmp = compare_runs(open_store(store_path(args)), args.runs, args.metric)
    if args.json:
        sys.stdout.write(_dumps(cmp.to_json()))
    else:
        _print_comparison(cmp)
    return 0


def _params(text: str) -> float:
    """``--params``: a parameter count (``1.5e9``, ``1.5B``, ``500M``)."""
    try:
        return parse_params(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _budget_options(p: argparse.ArgumentParser) -> None:
    quality = p.add_mutually_exclusive_group(required=True)
    quality.add_argument("--max-class", type=int, choices=(1, 2, 3), help="ZeroQuant-V2 class at most this")
    quality.add_argument("--max-ppl-increase", type=float, help="mean perplexity at most this much above FP")
    quality.add_argument("--max-acc-drop", type=float, help="accuracy drop (fraction) at most this, per task")
    quality.add_argument("--max-kl", type=float, help="KL divergence from FP at most this")
    p.add_argument("--task", default=None, help="with --max-acc-drop: only this task (default: every task)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-bits", type=float, help="effective bits per weight at most this")
    size.add_argument("--max-bytes", type=float, help="model size in bytes at most this: the measured GGUF file "
                      "where the run has one, else the estimate from effective bits")
    p.add_argument("--min-tps", type=float, metavar="TOKENS_S",
                   help="generation tokens/s at least this (llama.cpp's where several runtimes timed the run); "
                        "a run without a speed measurement is left out")


def add_commands(sub: Any) -> list[argparse.ArgumentParser]:
    """Add ``report``, ``recommend`` and ``compare`` to the subcommands; returns their parsers."""
    report = sub.add_parser("report", help="tables, figures, checked findings and an HTML page from the store")
    report.add_argument("--out", default="report", help="report folder (default: ./report)")
    report.add_argument("--where", default=None, help="only runs matching, e.g. 'model=smollm2*,scheme.weight.bits<=4'")
    report.add_argument("--heatmap", action="append", default=None, metavar="RUN",
                        help="draw this run's per-module sensitivity (repeatable)")
    report.add_argument("--title", default="ptqlab report", help="page title")
    report.set_defaults(func=cmd_report)
    rec = sub.add_parser("recommend", help="the smallest stored configuration meeting a quality budget, per cohort")
    _budget_options(rec)
    rec.add_argument("--where", default=None, help="only runs matching this filter (e.g. cohort=ID)")
    rec.add_argument("--params", type=_params, default=None, metavar="N",
                     help="for a model of N parameters (1.5e9, 1.5B, 500M): the nearest measured model size, when "
                          "the store holds several; else the recommendation is for the measured model only")
    rec.add_argument("--json", action="store_true", help="print the choice and its evidence as JSON")
    rec.set_defaults(func=cmd_recommend)
    cmp = sub.add_parser("compare", help="stored runs side by side with paired differences")
    cmp.add_argument("runs", nargs="+", help="run ids (unique prefixes are enough); the first is the baseline")
    cmp.add_argument("--metric", default=None, help="only metrics matching this pattern (e.g. 'ppl.*')")
    cmp.add_argument("--json", action="store_true", help="print as JSON")
    cmp.set_defaults(func=cmd_compare)
    return [report, rec, cmp]
