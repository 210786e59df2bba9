"""`make bench-coverage`: the survey's techniques on SmolLM2-135M, through the run path (`ptqlab run`'s Worker).

Part `outliers`: LLM.int8-style decomposition (input columns above 6.0 in FP16) at W8A8 against plain W8A8
and W4 (per channel; activations per token), with effective bits. Part `codebooks`: k-means codebooks
(`format: kmeans`) against the uniform INT grid at W3 and W4 per channel, with RTN (plain k-means), GPTQ
(rounding to the Hessian-weighted codebook) and SqueezeLLM (Hessian-weighted k-means alone). Quality is
wikitext2 perplexity over the first WINDOWS windows of 2048; calibration c4local 32 x 512. Part `emergent`:
qllm-eval's in-context learning curve and self-calibration on arc_easy (first TASK_LIMIT items, 0, 1 and 5
shots): accuracy and expected calibration error (10 bins) for FP, W8, W4, W3 (GPTQ per channel) and KV4
(per head). Every finished row is written to the results file with a hash of its configuration, ptqlab's
code and this script, so a killed run resumes, and a row measured by other code or another script version
is measured again.

    python bench/bench_coverage.py                   # all parts: coverage.json (+ coverage-emergent.json)
    python bench/bench_coverage.py --only codebooks  # one part
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from benchlib import RESULTS

WINDOWS = 8
TASK_LIMIT = 50
SHOTS = [0, 1, 5]
CH = {"granularity": "channel"}
TOK = {"granularity": "token"}
CAL = {"dataset": "c4local", "samples": 32, "seqlen": 512}
PARTS: dict[str, list[tuple[str, dict[str, Any], list[dict[str, Any]]]]] = {
    "outliers": [
        ("FP", {}, []),
        ("W8A8", {"weight": {"bits": 8, "symmetric": True, **CH}, "activation": {"bits": 8, **TOK}}, [{"rtn": {}}]),
        ("W8A8 + outliers > 6 (LLM.int8)", {"weight": {"bits": 8, "symmetric": True, **CH},
                                            "activation": {"bits": 8, **TOK}, "outliers": {"threshold": 6.0}},
         [{"rtn": {}}]),
        ("W4A8", {"weight": {"bits": 4, **CH}, "activation": {"bits": 8, **TOK}}, [{"rtn": {}}]),
        ("W4A8 + outliers > 6", {"weight": {"bits": 4, **CH}, "activation": {"bits": 8, **TOK},
                                 "outliers": {"threshold": 6.0}}, [{"rtn": {}}]),
        ("W4", {"weight": {"bits": 4, **CH}}, [{"rtn": {}}]),
    ],
    "codebooks": [
        (f"{grid} W{bits} {method}", {"weight": {"bits": bits, **({"format": "kmeans"} if grid == "kmeans" else CH)}},
         [{method.lower(): {}}])
        for bits in (4, 3) for grid in ("INT", "kmeans") for method in ("RTN", "GPTQ")
    ] + [(f"kmeans W{bits} SqueezeLLM", {"weight": {"bits": bits, "format": "kmeans"}}, [{"squeezellm": {}}])
         for bits in (4, 3)],
    "emergent": [
        ("FP", {}, []),
        ("W8", {"weight": {"bits": 8, **CH}}, [{"rtn": {}}]),
        ("W4", {"weight": {"bits": 4, **CH}}, [{"gptq": {}}]),
        ("W3", {"weight": {"bits": 3, **CH}}, [{"gptq": {}}]),
        ("KV4", {"kv_cache": {"bits": 4}}, []),
    ],
}
TASKS = {"tasks": ["arc_easy"], "num_fewshot": SHOTS, "limit": TASK_LIMIT}


def _config(scheme: dict[str, Any], recipe: list[dict[str, Any]], tasks: bool = False) -> dict[str, Any]:
    evaluate = TASKS if tasks else {"perplexity": ["wikitext2"], "seqlen": 2048, "max_windows": WINDOWS}
    return {"model": "smollm2-135m", "device": "cpu", "scheme": scheme, "recipe": recipe, "calibration": CAL,
            "evaluate": evaluate}


def run_row(worker: Any, label: str, scheme: dict[str, Any], recipe: list[dict[str, Any]],
            tasks: bool = False) -> dict[str, Any]:
    """One configuration through the Worker: its perplexity (or task curve), effective bits and times."""
    from ptqlab.study.config import parse_config

    config = _config(scheme, recipe, tasks)
    record = worker.run(parse_config(config))
    if record.status != "done":
        raise RuntimeError(f"{label}: {record.error}")
    metrics = {m.name: m.value for m in record.metrics}
    row = {"label": label, "run_id": record.id, "measured": _measured(config),
           "bits.weight": metrics.get("bits.weight", 16.0), "bits.activation": metrics.get("bits.activation"),
           "bits.kv": metrics.get("bits.kv"),
           "quantize_s": record.timings.get("quantize_s", 0.0)}
    if tasks:
        for k in SHOTS:
            row[f"acc.{k}"] = metrics[f"lm_eval.arc_easy.acc.fewshot{k}"]
            row[f"ece.{k}"] = metrics[f"lm_eval.arc_easy.ece.fewshot{k}"]
    else:
        row["ppl"] = metrics[f"ppl.wikitext2.s2048.w{WINDOWS}"]
    return row


def _measured(config: dict[str, Any]) -> str:
    """What a row was measured with: its configuration, ptqlab's code and this script (a row is reused only
    when all three are the same; otherwise it is measured again)."""
    from ptqlab.store import code_fingerprint

    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    h.update(code_fingerprint().encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def curve_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy and ECE of arc_easy per few-shot count."""
    head = " | ".join(f"acc {k}-shot" for k in SHOTS) + " | " + " | ".join(f"ECE {k}-shot" for k in SHOTS)
    lines = [f"| configuration | {head} |", "|---" * (1 + 2 * len(SHOTS)) + "|"]
    for r in rows:
        cells = [f"{r[f'acc.{k}']:.3f}" for k in SHOTS] + [f"{r[f'ece.{k}']:.3f}" for k in SHOTS]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| configuration | wikitext2 ppl | bits/weight | bits/activation | quantize s |", "|---|---|---|---|---|"]
    for r in rows:
        act = "-" if r["bits.activation"] is None else f"{r['bits.activation']:.3f}"
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {r['bits.weight']:.3f} | {act} | {r['quantize_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    from ptqlab.study.worker import Worker

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(PARTS), help="one part")
    p.add_argument("--out", help="results file under bench/results (default: coverage.json, and "
                   "coverage-emergent.json for the emergent part)")
    args = p.parse_args()
    torch.set_num_threads(2)
    worker = Worker(progress=False)
    command = " ".join(["python", "bench/bench_coverage.py", *sys.argv[1:]])
    for part, rows in PARTS.items():
        if args.only and part != args.only:
            continue
        path = RESULTS / (args.out or ("coverage-emergent.json" if part == "emergent" else "coverage.json"))
        saved = json.loads(path.read_text()) if path.is_file() else {"parts": {}}
        kept = {r["label"]: r for r in saved["parts"].get(part, [])}
        labels = {label for label, _, _ in rows}
        done: list[dict[str, Any]] = []
        for label, scheme, recipe in rows:
            old = kept.get(label)
            tasks = part == "emergent"
            if old is None or old.get("measured") != _measured(_config(scheme, recipe, tasks)):
                old = run_row(worker, label, scheme, recipe, tasks=tasks)
            done.append(old)
            later = [r for lbl, r in kept.items() if lbl in labels and lbl not in {d["label"] for d in done}]
            saved["parts"][part] = done + later  # a killed run keeps the rows it has not reached yet
            saved["meta"] = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, "
                             f"{os.cpu_count()} cores", "command": command}
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=2))
        print(f"\n{part}\n\n{curve_table(done) if part == 'emergent' else table(done)}")


if __name__ == "__main__":
    main()
