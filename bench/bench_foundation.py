"""`make bench-foundation`: FP, RTN and GPTQ on SmolLM2-135M, and llm-compressor's GPTQ beside ours.

Every measured job runs in its own process (peak RSS is per process), reading the same token file:
calibration 128 x 512 from c4local (documents 1100-1999, seed 0) and the first 40 wikitext2 windows of 2048.

    python bench/bench_foundation.py                       # everything, table + bench/results/foundation.json
    python bench/bench_foundation.py --schemes w3_channel  # a subset
    python bench/bench_foundation.py --no-peer             # without llm-compressor
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PEER_PY = ROOT / ".venv-llmcompressor" / "bin" / "python"
SCHEMES = {
    "w4_channel": {"bits": 4, "granularity": "channel"},
    "w3_channel": {"bits": 3, "granularity": "channel"},
    "w4_g64": {"bits": 4, "granularity": "group", "group_size": 64},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_tokens(path: Path, samples: int, seqlen: int, windows: int) -> None:
    from safetensors.torch import save_file

    import ptqlab
    from ptqlab.data.calibration import calibration_windows
    from ptqlab.data.corpora import eval_windows

    lm = ptqlab.load_model("smollm2-135m")
    cal = calibration_windows(lm.tokenizer, "c4local", samples, seqlen, 0)
    ev = eval_windows("wikitext2", lm.tokenizer, 2048, windows).input_ids
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"calibration": cal.contiguous(), "eval": ev.contiguous()}, str(path))


def job_ptqlab(tokens: Path, method: str, scheme: str) -> dict:
    import torch
    from benchlib import perplexity_on
    from safetensors.torch import load_file

    import ptqlab
    from ptqlab.api import plan_quantization, run_quantization

    torch.set_num_threads(2)
    data = load_file(str(tokens))
    lm = ptqlab.load_model("smollm2-135m")
    out: dict = {"tool": "ptqlab", "method": method, "scheme": scheme}
    if method != "fp":
        plan = plan_quantization(lm.model, {"weight": SCHEMES[scheme]}, [{method: {}}], data["calibration"])
        t0 = time.perf_counter()
        report = run_quantization(lm.model, plan, progress=False)
        out["quant_seconds"] = time.perf_counter() - t0
        out["timings"] = report.timings
    out["peak_rss_quant_mb"] = peak_rss_mb()  # load + quantization, before the evaluation
    ppl, timings = perplexity_on(lm.model, lm.tokenizer, "wikitext2", data["eval"])
    out.update(ppl=ppl, eval_seconds=timings["eval.wikitext2_s"], eval_tok_per_s=timings["eval.wikitext2_tok_per_s"],
               peak_rss_mb=peak_rss_mb(), n_calibration=int(data["calibration"].shape[0]),
               n_eval=int(data["eval"].shape[0]), threads=torch.get_num_threads())
    return out


def job_forward(tokens: Path) -> dict:
    """One plain forward of the model over the calibration tokens, and bare vs ptqlab eval speed."""
    import torch
    from safetensors.torch import load_file

    import ptqlab
    from ptqlab.eval.perplexity import perplexity

    torch.set_num_threads(2)
    data = load_file(str(tokens))
    model = ptqlab.load_model("smollm2-135m").model
    cal, ev = data["calibration"], data["eval"][:4]
    with torch.inference_mode():
        t0 = time.perf_counter()
        for chunk in cal.split(8):
            model(input_ids=chunk, use_cache=False)
        calib_forward = time.perf_counter() - t0
        t0 = time.perf_counter()
        for row in ev.split(1):
            model(input_ids=row, use_cache=False)
        bare = time.perf_counter() - t0
    ours = perplexity(model, ev, batch_size=1, progress=False)
    return {"tool": "transformers", "calib_forward_seconds": calib_forward,
            "bare_eval_tok_per_s": ev.numel() / bare, "ptqlab_eval_tok_per_s": ours.tokens_per_second,
            "eval_windows_timed": int(ev.shape[0])}


def run_job(args: list[str], python: Path | str = sys.executable, script: Path | None = None) -> dict:
    out = RESULTS / "tmp" / f"job-{int(time.time() * 1000)}.json"
    cmd = [str(python), str(script or Path(__file__)), *args, "--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fmt_table(rows: list[dict], fwd: dict) -> str:
    head = "| scheme | tool / method | quantize s | peak RSS MB (load+quantize) | peak RSS MB (all) | wikitext2 ppl |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['tool']} {r['method']} | {_f(r.get('quant_seconds'), '.1f')} | "
                     f"{_f(r.get('peak_rss_quant_mb'), '.0f')} | {r['peak_rss_mb']:.0f} | {r['ppl']:.3f} |")
    by = {(r["scheme"], r["tool"], r["method"]): r for r in rows}
    lines += ["", "| scheme | time ptqlab / llm-compressor | peak RSS (load+quantize) ratio | "
              "ppl ptqlab GPTQ / llm-compressor GPTQ / RTN |", "|---|---|---|---|"]
    for s in SCHEMES:
        ours, peer = by.get((s, "ptqlab", "gptq")), by.get((s, "llm-compressor", "gptq"))
        rtn = by.get((s, "ptqlab", "rtn"))
        if ours and peer:
            mem = ours["peak_rss_quant_mb"] / peer["peak_rss_quant_mb"] if peer.get("peak_rss_quant_mb") else None
            lines.append(f"| {s} | {ours['quant_seconds'] / peer['quant_seconds']:.2f} | {_f(mem, '.2f')} | "
                         f"{ours['ppl']:.2f} / {peer['ppl']:.2f} / {rtn['ppl'] if rtn else float('nan'):.2f} |")
    if fwd:
        ratio = fwd["ptqlab_eval_tok_per_s"] / fwd["bare_eval_tok_per_s"]
        lines += ["", f"One plain forward over the calibration tokens (batch 8): {fwd['calib_forward_seconds']:.1f} s. "
                  f"Perplexity eval: ptqlab {fwd['ptqlab_eval_tok_per_s']:.0f} tok/s, bare transformers forward "
                  f"{fwd['bare_eval_tok_per_s']:.0f} tok/s (ratio {ratio:.2f}, {fwd['eval_windows_timed']} windows)."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--job", choices=["ptqlab", "forward"])
    p.add_argument("--method", default="gptq")
    p.add_argument("--scheme", default="w4_channel")
    p.add_argument("--tokens", type=Path, default=RESULTS / "tmp" / "tokens.safetensors")
    p.add_argument("--out", type=Path)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--redo", help="comma list of fp, forward, rtn:SCHEME, gptq:SCHEME: rerun only these ptqlab "
                   "jobs and replace their rows in bench/results/foundation.json (same token file)")
    args = p.parse_args()
    if args.job:
        res = job_ptqlab(args.tokens, args.method, args.scheme) if args.job == "ptqlab" else job_forward(args.tokens)
        args.out.write_text(json.dumps(res, indent=2))
        return
    if args.redo:
        redo(args.tokens, args.redo.split(","))
        return
    prepare_tokens(args.tokens, args.samples, 512, args.windows)
    schemes = [s for s in args.schemes.split(",") if s]
    rows = [run_job(["--job", "ptqlab", "--method", "fp", "--scheme", "fp", "--tokens", str(args.tokens)])]
    fwd = run_job(["--job", "forward", "--tokens", str(args.tokens)])
    for s in schemes:
        for m in ("rtn", "gptq"):
            rows.append(run_job(["--job", "ptqlab", "--method", m, "--scheme", s, "--tokens", str(args.tokens)]))
        if not args.no_peer:
            if not PEER_PY.exists():
                subprocess.run(["bash", str(ROOT / "bench/peers/setup_llmcompressor.sh")], check=True, cwd=ROOT)
            peer = run_job(["--tokens", str(args.tokens), "--scheme", s], PEER_PY,
                           ROOT / "bench/peers/llmcompressor_gptq.py")
            peer.setdefault("method", "gptq")
            rows.append(peer)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": "make bench-foundation", "samples": args.samples, "windows": args.windows}
    write_results(meta, rows, fwd)


def write_results(meta: dict, rows: list[dict], fwd: dict) -> None:
    table = fmt_table(rows, fwd)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "foundation.json").write_text(json.dumps({"meta": meta, "rows": rows, "forward": fwd}, indent=2))
    (RESULTS / "foundation.md").write_text(table + "\n")


def redo(tokens: Path, jobs: list[str]) -> None:
    """Rerun some ptqlab jobs of the last full run (e.g. after a fix) and replace their rows."""
    saved = json.loads((RESULTS / "foundation.json").read_text())
    rows, fwd = saved["rows"], saved["forward"]
    unknown = [j for j in jobs if j not in ("fp", "forward") and j.partition(":")[2] not in SCHEMES]
    if unknown:
        raise SystemExit(f"--redo: unknown jobs {unknown}; use fp, forward, rtn:SCHEME or gptq:SCHEME with SCHEME "
                         f"one of {', '.join(SCHEMES)}")
    for job in jobs:
        if job == "forward":
            fwd = run_job(["--job", "forward", "--tokens", str(tokens)])
            continue
        method, _, scheme = job.partition(":")
        new = run_job(["--job", "ptqlab", "--method", method, "--scheme", scheme or "fp", "--tokens", str(tokens)])
        rows = [new if (r["tool"], r["method"], r["scheme"]) == ("ptqlab", method, new["scheme"]) else r for r in rows]
    saved["meta"]["redone"] = {"jobs": jobs, "date": dt.date.today().isoformat()}
    write_results(saved["meta"], rows, fwd)


if __name__ == "__main__":
    main()
