"""`make bench-search`: mixed precision to a budget on SmolLM2-135M with the GGUF menu (issue 32's goals).

For each signal (kl, hessian, fisher, error) the search of ``configs/search/smollm2-gguf.yaml`` is run with
that signal (its own sweep, ``smollm2-gguf-<signal>``) into one store, so the uniform menu points, the rule
baseline and the validation allocations (drawn from a seed, the same for every signal) are run once and
shared. Reported, per signal:

- the goals table: at every budget (and at the rule's own), the searched run's KL mean with its 95 % interval
  against the best uniform point and the rule baseline within the budget: the relative KL reduction and
  whether the intervals are apart (goal: at least 10 % lower, intervals apart);
- the additivity check: Spearman's correlation of the signal's sum with the measured KL on the validation
  allocations (goal: at least 0.8) and the error of the sum;
- the cost of measuring the signal (seconds, model evaluations).

Everything resumes: the store holds the runs (a killed search computes only what is missing), the disk
cache the signals. Results: ``bench/results/search.json`` and ``search.md``.

    python bench/bench_search.py                    # the four signals on SmolLM2-135M (hours on two cores)
    python bench/bench_search.py --signals kl       # one signal
    python bench/bench_search.py --quick            # a smoke test on stories260K (a minute), under bench/results/tmp
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import open_results

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "search" / "smollm2-gguf.yaml"
SIGNALS = ("kl", "hessian", "fisher", "error")
QUICK = {
    "model": "stories260k",
    "evaluate": {"divergence": {"seqlen": 64, "windows": 4}, "sample": None, "sensitivity": None},
    "calibration": {"samples": 4, "seqlen": 64, "batch_size": 4},
    "search": {"menu": [{"bits": 2, "granularity": "channel"}, {"bits": 4, "granularity": "channel"},
                        {"bits": 8, "granularity": "channel"}],
               "budget": {"bits": [3.5, 5.0]}, "validate": 3},
}


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _kl(point: dict[str, Any] | None) -> str:
    if point is None or point.get("kl") is None:
        return "–"
    se = point.get("kl_se")
    return f"{point['kl']:.4g}" + ("" if se is None else f" ± {1.96 * se:.2g}")


def _against(row: dict[str, Any], key: str) -> tuple[str, str, bool | None]:
    other = row.get(key)
    if other is None:
        return "–", "–", None
    red = other.get("reduction")
    verdict = f"{100 * red:+.1f} %" if red is not None else "–"
    verdict += "" if other.get("intervals_apart") else " (intervals overlap)"
    return f"{_fmt(other.get('bits'), '.3f')}: {_kl(other)}", verdict, bool(other.get("goal_met"))


def goals_table(results: dict[str, Any]) -> str:
    """The goals of issue 32 as Markdown: one row per signal and budget, and one per signal for the signal."""
    lines = ["| signal | budget | searched bits | searched KL ± 95 % | best uniform within budget | KL reduction | "
             "rule within budget | KL reduction | goals met |", "|---|---|---|---|---|---|---|---|---|"]
    for signal, res in results.items():
        for row in res["summary"]["front"]:
            s = row["searched"]
            uni, uni_red, uni_ok = _against(row, "uniform")
            rule, rule_red, rule_ok = _against(row, "rule")
            oks = [x for x in (uni_ok, rule_ok) if x is not None]
            met = "yes" if oks and all(oks) else ("no" if oks else "–")
            budget = f"{row['budget']:g}" + (" (rule's)" if any(r.get("rule_budget") for r in s["roles"]) else "")
            lines.append(f"| {signal} | {budget} | {_fmt(s['bits'], '.4f')} | {_kl(s)} | {uni} | {uni_red} | {rule} | "
                         f"{rule_red} | {met} |")
    lines += ["", "| signal | Spearman (validation runs) | mean \\|predicted − measured\\| KL | relative | bias | "
              "cost of the signal | goal ρ ≥ 0.8 |", "|---|---|---|---|---|---|---|"]
    for signal, res in results.items():
        add = res["summary"]["additivity"] or {}
        rho = add.get("spearman")
        cost = res["signal"]
        rel = add.get("mean_rel_error")
        lines.append(f"| {signal} | {_fmt(rho, '.3f')} ({add.get('n', 0)}) | {_fmt(add.get('mean_abs_error'))} | "
                     f"{'–' if rel is None else f'{100 * rel:.1f} %'} | {_fmt(add.get('bias'))} | "
                     f"{cost['seconds']:.0f} s, {cost['evaluations']} evaluations | "
                     f"{'yes' if rho is not None and rho >= 0.8 else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signals", default=",".join(SIGNALS), help="comma-separated signals to compare")
    parser.add_argument("--quick", action="store_true", help="a smoke test on stories260K (int menu, tiny windows)")
    parser.add_argument("--store", default=None, help="the results store (default bench/results/search.db)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ptqlab.search").setLevel(logging.INFO)

    from ptqlab.report.search import search_summary
    from ptqlab.search import parse_search, plan_search, run_search
    from ptqlab.store import Store
    from ptqlab.study.executors import LocalExecutor

    signals = [s.strip() for s in args.signals.split(",") if s.strip()]
    unknown = sorted(set(signals) - set(SIGNALS))
    if unknown:
        parser.error(f"unknown signals {unknown}; known: {', '.join(SIGNALS)}")
    if args.quick:
        base, stem, name = QUICK, "stories-quick", "search-quick"
        folder = ROOT / "bench" / "results" / "tmp"
    else:
        base, stem, name = yaml.safe_load(CONFIG.read_text()), CONFIG.stem, "search"
        folder = ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    store = Store(args.store or folder / f"{name}.db")
    command = "python bench/bench_search.py" + (" --quick" if args.quick else "")
    out, meta, saved = open_results(f"tmp/{name}.json" if args.quick else f"{name}.json", command,
                                    config=base, store=str(store.path))
    results: dict[str, Any] = dict(saved.get("signals", {}))
    for signal in signals:
        data = {**base, "name": f"{stem}-{signal}", "search": {**base["search"], "signal": signal}}
        t0 = time.perf_counter()
        plan = plan_search(parse_search(data), progress=True)
        assert plan.signal is not None
        done = run_search(plan, store, LocalExecutor(progress=True), progress=True)
        summary = search_summary(store, plan.name)
        results[signal] = {
            "signal": {"seconds": plan.signal.seconds, "evaluations": plan.signal.evaluations,
                       "measured_now": plan.signal_measured},
            "runs": {"total": len(plan.allocations), "computed": done.computed, "failed": done.failed},
            "wall_s": time.perf_counter() - t0,
            "summary": summary.to_json(),
        }
        out.write_text(json.dumps({"meta": meta, "signals": results}, indent=2, allow_nan=False))
        print(f"{signal}: {done.computed} runs computed ({done.failed} failed) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    table = goals_table({s: results[s] for s in signals if s in results})
    out.with_suffix(".md").write_text(f"# bench-search ({meta['date']}, {meta['machine']})\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
