"""`make bench-contention`: the same job alone and beside a busy core, for ZeroQuant-Local, GPTQ and perplexity.

A laptop's other programs take cores; ptqlab's torch work must slow down by about what the lost core
explains (at most about 2x on two cores), not collapse. Each job runs in a fresh process on SmolLM2-135M
and times its own phase (loading excluded):

- ``zq_local``: ZeroQuant-Local (W4 g64, 10 Adam steps) on decoder layer 0 (the others kept in FP; the layer
  loop stops after the last quantized layer), calibration 16 x 512 c4local in chunks of 8;
- ``gptq``: GPTQ W4 g64 on the linears of the first 6 decoder layers, calibration 16 x 512;
- ``ppl``: FP wikitext2 perplexity, 2 windows of 2048 tokens.

Each job runs ``--reps`` times alone and ``--reps`` times beside a competing process, in turn (alone, beside,
alone, beside ...): ``--competitor busy``, a Python busy loop on one core, or ``torch``, another torch
program (an MLP's forward and backward in a loop, torch's default threads), or ``ptqlab``, another ptqlab
process (SmolLM2-135M perplexity windows of 512 tokens in a loop). The table gives the median
seconds with min and max, and the slowdown (median beside / median alone). Results:
``bench/results/contention-<label>.json``.

    python bench/bench_contention.py --label after [--reps 3] [--jobs zq_local,gptq,ppl] [--competitor torch]

``JOB_THREADS=N`` fixes the jobs' torch threads (not the competitor's), for experiments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import open_results

JOBS = ("zq_local", "gptq", "ppl")
JOB_THREADS = os.environ.pop("JOB_THREADS", "")  # experiments: the job's thread count, not the competitor's
COMPETITORS = {
    # one core taken by a plain busy loop
    "busy": "while True: pass",
    # another torch program on the same two cores: a small MLP's forward and backward, in a loop
    "torch": ("import torch\nlin = torch.nn.Linear(576, 1536)\nx = torch.randn(2048, 576)\n"
              "while True:\n    lin(x).relu().sum().backward()"),
    # another ptqlab process: SmolLM2-135M perplexity windows, one after another
    "ptqlab": ("from ptqlab.eval.perplexity import perplexity\nfrom ptqlab.models.loading import load_model\n"
               "from ptqlab.data.corpora import eval_windows\nlm = load_model('smollm2-135m')\n"
               "ids = eval_windows('wikitext2', lm.tokenizer, 512, 1).input_ids\n"
               "while True:\n    perplexity(lm.model, ids, progress=False)"),
}


def _job(name: str) -> float:
    """Run one job in this process and return the seconds of its phase."""
    import logging

    from ptqlab.api import plan_quantization, run_quantization
    from ptqlab.data.corpora import eval_windows
    from ptqlab.eval.perplexity import perplexity
    from ptqlab.models.loading import load_model

    logging.basicConfig(level=logging.WARNING)
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    calibration = {"dataset": "c4local", "samples": 16, "seqlen": 512, "seed": 0, "batch_size": 8}
    weight = {"bits": 4, "granularity": "group", "group_size": 64}
    if name == "ppl":
        ids = eval_windows("wikitext2", tok, 2048, 2).input_ids
        t0 = time.perf_counter()
        perplexity(model, ids, progress=False)
        return time.perf_counter() - t0
    first = 6 if name == "gptq" else 1  # layers from this one on stay in FP
    later = {"match": rf"model\.layers\.([{first}-9]|[1-9][0-9])\..*", "weight": None}
    recipe = [{"gptq": {}}] if name == "gptq" else [{"zeroquant_local": {"steps": 10}}]
    plan = plan_quantization(model, {"weight": weight, "overrides": [later]}, recipe, calibration, tok)
    t0 = time.perf_counter()
    run_quantization(model, plan, progress=False)
    return time.perf_counter() - t0


def _timed(name: str, competitor: str | None) -> float:
    """Seconds of one job in a fresh process, alone or beside a competing process."""
    busy = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]]) if competitor else None
    try:
        env = {**os.environ, "BENCH_JOB_THREADS": JOB_THREADS} if JOB_THREADS else None
        out = subprocess.run([sys.executable, __file__, "--job", name], check=True, capture_output=True, text=True,
                             env=env)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def _summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def main() -> None:
    """Measure the jobs alone and beside a busy core; print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)
    p.add_argument("--label", default="now", help="results name: bench/results/contention-<label>.json")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--competitor", choices=tuple(COMPETITORS), default="busy")
    args = p.parse_args()
    if args.job:
        if os.environ.get("BENCH_JOB_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["BENCH_JOB_THREADS"]))
        print(json.dumps({"seconds": _job(args.job)}))
        return
    jobs = [j for j in args.jobs.split(",") if j]
    command = (f"python bench/bench_contention.py --label {args.label} --reps {args.reps} --jobs {','.join(jobs)} "
               f"--competitor {args.competitor}")
    out, meta, _ = open_results(f"contention-{args.label}.json", command, reps=args.reps, jobs=jobs,
                                competitor=args.competitor)
    meta["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "PTQLAB_THREADS")
                   if k in os.environ}
    rows: dict[str, Any] = {}
    for name in jobs:
        alone, beside = [], []
        for _ in range(args.reps):
            alone.append(_timed(name, None))
            beside.append(_timed(name, args.competitor))
        rows[name] = {"alone": _summary(alone), "beside_busy": _summary(beside),
                      "slowdown": statistics.median(beside) / statistics.median(alone),
                      "alone_s": alone, "beside_busy_s": beside}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\n{meta['date']}, {meta['machine']}, {args.reps} runs each: seconds median [min, max]")
    print(f"| {'job':<9} | {'alone':>22} | {'beside ' + args.competitor:>22} | slowdown |")
    print(f"|{'-' * 11}|{'-' * 24}|{'-' * 24}|{'-' * 10}|")
    for name, r in rows.items():
        cells = [f"{r[k]['median']:.1f} [{r[k]['min']:.1f}, {r[k]['max']:.1f}]" for k in ("alone", "beside_busy")]
        print(f"| {name:<9} | {cells[0]:>22} | {cells[1]:>22} | {r['slowdown']:7.2f}x |")
    print(f"\nwritten {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
