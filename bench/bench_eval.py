"""`make bench-eval`: evaluation beyond perplexity on SmolLM2-135M (lm-eval tasks, divergence, long context).

Parts (each finished row is appended to bench/results/eval.json, so a killed run resumes where it stopped):

1. ``tasks``: lambada_openai, piqa, arc_easy, arc_challenge and hellaswag_local (limit 300 each, zero-shot)
   on FP and on W8, W4, W3 (RTN, groups of 64), W8A8 (+ per-token asymmetric activations), KV4 and KV2
   (groups of 64): accuracy with its standard error, paired measures against FP on the same items
   (agreement with FP's choice, correct answers lost / gained), KL(FP || Q) with top-1 / top-5 agreement
   on 16 windows of 512 wikitext2 tokens, and perplexity on the same windows.
2. ``long``: pass-key retrieval (4 records) at 512, 1k, 2k, 4k and 8k tokens x 10 samples for FP, KV8,
   KV4 and KV2 (8k = 8184 prompt tokens + 8 answer tokens, SmolLM2's whole context of 8192).
3. ``speed``: one task through ptqlab's path against lm-eval's ``simple_evaluate`` alone on the same FP
   model and the same task definition, alternating (ratio).

    python bench/bench_eval.py                         # everything (about two hours on 2 CPU cores)
    python bench/bench_eval.py --only tasks:FP,tasks:W4 --limit 50 --out eval-smoke.json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import RESULTS, open_results

TASKS = ("lambada_openai", "piqa", "arc_easy", "arc_challenge", "hellaswag_local")
G64 = {"granularity": "group", "group_size": 64}
A8 = {"bits": 8, "granularity": "token", "symmetric": False}
CONFIGS: dict[str, dict[str, Any]] = {
    "FP": {},
    "W8": {"weight": {"bits": 8, **G64}},
    "W4": {"weight": {"bits": 4, **G64}},
    "W3": {"weight": {"bits": 3, **G64}},
    "W8A8": {"weight": {"bits": 8, **G64}, "activation": A8},
    "KV8": {"kv_cache": {"bits": 8, **G64}},
    "KV4": {"kv_cache": {"bits": 4, **G64}},
    "KV2": {"kv_cache": {"bits": 2, **G64}},
}
TASK_CONFIGS = ("FP", "W8", "W4", "W3", "W8A8", "KV4", "KV2")
LONG_CONFIGS = ("FP", "KV8", "KV4", "KV2")
LENGTHS = (512, 1024, 2048, 4096, 8184)
PAIRS = 4
SPEED_TASK = "arc_easy"


def _quantized(name: str) -> Any:
    """A fresh SmolLM2 with config ``name`` installed (RTN; no calibration needed)."""
    import ptqlab
    from ptqlab.api import quantize

    lm = ptqlab.load_model("smollm2-135m")
    if CONFIGS[name]:
        quantize(lm.model, CONFIGS[name], progress=False)
    lm.model.eval()
    return lm


def run_tasks_row(name: str, limit: int, batch_size: int) -> dict[str, Any]:
    """Tasks, paired measures, divergence and perplexity of one config, through ptqlab's one evaluation path."""
    from ptqlab.eval import build_reference, evaluate, plan_evaluation
    from ptqlab.metrics import divergence_name, perplexity_name, task_name
    from ptqlab.schema import Evaluate

    config = Evaluate(perplexity=["wikitext2"], seqlen=512, max_windows=16, tasks=list(TASKS), limit=limit,
                      batch_size=batch_size, divergence=True, sample=None, sensitivity=None)
    lm = _quantized("FP")
    plan = plan_evaluation(config, lm.tokenizer, lm.model)
    ref = build_reference(lm.model, lm.tokenizer, plan, fingerprint=lm.info.fingerprint, progress=False)
    if name != "FP":
        lm = _quantized(name)
    t0 = time.perf_counter()
    result = evaluate(lm.model, lm.tokenizer, plan, ref, progress=False)
    m = {x.name: (x.value, x.stderr) for x in result.metrics}
    tasks = {}
    for t in TASKS:
        measures = {k.rsplit(".", 1)[1]: v for k, v in m.items() if k.startswith(task_name(t, ""))}
        paired = {k: measures.pop(k)[0] for k in ("agree_fp", "lost", "gained")}
        tasks[t] = {"metrics": {k: list(v) for k, v in measures.items()}, **paired}
    kl = {kind: m[divergence_name(kind, "wikitext2", 512, 16)][0] for kind in ("kl", "top1", "top5")}
    return {"config": name, "scheme": CONFIGS[name], "tasks": tasks, "tasks_s": result.timings.get("lm_eval_s"),
            "fp_tasks_s": ref.timings.get("lm_eval.fp_s") if "tasks" in ref.computed else None,
            "eval_s": time.perf_counter() - t0, **kl, "kl_tokens": 16 * 512,
            "ppl": m[perplexity_name("wikitext2", 512, 16)][0]}


def _evaluate_only(lm: Any, **section: Any) -> Any:
    """One evaluation of ``lm`` through ptqlab's one path, with only the given ``evaluate`` keys (no FP reference)."""
    from ptqlab.eval import evaluate, plan_evaluation
    from ptqlab.schema import Evaluate

    config = Evaluate.model_validate({"perplexity": [], "sample": None, "sensitivity": None, **section})
    return evaluate(lm.model, lm.tokenizer, plan_evaluation(config, lm.tokenizer, lm.model), progress=False)


