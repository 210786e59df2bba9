"""lm-eval tasks through lm-eval's HFLM and through ptqlab's LM (shared contexts), side by side.

Both run in this process on the same model, the same task definitions (one TaskManager) and the same
items, zero-shot, at the same fixed torch thread count (``PTQLAB_THREADS``); the order alternates from
task to task. Per task: items, seconds of ``simple_evaluate`` for each (and the seconds spent inside
``loglikelihood``), the speedup, each one's accuracy, and the largest difference of a request's
log-likelihood between the two. Results go to bench/results/tasks-speed.json.

    python bench/bench_tasks.py                          # limit 20, the four tasks, SmolLM2-135M
    python bench/bench_tasks.py --limit 50 --tasks piqa,hellaswag_local --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from benchlib import open_results

TASKS = ("piqa", "arc_easy", "hellaswag_local", "lambada_openai")


def _timed_loglikelihood(lm: Any) -> list[float]:
    """Wrap ``lm.loglikelihood`` so that the seconds spent in it are added to the returned list."""
    spent = [0.0]
    inner = lm.loglikelihood

    def timed(requests: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(requests, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    lm.loglikelihood = timed
    return spent


def _run(lm: Any, task: str, limit: int, tm: Any) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    spent = _timed_loglikelihood(lm)
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=tm, log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return {"seconds": seconds, "model_seconds": spent[0], "acc": out["results"][task].get("acc,none"),
            "items": len(samples), "logliks": [float(r[0]) for s in samples for r in s["filtered_resps"]]}


def run_task(model: Any, tokenizer: Any, task: str, limit: int, batch_size: int, tm: Any, hf_first: bool
             ) -> dict[str, Any]:
    """One task through both LMs (HFLM first when ``hf_first``)."""
    from lm_eval.models.huggingface import HFLM

    from ptqlab.eval.lm import PtqlabLM

    runs: dict[str, dict[str, Any]] = {}
    for who in ("hflm", "ptqlab") if hf_first else ("ptqlab", "hflm"):
        lm = (HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size) if who == "hflm"
              else PtqlabLM(model, tokenizer, batch_size=batch_size))
        runs[who] = _run(lm, task, limit, tm)
    a, b = runs["hflm"]["logliks"], runs["ptqlab"]["logliks"]
    delta = max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
    return {"items": runs["hflm"]["items"], "requests": len(a), "first": "hflm" if hf_first else "ptqlab",
            **{f"{who}_{k}": runs[who][k] for who in runs for k in ("seconds", "model_seconds", "acc")},
            "speedup": runs["hflm"]["seconds"] / runs["ptqlab"]["seconds"],
            "model_speedup": runs["hflm"]["model_seconds"] / runs["ptqlab"]["model_seconds"],
            "max_abs_delta_loglik": delta}


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt(rows: dict[str, dict[str, Any]]) -> str:
    """The table of the measured rows."""
    lines = ["| task | items | HFLM s | ptqlab s | speedup | speedup (loglikelihood only) | acc HFLM | acc ptqlab "
             "| max abs Δ loglik |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, r in rows.items():
        lines.append(f"| {task} | {r['items']} | {r['hflm_seconds']:.1f} | {r['ptqlab_seconds']:.1f} "
                     f"| {r['speedup']:.2f}x | {r['model_speedup']:.2f}x | {_acc(r['hflm_acc'])} "
                     f"| {_acc(r['ptqlab_acc'])} | {r['max_abs_delta_loglik']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=20, help="items per task")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks")
    p.add_argument("--model", default="smollm2-135m", help="model alias or path (ptqlab.load_model)")
    p.add_argument("--batch-size", type=int, default=1, help="the same for both LMs")
    p.add_argument("--threads", type=int, default=2, help="torch threads, fixed for both LMs")
    p.add_argument("--out", default="tasks-speed.json")
    args = p.parse_args()
    os.environ["PTQLAB_THREADS"] = str(args.threads)  # ptqlab's thread fitting off: both LMs at the same count
    torch.set_num_threads(args.threads)

    import ptqlab
    from ptqlab.eval.tasks import task_manager

    tasks = [t for t in args.tasks.split(",") if t]
    command = (f"python bench/bench_tasks.py --limit {args.limit} --tasks {','.join(tasks)} --model {args.model} "
               f"--batch-size {args.batch_size} --threads {args.threads}")
    out, meta, _ = open_results(args.out, command, limit=args.limit, tasks=tasks, model=args.model,
                                batch_size=args.batch_size, threads=args.threads)
    lm = ptqlab.load_model(args.model)
    rows: dict[str, dict[str, Any]] = {}
    with task_manager() as tm:
        for n, task in enumerate(tasks):
            rows[task] = run_task(lm.model, lm.tokenizer, task, args.limit, args.batch_size, tm, hf_first=n % 2 == 0)
            print(f"{task}: HFLM {rows[task]['hflm_seconds']:.1f} s, ptqlab {rows[task]['ptqlab_seconds']:.1f} s",
                  flush=True)
            out.write_text(json.dumps({"meta": meta, "tasks": rows}, indent=2))
    print(fmt(rows))


if __name__ == "__main__":
    main()
