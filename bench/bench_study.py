"""`make bench-study`: what running a study as one sweep saves, on the quick ZeroQuant-V2 study (SmolLM2-135M).

Parts (each in subprocesses with its own fresh stores and $PTQLAB_CACHE folders under --work):

a. The study as one ``ptqlab sweep`` against the same configurations as separate ``ptqlab run`` calls (one
   process per run, one cache shared by them, as a user running them one by one has): wall time of each,
   their ratio (goal: sweep <= 0.5x), where the time goes, and whether both stores hold the same run ids with
   bit-identical metrics. The phases partition each side's wall time: the named ones are summed from the
   stored runs' timings, "other in-run" is the rest of each run's own span, and start-up is wall time minus
   the runs' spans. A run's span is its total_s, plus its load_s where ``ptqlab run`` loaded the model before
   the run's clock started (it loads the model to compute the run id; a sweep's run loads it inside its
   total_s). The bench asserts that no phase is counted twice (the named phases sum to at most the wall time).
b. Adaptive against full evaluation: the sweep again with ``evaluate.adaptive={confidence: 0.95, target:
   class}`` into another store (sharing part a's cache, so quantized models are restored, not recomputed):
   windows evaluated (goal: at least 5x fewer) and whether each run's ZeroQuant-V2 class agrees with the
   full evaluation's (Class-1: mean perplexity over the corpora at most 0.1 above FP, Class-2 at most 0.5,
   Class-3 above; FP perplexity from the FP window NLLs stored with every run).
c. The first 8 runs with ``--executor ray --workers 2`` against ``--executor local`` (fresh caches).

    python bench/bench_study.py                          # everything (hours on two cores)
    python bench/bench_study.py --part a --limit 2       # a smoke test: the first 2 runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import open_results

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "configs" / "studies" / "zeroquant-v2-quick.yaml"
PTQLAB = str(Path(sys.executable).parent / "ptqlab")
ADAPTIVE = "evaluate.adaptive={confidence: 0.95, target: class}"
RAY_RUNS = 8
B_WINDOWS = 40  # windows per corpus in part b (the quick study has 8: adaptive evaluation starts from 8)
B_PICK = slice(1, None, 4)  # part b: runs 1 and 5 of part a's 8 (their quantized weights are in a's cache)
C_SET = "evaluate.max_windows=2"  # part c measures the executors: its runs evaluate 2 windows per corpus
# Where a run's time goes: categories of the stored timings (capture_s is inside quantize_s), and the rest
# of the run's span ("other in-run"); with start-up (outside the runs) they partition a side's wall time.
SHARES = ("loading", "FP references", "calibration/data", "quantization", "evaluation", "other in-run")
SLACK_S = 1e-3  # per run: float rounding of the stored seconds (sub-intervals of one interval)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def ptqlab(args: list[str], cache: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run the ``ptqlab`` command in a subprocess with its own cache; its wall time and outcome."""
    env = {**os.environ, "PTQLAB_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([PTQLAB, *args], env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - t0, proc


def study_runs(sets: list[str], limit: int | None) -> list[Any]:
    """The study's expanded run configurations (with ``--set`` values); ``limit`` of them spread evenly over it."""
    from ptqlab.study.sweep import load_sweep

    runs = load_sweep(STUDY, sets).runs
    if limit is None or limit >= len(runs):
        return runs
    return [runs[(2 * k + 1) * len(runs) // (2 * limit)] for k in range(limit)]


def sweep_file(folder: Path, sets: list[str], limit: int | None, pick: slice = slice(None)) -> tuple[Path, list[str]]:
    """The sweep to run: the study itself, or a derived file of ``limit`` of its runs (the same configs)."""
    if limit is None and pick == slice(None):
        return STUDY, [a for s in sets for a in ("--set", s)]
    configs = [r.config.model_dump(mode="json") for r in study_runs(sets, limit)[pick]]
    keys = [k for k in configs[0] if any(c[k] != configs[0][k] for c in configs)]
    doc = {k: v for k, v in configs[0].items() if k not in keys}
    doc["name"] = "zeroquant-v2-quick"
    if keys:
        doc["zip"] = {k: [c[k] for c in configs] for k in keys}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, []


def sweep(folder: Path, cache: Path, sets: list[str], limit: int | None, *extra: str,
          pick: slice = slice(None)) -> float:
    """``ptqlab sweep`` of the study (``limit`` runs, ``pick`` of them) into ``folder/store.db``; its wall time."""
    path, args = sweep_file(folder, sets, limit, pick)
    wall, proc = ptqlab(["--store", str(folder / "store.db"), "sweep", str(path), *args, "--quiet", *extra], cache)
    print(f"  sweep {' '.join(sets + list(extra))}: {wall:.0f} s, rc {proc.returncode}", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], flush=True)
    return wall


def records(store: Path) -> dict[str, Any]:
    """The runs of a store by id, with their window NLLs (none when the store was never written)."""
    from ptqlab.store import Store

    if not store.exists():
        return {}
    results = Store(store)
    runs = {r.id: r for r in results.list_runs()}
    for run_id, windows in results.windows(list(runs)).items():
        runs[run_id].windows = windows
    return runs


def shares(recs: list[Any], load_outside: bool = False) -> dict[str, float]:
    """Seconds per category summed over runs, the runs' total_s, and their spans (``span_s``).

    ``load_outside``: the runs' model loads (``load_s``) happened before their clocks started (``ptqlab run``
    loads the model to compute the run id before the run starts timing), so each run's span is its total_s
    plus its load_s; otherwise its span is its total_s. "other in-run" is the span minus the named categories.
    """
    out = dict.fromkeys(SHARES, 0.0)
    total = span = 0.0
    for r in recs:
        t = r.timings
        cats = {
            "loading": t.get("load_s", 0.0) + t.get("copy_s", 0.0),
            "FP references": sum(v for k, v in t.items() if k.startswith("reference.") and k.endswith("_s"))
            + t.get("divergence.reference_s", 0.0) + t.get("lm_eval.fp_s", 0.0),
            "calibration/data": t.get("data_s", 0.0) + t.get("capture_s", 0.0) + t.get("static_ranges_s", 0.0),
            "quantization": t.get("quantize_s", 0.0) - t.get("capture_s", 0.0) + t.get("qmodel_restore_s", 0.0),
            "evaluation": sum(v for k, v in t.items() if k.startswith(("eval.", "retrieval.")) and k.endswith("_s")
                              and not k.endswith("_tok_per_s"))
            + sum(t.get(k, 0.0) for k in ("divergence_s", "lm_eval_s", "sensitivity_s", "dialogue_s", "judge_s")),
        }
        run_span = t.get("total_s", 0.0) + (t.get("load_s", 0.0) if load_outside else 0.0)
        cats["other in-run"] = run_span - sum(cats.values())
        assert cats["other in-run"] >= -SLACK_S, (
            f"run {r.id}: its phases overlap: {sum(cats.values()) - cats['other in-run']:.3f} s of named phases in "
            f"a span of {run_span:.3f} s (timings {t})")
        for k, v in cats.items():
            out[k] += v
        total += t.get("total_s", 0.0)
        span += run_span
    out["total_s"] = total
    out["span_s"] = span
    return out


def check_partition(name: str, side: dict[str, Any]) -> None:
    """The phases of one side must partition its wall time: the named ones sum to at most the wall time."""
    named = side["startup_s"] + sum(side[k] for k in SHARES if k != "other in-run")
    slack = SLACK_S * max(side["runs"], 1)
    assert named <= side["wall_s"] + slack, (
        f"{name}: the named phases sum to {named:.3f} s, more than the wall time {side['wall_s']:.3f} s "
        f"({100 * named / side['wall_s']:.1f} %): a phase is counted twice")
    assert side["startup_s"] >= -slack, (
        f"{name}: the runs' spans ({side['span_s']:.3f} s) exceed the wall time {side['wall_s']:.3f} s")


def part_a(work: Path, limit: int | None, keep_runs: list[float] | None = None) -> dict[str, Any]:
    """One sweep against separate ``ptqlab run`` calls over the same configurations.

    With ``keep_runs`` (the walls of separate runs measured before, whose store is kept), only the sweep
    is measured again (when the machine was busy during it).
    """
    print("part a: sweep against separate runs", flush=True)
    one, sep = fresh(work / "a-sweep"), work / "a-runs"
    sweep_wall = sweep(one, one / "cache", [], limit)
    walls = list(keep_runs or [])
    for k, run in enumerate(study_runs([], limit) if keep_runs is None else []):
        if k == 0:
            sep = fresh(sep)
        cfg = sep / f"run{k:03d}.yaml"
        cfg.write_text(yaml.safe_dump(run.config.model_dump(mode="json"), sort_keys=False))
        wall, proc = ptqlab(["--store", str(sep / "store.db"), "run", str(cfg), "--quiet"], sep / "cache")
        walls.append(wall)
        print(f"  run {k}: {wall:.0f} s, rc {proc.returncode}", flush=True)
    a, b = records(one / "store.db"), records(sep / "store.db")
    metrics = {rid: {m.name: m.value for m in r.metrics} for rid, r in a.items()}
    same = set(a) == set(b) and all(metrics[rid] == {m.name: m.value for m in b[rid].metrics} for rid in a)
    sides = {}
    # `ptqlab run` loads the model (to compute the run id) before the run's clock starts; a sweep's run inside it
    for name, recs, wall, load_outside in (("sweep", list(a.values()), sweep_wall, False),
                                           ("separate runs", list(b.values()), sum(walls), True)):
        s = shares(recs, load_outside)
        sides[name] = {"runs": len(recs), "done": sum(r.status == "done" for r in recs), "wall_s": wall,
                       "startup_s": wall - s["span_s"], **s}
        check_partition(name, sides[name])
    return {"sides": sides, "run_walls_s": walls, "ratio": sweep_wall / sum(walls), "same_ids": set(a) == set(b),
            "bit_identical": same}


def full_delta(rec: Any) -> tuple[float, int]:
    """Mean perplexity over the corpora minus FP's (from the FP window NLLs stored with the run), windows."""
    q = [math.exp(sum(w["nll"]) / len(w["nll"])) for w in rec.windows.values()]
    fp = [math.exp(sum(w["fp_nll"]) / len(w["fp_nll"])) for w in rec.windows.values()]
    return sum(q) / len(q) - sum(fp) / len(fp), sum(len(w["nll"]) for w in rec.windows.values())


def part_b(work: Path, limit: int | None) -> dict[str, Any]:
    """Adaptive evaluation against the full one, over the same runs, with B_WINDOWS windows per corpus.

    The quick study's 8 windows per corpus are what adaptive evaluation starts from (``min_windows``), so
    both sides evaluate ``evaluate.max_windows=B_WINDOWS``; both share part a's cache, so the quantized
    weights are restored, not computed again.
    """
    from ptqlab.models.loading import model_fingerprint
    from ptqlab.report.runs import zq_class
    from ptqlab.store import run_id

    print("part b: adaptive against full evaluation", flush=True)
    cache = work / "a-sweep" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    more = f"evaluate.max_windows={B_WINDOWS}"
    full, adaptive = work / "b-full", work / "b-adaptive"
    resumed = (full / "store.db").exists()
    full.mkdir(parents=True, exist_ok=True)
    full_wall = sweep(full, cache, [more], limit, pick=B_PICK)  # resumes a killed bench
    adaptive = fresh(adaptive)
    adaptive_wall = sweep(adaptive, cache, [more, ADAPTIVE], limit, pick=B_PICK)
    fps: dict[str, str] = {}
    full_recs, ada_recs = records(full / "store.db"), records(adaptive / "store.db")
    rows = []
    pairs = zip(study_runs([more], limit)[B_PICK], study_runs([more, ADAPTIVE], limit)[B_PICK], strict=True)
    for f_run, a_run in pairs:
        fp = fps.setdefault(f_run.config.model, model_fingerprint(f_run.config.model))
        f_rec, a_rec = full_recs.get(run_id(f_run.config, fp)), ada_recs.get(run_id(a_run.config, fp))
        if f_rec is None or a_rec is None or a_rec.adaptive is None or f_rec.status != "done":
            rows.append({"values": f_run.values, "missing": True})
            continue
        delta, windows = full_delta(f_rec)
        info = a_rec.adaptive
        rows.append({"values": f_run.values, "full_windows": windows,
                     "adaptive_windows": sum(info["windows_used"].values()), "delta": delta, "class": zq_class(delta),
                     "estimate": info["estimate"], "lo": info["lo"], "hi": info["hi"],
                     "adaptive_class": info["zq_class"], "stopped_early": info["stopped_early"],
                     "full_eval_s": shares([f_rec])["evaluation"], "adaptive_eval_s": shares([a_rec])["evaluation"]})
    done = [r for r in rows if not r.get("missing")]
    used = sum(r["adaptive_windows"] for r in done)
    return {"rows": rows, "full_wall_s": full_wall, "full_resumed": resumed, "adaptive_wall_s": adaptive_wall,
            "full_windows": sum(r["full_windows"] for r in done), "adaptive_windows": used,
            "windows_ratio": sum(r["full_windows"] for r in done) / used if used else None,
            "agree": sum(r["class"] == r["adaptive_class"] for r in done), "runs": len(done)}


def part_c(work: Path, limit: int | None) -> dict[str, Any]:
    """The first 8 runs on Ray with 2 workers against the local executor."""
    print("part c: ray (2 workers) against local", flush=True)
    n = min(RAY_RUNS, limit or RAY_RUNS)
    try:
        from ptqlab.study.ray_executor import RayExecutor  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import problem means: not ready
        return {"skipped": f"the Ray executor cannot be imported: {type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"runs": n}
    for name, extra in (("local", ("--executor", "local")), ("ray", ("--executor", "ray", "--workers", "2"))):
        folder = fresh(work / f"c-{name}")
        wall = sweep(folder, folder / "cache", [C_SET], n, *extra)
        done = sum(r.status == "done" for r in records(folder / "store.db").values())
        if done < n:
            return {"skipped": f"{name}: {done} of {n} runs done (see the sweep's error above)", **out}
        out[f"{name}_wall_s"] = wall
    out["ratio"] = out["ray_wall_s"] / out["local_wall_s"]
    return out


def fmt_a(a: dict[str, Any]) -> str:
    head = "| side | runs | wall s | runs' total_s | start-up | " + " | ".join(SHARES) + " |"
    lines = [head, "|" + "---|" * (len(SHARES) + 5)]
    for name, s in a["sides"].items():
        cells = " | ".join(f"{s[k]:.0f} ({s[k] / s['wall_s'] * 100:.0f}%)" for k in SHARES)
        lines.append(f"| {name} | {s['done']}/{s['runs']} | {s['wall_s']:.0f} | {s['total_s']:.0f} | "
                     f"{s['startup_s']:.0f} ({s['startup_s'] / s['wall_s'] * 100:.0f}%) | {cells} |")
    if all("span_s" in s for s in a["sides"].values()):  # results from before the phases partitioned the wall
        lines.append("\nStart-up and the phases partition each side's wall time (start-up: wall time minus the "
                     "runs' spans; a separate run's span includes its model load, done before its clock starts).")
    lines.append(f"\nSweep / separate runs: {a['ratio']:.2f}x (goal <= 0.5). Same run ids: {a['same_ids']}; "
                 f"bit-identical metrics: {a['bit_identical']}.")
    return "\n".join(lines)


def fmt_b(b: dict[str, Any]) -> str:
    lines = ["| run | windows full | windows adaptive | delta full | class full | adaptive [lo, hi] | class adaptive |",
             "|---|---|---|---|---|---|---|"]
    for k, r in enumerate(b["rows"]):
        label = f"{k}: " + ", ".join(f"{p}={json.dumps(v, separators=(',', ':'))}" for p, v in r["values"].items())
        if r.get("missing"):
            lines.append(f"| {label} | - | - | - | - | missing | - |")
            continue
        lines.append(f"| {label} | {r['full_windows']} | {r['adaptive_windows']} | {r['delta']:.3f} | {r['class']} | "
                     f"{r['estimate']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | {r['adaptive_class']} |")
    ratio = f"{b['windows_ratio']:.2f}x" if b["windows_ratio"] else "-"
    lines.append(f"\nWindows: full {b['full_windows']}, adaptive {b['adaptive_windows']} ({ratio} fewer; goal >= 5x). "
                 f"Classes agree on {b['agree']} of {b['runs']} runs. Sweep wall time: full {b['full_wall_s']:.0f} s"
                 + (" (resumed)" if b["full_resumed"] else "")
                 + f", adaptive {b['adaptive_wall_s']:.0f} s (both restore the quantized weights part a kept).")
    return "\n".join(lines)


def fmt_c(c: dict[str, Any]) -> str:
    if "skipped" in c:
        return f"Skipped: {c['skipped']}"
    return (f"| executor | runs | wall s |\n|---|---|---|\n| local | {c['runs']} | {c['local_wall_s']:.0f} |\n"
            f"| ray, 2 workers | {c['runs']} | {c['ray_wall_s']:.0f} |\n\nRay / local: {c['ratio']:.2f}x.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("a", "b", "c", "all"), default="all")
    p.add_argument("--limit", type=int, default=None, help="N runs of the study, spread evenly over it")
    p.add_argument("--work", type=Path, default=Path("/tmp/ptqlab-bench-study"), help="stores and caches (large)")
    p.add_argument("--out", default="study.json", help="results file: a name under bench/results/, or a path "
                   "(the .md table is written beside it)")
    p.add_argument("--redo-sweep", action="store_true", help="part a: measure the sweep again, keep the runs'")
    args = p.parse_args()
    out, meta, saved = open_results(args.out, "python bench/bench_study.py", study=str(STUDY.relative_to(ROOT)),
                                    limit=args.limit)
    data: dict[str, Any] = {"meta": meta, **{k: saved[k] for k in ("a", "b", "c") if k in saved}}
    parts = {"a": part_a, "b": part_b, "c": part_c}
    for name in ("a", "b", "c") if args.part == "all" else (args.part,):
        if name == "a" and args.redo_sweep:
            data[name] = part_a(args.work, args.limit, saved["a"]["run_walls_s"])
        else:
            data[name] = parts[name](args.work, args.limit)
        out.write_text(json.dumps(data, indent=2))
    titles = {"a": "Sweep against separate runs", "b": "Adaptive against full evaluation",
              "c": "Ray (2 workers) against local"}
    fmts = {"a": fmt_a, "b": fmt_b, "c": fmt_c}
    text = "\n\n".join(f"{titles[k]}:\n\n{fmts[k](data[k])}" for k in ("a", "b", "c") if k in data)
    print(text)
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