def run_long_row(name: str, samples: int, lengths: tuple[int, ...]) -> dict[str, Any]:
    """Retrieval accuracy by length of one config."""
    from ptqlab.metrics import retrieval_name

    lm = _quantized(name)
    row: dict[str, Any] = {"config": name, "acc": {}, "seconds": {}, "answers": {}}
    for length in lengths:
        long_context = {"lengths": [length], "samples": samples, "seed": 0, "pairs": PAIRS}
        result = _evaluate_only(lm, long_context=long_context)
        metric = retrieval_name(length, PAIRS, samples)
        row["acc"][str(length)] = result.metrics[0].value
        row["seconds"][str(length)] = result.timings[f"retrieval.len{length}_s"]
        row["answers"][str(length)] = json.loads(result.texts[metric])
        print(f"  {name} len {length}: {row['acc'][str(length)]:.2f} ({row['seconds'][str(length)]:.0f} s)",
              flush=True)
    return row


def run_speed(limit: int, batch_size: int) -> dict[str, Any]:
    """Seconds of one task through ptqlab's evaluation and through lm-eval alone, same model, alternating."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    import ptqlab
    from ptqlab.eval.tasks import task_manager
    from ptqlab.metrics import task_name

    lm = ptqlab.load_model("smollm2-135m")
    times: dict[str, float] = {}
    accs: dict[str, float] = {}
    for who in ("ptqlab", "lm_eval"):
        t0 = time.perf_counter()
        if who == "ptqlab":
            res = _evaluate_only(lm, tasks=[SPEED_TASK], limit=limit, batch_size=batch_size)
            accs[who] = next(m.value for m in res.metrics if m.name == task_name(SPEED_TASK, "acc"))
        else:
            hf = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
            with task_manager() as tm:
                out = simple_evaluate(model=hf, tasks=[SPEED_TASK], limit=limit, task_manager=tm)
            accs[who] = out["results"][SPEED_TASK]["acc,none"]
        times[who] = time.perf_counter() - t0
    return {"task": SPEED_TASK, "limit": limit, "seconds": times, "acc": accs,
            "ratio": times["ptqlab"] / times["lm_eval"]}


def _cell(task: dict[str, Any]) -> str:
    value, err = task["metrics"]["acc"]
    return f"{value * 100:.1f} ± {err * 100:.1f}" if err is not None else f"{value * 100:.1f}"


def fmt_tasks(rows: dict[str, Any]) -> str:
    head = "| config | " + " | ".join(TASKS) + " | mean acc | agree FP | lost | gained | KL | top-1 | top-5 | ppl |"
    lines = [head, "|" + "---|" * (len(TASKS) + 9)]
    for name in TASK_CONFIGS:
        if name not in rows:
            continue
        r = rows[name]
        ts = [r["tasks"][t] for t in TASKS]
        mean = sum(t["metrics"]["acc"][0] for t in ts) / len(ts)
        pair = {k: sum(t.get(k, 0.0) for t in ts) / len(ts) for k in ("agree_fp", "lost", "gained")}
        lines.append(f"| {name} | " + " | ".join(_cell(t) for t in ts) + f" | {mean * 100:.1f} | "
                     f"{pair['agree_fp'] * 100:.1f} | {pair['lost'] * 100:.1f} | {pair['gained'] * 100:.1f} | "
                     f"{r['kl']:.4f} | {r['top1'] * 100:.1f} | {r['top5'] * 100:.1f} | {r['ppl']:.3f} |")
    return "\n".join(lines)


def fmt_long(rows: dict[str, Any]) -> str:
    lines = ["| config | " + " | ".join(str(n) for n in LENGTHS) + " |", "|" + "---|" * (len(LENGTHS) + 1)]
    for name in LONG_CONFIGS:
        if name in rows:
            acc = rows[name]["acc"]
            cells = [f"{acc[str(n)] * 100:.0f}%" if str(n) in acc else "-" for n in LENGTHS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma list of tasks:CONFIG / long:CONFIG / speed")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma list of prompt lengths")
    p.add_argument("--out", default="eval.json")
    args = p.parse_args()
    torch.set_num_threads(2)

    out, meta, saved = open_results(args.out, "python bench/bench_eval.py", limit=args.limit,
                                    samples=args.samples, batch_size=args.batch_size)
    data: dict[str, Any] = {"meta": meta, "tasks": saved.get("tasks", {}), "long": saved.get("long", {}),
                            "speed": saved.get("speed")}
    parts = (args.only.split(",") if args.only else
             [f"tasks:{c}" for c in TASK_CONFIGS] + [f"long:{c}" for c in LONG_CONFIGS] + ["speed"])
    for part in parts:
        kind, _, name = part.partition(":")
        if kind == "tasks" and name not in data["tasks"]:
            data["tasks"][name] = run_tasks_row(name, args.limit, args.batch_size)
        elif kind == "long" and name not in data["long"]:
            data["long"][name] = run_long_row(name, args.samples, tuple(int(n) for n in args.lengths.split(",")))
        elif kind == "speed" and (data["speed"] is None or args.only):
            data["speed"] = run_speed(args.limit, args.batch_size)
        else:
            continue
        out.write_text(json.dumps(data, indent=2))
        print(f"{part}: done", flush=True)
    text = fmt_tasks(data["tasks"]) + "\n\nPass-key retrieval accuracy by prompt length:\n\n" + fmt_long(data["long"])
    if data["speed"]:
        s = data["speed"]
        text += (f"\n\nlm-eval speed ({s['task']}, limit {s['limit']}): ptqlab {s['seconds']['ptqlab']:.1f} s, "
                 f"lm-eval alone {s['seconds']['lm_eval']:.1f} s (ratio {s['ratio']:.2f}).")
    print(text)
    (RESULTS / Path(args.out).with_suffix(".md").name).write_text(text + "\n")


if __name__ == "__main__":
    main()
