"""`make bench-cost`: llama.cpp's quantize table on SmolLM2-135M, ptqlab's codes beside llama-quantize's.

Each step resumes what an earlier run left:

1. The built-in study ``configs/studies/gguf-table.yaml`` into a store (``--store``, default
   ``bench/results/tmp/cost.db``; ``ptqlab sweep ... --retry-failed``): FP written as F32 and F16, and Q8_0,
   Q5_1, Q5_0, Q4_1, Q4_0 and "Q4_K" (Q4_K on ``down_proj``, the only linears whose width is whole 256-column
   super-blocks, Q5_0 on the rest) made by ptqlab with RTN and GPTQ (AWQ's runs cannot be written as GGUF: see
   the study's header). Every run stores its wikitext2 perplexity, the KL statistics against FP on the same
   windows, and the speed of the GGUF file it wrote of itself in llama.cpp (``speed.llama_cpp.pp512`` /
   ``.tg128``, ``size.file.gguf``). Each type's RTN run is exported again by ``ptqlab export`` (the bytes the
   run timed: checked) for its bits per weight and the interleaved timing (4).
2. llama.cpp's side: the stored FP run exported to an F32 GGUF by ``ptqlab export`` (llama-quantize's source),
   the study's calibration windows (its ``calibration``: c4local documents 1100-1999, 32 windows of 512 tokens
   drawn with seed 0 by ptqlab's ``calibration_windows``) decoded with the model's tokenizer and concatenated
   in order into ``calibration.txt``; ``llama-imatrix -f calibration.txt -c 512 -b 512 --chunks 32`` on the
   F32 file (llama.cpp tokenizes the text again: whether it gets the windows' tokens is recorded); then
   ``llama-quantize`` from the F32 file to each type, without and with that importance matrix, with its
   default mixes (a tied embedding is quantized as the output tensor, Q6_K, which falls back to Q8_0 at width
   576; with an importance matrix Q4_0 / Q5_0 put the first 3 ``ffn_down`` in Q4_1 / Q5_1; Q8_0 and F16 ignore
   an importance matrix, so they have no imatrix row).
3. Each llama.cpp file measured by the same code as the study's runs: loaded by ptqlab (a ``.gguf`` path:
   transformers dequantizes it), evaluated by ``ptqlab.evaluate`` with the study's ``evaluate`` section
   (without ``speed``) against ``ptqlab.reference`` of the original FP model on the same windows, with the FP
   model's tokenizer (the same vocabulary), and timed by ``ptqlab.eval.speed.llama_cpp_speed`` with the
   study's speed settings. The F32 export itself is measured too (its KL must be 0: a check of the path).
4. Every distinct file layout (tensor types) timed again in one stretch, ``--interleave`` rounds round-robin
   (one warm-up and one timed run each), so that a shared machine's drift falls on all files alike: the
   ratios to F32 come from this table. Then the markdown tables, and everything in
   ``bench/results/cost-smollm2.json``.

Bits per weight are llama.cpp's (``llama_model_loader``: tensor data bytes x 8 / elements of all tensors in the
file, the tied embedding counted once), read from each file with gguf-py (ptqlab's F16 row, whose file is not
kept: its ``size.file.gguf`` minus the header bytes of the F32 export, the same tokenizer and tensor list). MiB
is the file's bytes / 2^20.

    python bench/bench_cost.py                               # everything (about 2 h on two busy cores)
    python bench/bench_cost.py --skip-sweep                  # from the study as the store has it
    python bench/bench_cost.py --table                       # print the tables of the saved results
    python bench/bench_cost.py --set evaluate.max_windows=8 --set evaluate.divergence.windows=8   # reduced

Needs ``llama-quantize`` and ``llama-imatrix`` (``--llama-bin DIR``; ``--help`` says how to build them) and
llama-cpp-python (``pip install -e '.[llamacpp]'``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STUDY = ROOT / "configs" / "studies" / "gguf-table.yaml"
OUT = RESULTS / "cost-smollm2.json"
PTQLAB = str(Path(sys.executable).parent / "ptqlab")
DEFAULT_STORE = RESULTS / "tmp" / "cost.db"
DEFAULT_WORK = RESULTS / "tmp" / "cost"
DEFAULT_BIN = "/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
BUILD = """llama-quantize and llama-imatrix are built from the llama.cpp that llama-cpp-python vendors:
    .venv/bin/pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    cd /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release
    nice cmake --build build --target llama-quantize llama-imatrix -j1     # build/bin/llama-quantize ...
then: python bench/bench_cost.py --llama-bin /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"""
MIB = 2.0**20

TYPES = ["F32", "F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q4_K"]
"""The table's types, in llama.cpp's order (its quantize README lists F16 first, then by size)."""
MAKERS = ["ptqlab RTN", "ptqlab GPTQ", "ptqlab AWQ", "ptqlab", "llama-quantize", "llama-quantize + imatrix"]
# llama.cpp's rows: (table type, llama-quantize ftype, with an importance matrix). Q8_0 and F16 ignore one.
LLAMA_ROWS: list[tuple[str, str, bool]] = [
    ("F16", "F16", False), ("Q8_0", "Q8_0", False),
    ("Q5_1", "Q5_1", False), ("Q5_1", "Q5_1", True), ("Q5_0", "Q5_0", False), ("Q5_0", "Q5_0", True),
    ("Q4_1", "Q4_1", False), ("Q4_1", "Q4_1", True), ("Q4_0", "Q4_0", False), ("Q4_0", "Q4_0", True),
    ("Q4_K", "Q4_K_S", False), ("Q4_K", "Q4_K_S", True), ("Q4_K", "Q4_K_M", False), ("Q4_K", "Q4_K_M", True),
]
METHODS = {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ"}


# ----------------------------------------------------------------------------------------------- helpers


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_logged(cmd: list[str], log: Path, commands: list[dict[str, Any]]) -> str:
    """Run a command (niced), keep its output in ``log``, record it; fail loudly with its tail."""
    t0 = time.perf_counter()
    proc = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, check=False)
    text = proc.stdout + proc.stderr
    log.write_text(text)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    commands.append({"command": shlex.join(cmd), "seconds": round(seconds, 1), "log": str(log)})
    print(f"  {seconds:.1f} s: {shlex.join(cmd)}", flush=True)
    return text


def gguf_stats(path: Path) -> dict[str, Any]:
    """What a GGUF file holds, counted as llama.cpp counts it: elements, tensor bytes, BPW, types, header bytes."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    elements = sum(int(t.n_elements) for t in reader.tensors)
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    types: dict[str, int] = {}
    linears: dict[str, dict[str, int]] = {}
    embedding = None
    for t in reader.tensors:
        name = t.tensor_type.name
        types[name] = types.get(name, 0) + 1
        if t.name == "token_embd.weight":
            embedding = name
        m = re.match(r"blk\.\d+\.(\w+)\.weight$", t.name)
        if m and len(t.shape) == 2:
            linears.setdefault(m.group(1), {})
            linears[m.group(1)][name] = linears[m.group(1)].get(name, 0) + 1
    size = path.stat().st_size
    return {"file_bytes": size, "tensor_bytes": tensor_bytes, "elements": elements,
            "header_bytes": int(reader.data_offset), "bpw": tensor_bytes * 8 / elements, "types": types,
            "linears": linears, "token_embd": embedding}


def metric_map(metrics: Any) -> dict[str, dict[str, float | None]]:
    return {m.name: {"value": m.value, "stderr": m.stderr} for m in metrics}


def pick(metrics: dict[str, dict[str, float | None]], prefix: str) -> dict[str, float | None] | None:
    """The one metric whose name starts with ``prefix`` (``ppl.wikitext2.`` ...), or None."""
    found = [v for k, v in metrics.items() if k.startswith(prefix)]
    return found[0] if len(found) == 1 else None


def protocol_names(evaluate: Any) -> dict[str, str]:
    """The metric names the study's protocol gives (perplexity, KL, p99, top-1, speed)."""
    from ptqlab.metrics import divergence_name, perplexity_name, speed_name

    corpus = evaluate.perplexity[0]
    div = evaluate.divergence
    speed = evaluate.speed
    return {
        "ppl": perplexity_name(corpus, evaluate.seqlen, evaluate.max_windows),
        "kl": divergence_name("kl", div.corpus, div.seqlen, div.windows),
        "kl_p99": divergence_name("kl_p99", div.corpus, div.seqlen, div.windows),
        "top1": divergence_name("top1", div.corpus, div.seqlen, div.windows),
        "pp": speed_name("llama_cpp", "pp", speed.prompt),
        "tg": speed_name("llama_cpp", "tg", speed.generate),
        "file": "size.file.gguf",
        "peak": "memory.llama_cpp.peak",
    }


def versions(llama_bin: Path | None) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {"python": platform.python_version()}
    for pkg in ("ptqlab", "torch", "transformers", "gguf", "llama_cpp_python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False)
    out["ptqlab_git"] = git.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    if llama_bin is not None and (llama_bin / "llama-quantize").exists():
        proc = subprocess.run([str(llama_bin / "llama-quantize"), "--version"], capture_output=True, text=True,
                              check=False)
        m = re.search(r"version:\s*(\S+)\s*\((\w+)\)", proc.stdout + proc.stderr)
        out["llama.cpp"] = f"{m.group(1)} ({m.group(2)})" if m else "unknown"
    return out


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


# ----------------------------------------------------------------------------------------------- the study


def run_study(store: Path, sets: list[str], commands: list[dict[str, Any]]) -> float:
    """``ptqlab sweep`` of the study into ``store`` (what is missing; failed runs again). Its wall seconds."""
    cmd = [PTQLAB, "sweep", str(STUDY.relative_to(ROOT)), "--store", str(store), "--retry-failed"]
    for s in sets:
        cmd += ["--set", s]
    print(f"study: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
    seconds = time.perf_counter() - t0
    commands.append({"command": shlex.join(cmd), "seconds": round(seconds, 1), "returncode": proc.returncode})
    print(f"study: {seconds:.0f} s (exit {proc.returncode})", flush=True)
    return seconds


def row_of(config: dict[str, Any]) -> tuple[str, str]:
    """(type, maker) of a study run from its configuration."""
    scheme = config.get("scheme") or {}
    weight = scheme.get("weight")
    if weight is None:
        return str(config["evaluate"]["speed"]["float_type"]).upper(), "ptqlab"
    overrides = scheme.get("overrides") or []
    if any((o.get("weight") or {}).get("format") == "gguf_q4_k" for o in overrides):
        kind = "Q4_K"
    else:
        kind = str(weight["format"]).removeprefix("gguf_").upper()
    methods = [next(iter(step)) for step in config.get("recipe") or []]
    method = next((METHODS[m] for m in methods if m in METHODS), "RTN")
    return kind, f"ptqlab {method}"


def protocol_key(config: dict[str, Any]) -> str:
    """What decides a study row's numbers: the model, weights, recipe, calibration and the measures' settings.

    Run ids hash the whole normalized configuration, so a field another version of ptqlab adds (with its
    default) changes every id; a stored run with the same key measured the same thing.
    """
    scheme = config.get("scheme") or {}
    weight = scheme.get("weight")
    cal = config.get("calibration") or {}
    ev = config.get("evaluate") or {}
    return json.dumps({
        "model": config.get("model"), "dtype": config.get("dtype"),
        "weight": None if weight is None else weight.get("format"),
        "overrides": [(o.get("match"), (o.get("weight") or {}).get("format")) for o in scheme.get("overrides") or []],
        "recipe": config.get("recipe"),
        "calibration": {k: cal.get(k) for k in ("dataset", "samples", "seqlen", "seed", "path")},
        "evaluate": {k: ev.get(k) for k in ("perplexity", "seqlen", "max_windows", "divergence", "speed")},
    }, sort_keys=True)


def study_rows(store_path: Path, sweep: Any, names: dict[str, str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The study's runs as table rows, and those not done.

    Each planned run by its id; where that id is not done, the newest done run in the store with the same
    :func:`protocol_key` (recorded as ``matched_by``), since another version of ptqlab may have changed the ids.
    """
    from ptqlab.store import Store
    from ptqlab.study.sweeper import plan_sweep

    store = Store(store_path)
    by_key: dict[str, Any] = {}
    for rec in store.list_runs(status="done"):  # oldest first: the newest wins
        by_key[protocol_key(rec.config)] = rec
    rows, missing = [], []
    for planned in plan_sweep(sweep, store).runs:
        rec, matched = store.get(planned.run_id), "run id"
        if rec is None or rec.status != "done":
            found = by_key.get(protocol_key(planned.config))
            if found is None:
                missing.append(planned.run_id if rec is None else
                               f"{rec.id} ({rec.status}: {(rec.error or '')[:200]})")
                continue
            rec, matched = store.get(found.id), f"protocol (planned id {planned.run_id})"
        assert rec is not None
        kind, maker = row_of(rec.config)
        metrics = metric_map(rec.metrics)
        rows.append({"type": kind, "maker": maker, "run_id": rec.id, "matched_by": matched, "metrics": metrics,
                     "timings": rec.timings, "scheme": rec.config.get("scheme"), "recipe": rec.config.get("recipe"),
                     "versions": rec.versions, "git_rev": rec.git_rev, "created_at": rec.created_at,
                     "file_bytes": (metrics.get(names["file"]) or {}).get("value")})
    return rows, missing


# ----------------------------------------------------------------------------------------------- llama.cpp


def calibration_text(tokenizer: Any, cal: Any, path: Path) -> tuple[Any, dict[str, Any]]:
    """The study's calibration windows decoded and concatenated in order into ``path`` (llama-imatrix's input)."""
    from ptqlab.data.calibration import calibration_windows

    windows = calibration_windows(tokenizer, cal.dataset, cal.samples, cal.seqlen, cal.seed, cal.path)
    text = "".join(tokenizer.decode(w.tolist()) for w in windows)
    path.write_text(text, encoding="utf-8")
    retokenized = len(tokenizer(text, add_special_tokens=False).input_ids)
    return windows, {"dataset": cal.dataset, "samples": cal.samples, "seqlen": cal.seqlen, "seed": cal.seed,
                     "tokens": int(windows.numel()), "retokenized": retokenized, "chars": len(text),
                     "file": str(path)}


def imatrix(bins: Path, f32: Path, text: Path, work: Path, cal: Any, threads: int, windows: Any,
            commands: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """llama-imatrix on the calibration text (kept: a rerun reuses ``imatrix.gguf``), and what it saw."""
    from llama_cpp import Llama

    out, log_path = work / "imatrix.gguf", work / "imatrix.log"
    cmd = [str(bins / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(out), "-c", str(cal.seqlen),
           "-b", str(cal.seqlen), "--chunks", str(cal.samples), "-t", str(threads), "--output-frequency", "1000"]
    if out.exists() and log_path.exists() and "Final estimate" in log_path.read_text():
        log = log_path.read_text()
        print(f"  kept {out} (its log: {log_path})", flush=True)
    else:
        log = run_logged(cmd, log_path, commands)
    info: dict[str, Any] = {"file": str(out), "command": shlex.join(cmd)}
    # the tokens llama.cpp cuts into chunks: its own tokenization of the text, against ptqlab's windows
    vocab = Llama(model_path=str(f32), vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.read_bytes(), add_bos=False, special=False)
    adds_bos = len(vocab.tokenize(b"a", add_bos=True)) > len(vocab.tokenize(b"a", add_bos=False))
    ours = windows.flatten().tolist()
    info.update({"llama_tokens": len(ids), "same_tokens_as_windows": ids[: len(ours)] == ours,
                 "bos_per_chunk": adds_bos})
    m = re.search(r"computing over (\d+) chunks", log)
    if m:
        info["chunks"] = int(m.group(1))
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    if m:
        info["calibration_ppl"] = [float(m.group(1)), float(m.group(2))]
    return out, info


def quantize(bins: Path, f32: Path, ftype: str, with_imatrix: Path | None, work: Path, threads: int,
             commands: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    tag = f"{ftype}{'-imatrix' if with_imatrix else ''}"
    out = work / f"llama-{tag}.gguf"
    cmd = [str(bins / "llama-quantize")]
    if with_imatrix is not None:
        cmd += ["--imatrix", str(with_imatrix)]
    cmd += [str(f32), str(out), ftype, str(threads)]
    log = run_logged(cmd, work / f"llama-{tag}.log", commands)
    info: dict[str, Any] = {"command": shlex.join(cmd)}
    m = re.search(r"quant size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)", log)
    if m:
        info["llama_quant_mib"], info["llama_quant_bpw"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log)
    info["fallbacks"] = int(m.group(1)) if m else 0
    return out, info


def measure_file(path: Path, fp_tokenizer: Any, ev: Any, ref: Any, speed: Any) -> dict[str, Any]:
    """A GGUF file's quality through ptqlab (loaded, dequantized) against the FP reference, and its speed."""
    import ptqlab
    from ptqlab.eval.speed import llama_cpp_speed
    from ptqlab.models.loading import gguf_cache_dir, load_model

    t0 = time.perf_counter()
    sample = llama_cpp_speed(path, prompt=speed.prompt, generate=speed.generate, repeats=speed.repeats,
                             threads=speed.threads)
    speed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lm = load_model(str(path))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = ptqlab.evaluate(lm.model, fp_tokenizer, ev, reference=ref, progress=False)
    eval_s = time.perf_counter() - t0
    cache = gguf_cache_dir(lm.info.fingerprint)
    del lm
    shutil.rmtree(cache, ignore_errors=True)  # the dequantized float32 copy (540 MB each)
    metrics = metric_map(result.metrics) | metric_map(sample.metrics())
    return {"metrics": metrics, "pp_repeats": list(sample.pp), "tg_repeats": list(sample.tg),
            "timings": {"speed_s": speed_s, "load_s": load_s, "evaluate_s": eval_s}}


# ----------------------------------------------------------------------------------------------- table


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _val(row: dict[str, Any], name: str) -> tuple[float | None, float | None]:
    m = row["metrics"].get(name)
    return (None, None) if m is None else (m["value"], m["stderr"])


def sort_key(row: dict[str, Any]) -> tuple[int, int, str]:
    maker = row["maker"]
    base = maker.split(" (")[0]
    return TYPES.index(row["type"]), MAKERS.index(base) if base in MAKERS else len(MAKERS), maker


def table(rows: list[dict[str, Any]], names: dict[str, str], speed: dict[str, Any]) -> str:
    pp, tg = f"pp{speed['prompt']}", f"tg{speed['generate']}"
    ppl_head = "ppl ± se" if any(_val(r, names["ppl"])[1] for r in rows) else "ppl"
    lines = [f"| type | made by | bpw | MiB | {ppl_head} | KL mean | KL p99 | top-1 | {pp} t/s | {tg} t/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=sort_key):
        ppl, ppl_se = _val(r, names["ppl"])
        kl, _ = _val(r, names["kl"])
        p99, _ = _val(r, names["kl_p99"])
        top1, _ = _val(r, names["top1"])
        ppv, pps = _val(r, names["pp"])
        tgv, tgs = _val(r, names["tg"])
        mark = "†" if r.get("quality_of_fp32") else ""
        ppl_s = "-" if ppl is None else (f"{ppl:.3f}" + (f" ± {ppl_se:.3f}" if ppl_se else "")) + mark
        lines.append(
            f"| {r['type']} | {r['maker']} | {_fmt(r.get('bpw'), '.2f')} | "
            f"{_fmt(None if r.get('file_bytes') is None else r['file_bytes'] / MIB, '.1f')} | {ppl_s} | "
            f"{_fmt(kl, '.4f')}{mark} | {_fmt(p99, '.4f')}{mark} | {_fmt(top1, '.3f')}{mark} | "
            f"{_fmt(ppv, '.1f')} ± {_fmt(pps, '.1f')} | {_fmt(tgv, '.1f')} ± {_fmt(tgs, '.1f')} |")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]], names: dict[str, str], speed: dict[str, Any]) -> str:
    """Speed and size over F32 of the same side: ptqlab rows over the study's F32 run, llama.cpp's over the export."""
    pp, tg = f"pp{speed['prompt']}", f"tg{speed['generate']}"
    base = {side: next((r for r in rows if r["type"] == "F32" and r["side"] == side), None)
            for side in ("ptqlab", "llama.cpp")}
    lines = [f"| type | made by | MiB / F32 | {tg} / F32 | {pp} / F32 |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=sort_key):
        b = base.get(r["side"])
        if b is None or r is b:
            continue

        def ratio(name: str, r: dict[str, Any] = r, b: dict[str, Any] = b) -> str:
            x, y = _val(r, name)[0], _val(b, name)[0]
            return "-" if x is None or not y else f"{x / y:.2f}"

        size = "-" if not r.get("file_bytes") or not b.get("file_bytes") else f"{r['file_bytes'] / b['file_bytes']:.3f}"
        lines.append(f"| {r['type']} | {r['maker']} | {size} | {ratio(names['tg'])} | {ratio(names['pp'])} |")
    return "\n".join(lines)


def describe(st: dict[str, Any]) -> str:
    """What a GGUF file holds: its linears' types (count) and the embedding's type."""
    counts: dict[str, int] = {}
    for types in st["linears"].values():
        for name, n in types.items():
            counts[name] = counts.get(name, 0) + n
    lin = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{lin}; embedding {st['token_embd']}"


def layouts(f32: Path, f32_stats: dict[str, Any], exports: dict[str, dict[str, Any]],
            llama_rows: list[dict[str, Any]]) -> list[tuple[str, Path, dict[str, Any]]]:
    """One file per distinct layout (tensor types): a GGUF's speed depends on nothing else.

    ptqlab's RTN and GPTQ files of a type hold the same types; an imatrix file holds the same types as the
    file made without it except where llama-quantize's mix changes with an imatrix (Q4_0 / Q5_0).
    """
    out: list[tuple[str, Path, dict[str, Any]]] = [("F32 (ptqlab export, llama-quantize's source)", f32, f32_stats)]
    for kind in TYPES:
        e = exports.get(kind)
        if e is not None and "gguf" in e:
            out.append((f"{kind} ptqlab (RTN and GPTQ)", Path(e["file"]), e["gguf"]))
    seen: dict[str, str] = {}
    for r in llama_rows:
        if r["ftype"] == "export":
            continue
        sig = json.dumps([r["ftype"], r["gguf"]["linears"], r["gguf"]["token_embd"]], sort_keys=True)
        if sig in seen:
            continue
        twin = next((x for x in llama_rows if x is not r and x["ftype"] == r["ftype"]), None)
        same = twin is not None and twin["gguf"]["linears"] == r["gguf"]["linears"]
        label = f"{r['ftype']} llama-quantize" + (" (with or without imatrix)" if same else
                                                  (" + imatrix" if r["imatrix"] else ""))
        seen[sig] = label
        out.append((label, Path(r["file"]), r["gguf"]))
    return out


def interleaved(files: list[tuple[str, Path, dict[str, Any]]], speed: Any, rounds: int) -> dict[str, dict[str, Any]]:
    """Each file timed once per round (one warm-up, one timed run), rounds alternating in direction."""
    import statistics

    from ptqlab.eval.speed import llama_cpp_speed

    out: dict[str, dict[str, Any]] = {label: {"file": str(p), "holds": describe(st), "file_bytes": st["file_bytes"],
                                              "bpw": st["bpw"], "pp": [], "tg": []} for label, p, st in files}
    for k in range(rounds):
        for label, path, _ in files if k % 2 == 0 else list(reversed(files)):
            s = llama_cpp_speed(path, prompt=speed.prompt, generate=speed.generate, repeats=1, threads=speed.threads)
            out[label]["pp"] += list(s.pp)
            out[label]["tg"] += list(s.tg)
            print(f"  round {k + 1}: {label}: pp {s.pp[0]:.1f}, tg {s.tg[0]:.1f}", flush=True)
    for v in out.values():
        v["pp_median"], v["tg_median"] = statistics.median(v["pp"]), statistics.median(v["tg"])
    return out


def interleaved_table(inter: dict[str, dict[str, Any]], speed: dict[str, Any]) -> str:
    pp, tg = f"pp{speed['prompt']}", f"tg{speed['generate']}"
    base = next(iter(inter.values()))
    lines = [f"| file | holds (linears; embedding) | bpw | MiB | {tg} t/s | {pp} t/s | MiB / F32 | {tg} / F32 | "
             f"{pp} / F32 |", "|---|---|---|---|---|---|---|---|---|"]
    for label, v in inter.items():
        each = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
        lines.append(f"| {label} | {v['holds']} | {v['bpw']:.2f} | {v['file_bytes'] / MIB:.1f} | "
                     f"{v['tg_median']:.1f} ({each(v['tg'])}) | {v['pp_median']:.1f} ({each(v['pp'])}) | "
                     f"{v['file_bytes'] / base['file_bytes']:.3f} | {v['tg_median'] / base['tg_median']:.2f} | "
                     f"{v['pp_median'] / base['pp_median']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=BUILD)
    ap.add_argument("--store", type=Path, default=DEFAULT_STORE, help="the study's store (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="GGUF files and logs (default: %(default)s)")
    ap.add_argument("--llama-bin", type=Path, default=Path(os.environ.get("LLAMA_BIN", DEFAULT_BIN)),
                    help="folder with llama-quantize and llama-imatrix (default: $LLAMA_BIN or %(default)s)")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="PATH=VALUE",
                    help="passed to the sweep (and used for llama.cpp's side): a reduced protocol")
    ap.add_argument("--skip-sweep", action="store_true", help="use the store as it is")
    ap.add_argument("--llama-types", default=None,
                    help="comma-separated llama-quantize ftypes to make (default: all of LLAMA_ROWS)")
    ap.add_argument("--no-imatrix", action="store_true", help="no importance-matrix rows")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of llama-quantize and llama-imatrix (default 1: on a shared machine two threads "
                    "wait on each other at every barrier)")
    ap.add_argument("--interleave", type=int, default=2,
                    help="rounds of the interleaved timing of every file layout (0: none; default %(default)s)")
    ap.add_argument("--table", action="store_true", help="print the table of the saved results and stop")
    ap.add_argument("--note", default=None, help="a note stored with the results (e.g. why a grid was reduced)")
    args = ap.parse_args()

    if args.table:
        saved = json.loads(OUT.read_text())
        print(saved["table"])
        print()
        print(saved["ratios"])
        return

    bins = args.llama_bin
    for tool in ("llama-quantize", "llama-imatrix"):
        if not (bins / tool).exists():
            raise SystemExit(f"{bins / tool} not found.\n{BUILD}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"llama-cpp-python is needed to time the files ({exc}): pip install -e '.[llamacpp]'") from exc

    import ptqlab
    from ptqlab.models.loading import load_model
    from ptqlab.study.sweep import load_sweep

    t_start = time.perf_counter()
    commands: list[dict[str, Any]] = []
    sweep = load_sweep(STUDY, args.sets)
    fp_cfg = next(r.config for r in sweep.runs if r.config.scheme.weight is None)
    evaluate, cal = fp_cfg.evaluate, fp_cfg.calibration
    speed = evaluate.speed
    assert speed is not None and evaluate.divergence and evaluate.perplexity, "the study measures all three"
    names = protocol_names(evaluate)
    speed_d = speed.model_dump()
    protocol = {"study": str(STUDY.relative_to(ROOT)), "sets": args.sets, "evaluate": evaluate.model_dump(),
                "calibration": cal.model_dump()}
    saved = json.loads(OUT.read_text()) if OUT.exists() else {}
    if saved.get("meta", {}).get("protocol") != protocol:
        saved = {}
    llama_saved: dict[str, dict[str, Any]] = {r["key"]: r for r in saved.get("llama_rows", [])}

    # 1. the study
    sweep_s = None if args.skip_sweep else run_study(args.store, args.sets, commands)
    study, missing = study_rows(args.store, sweep, names)
    if missing:
        print(f"study: {len(missing)} runs not done:\n  " + "\n  ".join(missing), flush=True)
    fp_row = next((r for r in study if r["type"] == "F32"), None)
    if fp_row is None:
        raise SystemExit("the study's FP (F32) run is not done; run the sweep first")

    # 2. llama.cpp's source: the FP run exported as F32 GGUF, the calibration text, the importance matrix
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    f32_dir = work / "f32"
    f32 = f32_dir / "model.gguf"
    if not f32.exists():
        run_logged([PTQLAB, "export", fp_row["run_id"], "--store", str(args.store), "--format", "gguf", "--out",
                    str(f32_dir), "--overwrite", "--quiet"], work / "export-f32.log", commands)
    f32_stats = gguf_stats(f32)
    header = f32_stats["header_bytes"]
    fp = load_model(fp_cfg.model)
    windows, text_info = calibration_text(fp.tokenizer, cal, work / "calibration.txt")
    print(f"calibration text: {text_info}", flush=True)
    imatrix_path, imatrix_info = (None, {}) if args.no_imatrix else imatrix(
        bins, f32, work / "calibration.txt", work, cal, args.threads, windows, commands)

    # ptqlab's files: each type's RTN run exported (its codes, bit for bit; GPTQ's file of a type has the same
    # tensor types and bytes): llama.cpp's bits per weight from its tensors, and the interleaved timing below
    exports: dict[str, dict[str, Any]] = {}
    for r in study:
        if r["maker"] != "ptqlab RTN":
            continue
        d = work / f"ptqlab-{r['type']}"
        try:
            if not (d / "model.gguf").exists():
                run_logged([PTQLAB, "export", r["run_id"], "--store", str(args.store), "--format", "gguf", "--out",
                            str(d), "--overwrite", "--quiet"], work / f"export-{r['type']}.log", commands)
            st = gguf_stats(d / "model.gguf")
            exports[r["type"]] = {"run_id": r["run_id"], "file": str(d / "model.gguf"), "gguf": st,
                                  "same_bytes_as_timed": st["file_bytes"] == r["file_bytes"]}
        except SystemExit as e:
            exports[r["type"]] = {"run_id": r["run_id"], "error": str(e)[-2000:]}
        print(f"ptqlab {r['type']} export: {({k: v for k, v in exports[r['type']].items() if k != 'gguf'})}",
              flush=True)
    for r in study:
        r["side"] = "ptqlab"
        st = (exports.get(r["type"]) or {}).get("gguf")
        if st is not None and st["file_bytes"] == r["file_bytes"]:
            r["bpw"], r["bpw_from"] = st["bpw"], "the tensors of the exported file"
        elif r["file_bytes"] is not None:
            r["bpw"], r["bpw_from"] = (r["file_bytes"] - header) * 8 / f32_stats["elements"], \
                "size.file.gguf minus the F32 export's header bytes"
        r["quality_of_fp32"] = r["type"] == "F16"  # the run evaluates the fp32 model; only its file is F16

    # 3. each llama.cpp file, measured by the same code
    ev = evaluate.model_copy(update={"speed": None})
    ref = ptqlab.reference(fp.model, fp.tokenizer, ev, fingerprint=fp.info.fingerprint, progress=False)
    wanted = None if args.llama_types is None else set(args.llama_types.split(","))
    plan = [("F32", "export", False)] + [r for r in LLAMA_ROWS if wanted is None or r[1] in wanted]
    llama_rows: list[dict[str, Any]] = []
    for kind, ftype, use_imatrix in plan:
        if use_imatrix and imatrix_path is None:
            continue
        key = f"{ftype}{'+imatrix' if use_imatrix else ''}"
        if key in llama_saved:
            llama_rows.append(llama_saved[key])
            continue
        print(f"llama.cpp {key}", flush=True)
        if ftype == "export":
            path, qinfo = f32, {"command": "ptqlab export (the FP run, F32)"}
            maker = "llama-quantize (source: ptqlab's F32 export)"
        else:
            path, qinfo = quantize(bins, f32, ftype, imatrix_path if use_imatrix else None, work, args.threads,
                                   commands)
            maker = ("llama-quantize + imatrix" if use_imatrix else "llama-quantize") + \
                (f" ({ftype})" if ftype != kind else "")
        stats = gguf_stats(path)
        t0 = time.perf_counter()
        measured = measure_file(path, fp.tokenizer, ev, ref, speed)
        row = {"key": key, "type": kind, "maker": maker, "ftype": ftype, "imatrix": use_imatrix, "side": "llama.cpp",
               "file": str(path), "file_bytes": stats["file_bytes"], "bpw": stats["bpw"], "gguf": stats,
               "quantize": qinfo, **measured, "seconds": time.perf_counter() - t0}
        kl = (row["metrics"].get(names["kl"]) or {}).get("value")
        tgv = (row["metrics"].get(names["tg"]) or {}).get("value")
        print(f"  {key}: {stats['bpw']:.2f} bpw, {stats['file_bytes'] / MIB:.1f} MiB, KL {kl}, tg {tgv}", flush=True)
        llama_rows.append(row)
        llama_saved[key] = row
        partial = {"meta": {"protocol": protocol}, "llama_rows": list(llama_saved.values())}
        OUT.write_text(json.dumps(partial, indent=2, default=str))

    # 4. every distinct file layout timed again in one stretch, round-robin (drift and other jobs' load spread
    # over all of them alike): the ratios to F32 to read
    inter: dict[str, dict[str, Any]] = {}
    if args.interleave > 0:
        files = layouts(f32, f32_stats, exports, llama_rows)
        for _, path, _ in files:
            if not path.exists():  # a llama.cpp file of an earlier, resumed run: made again (seconds)
                row = next(r for r in llama_rows if r["file"] == str(path))
                quantize(bins, f32, row["ftype"], imatrix_path if row["imatrix"] else None, work, args.threads,
                         commands)
        print(f"interleaved timing: {len(files)} files x {args.interleave} rounds", flush=True)
        inter = interleaved(files, speed, args.interleave)
    rows = study + llama_rows
    md = table(rows, names, speed_d)
    rt = interleaved_table(inter, speed_d) if inter else ratios(rows, names, speed_d)
    print()
    print(md)
    print()
    print(rt)
    meta = {
        "date": dt.date.today().isoformat(), "machine": machine(), "versions": versions(bins),
        "protocol": protocol, "metric_names": names,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "sweep_seconds": sweep_s, "total_seconds": time.perf_counter() - t_start,
        "study_missing": missing, "calibration_text": text_info, "imatrix": imatrix_info, "f32_export": f32_stats,
        "ptqlab_exports": exports, "interleaved": inter, "commands": commands, "note": args.note,
        "bpw": "llama.cpp's: tensor data bytes x 8 / elements of all tensors in the file (tied embedding once); "
               "ptqlab rows: the same, from the type's RTN run exported by `ptqlab export` (the same bytes as the "
               "file the run timed: checked); the F16 row: (size.file.gguf - header bytes of the F32 export) x 8 / "
               "elements",
        "mib": "file bytes / 2^20",
        "speed": "median of the repeats ± standard error (sample sd / sqrt(repeats)), llama.cpp via llama-cpp-python",
        "f16_quality": "† the ptqlab F16 run's perplexity and KL are its fp32 model's (only its file is F16)",
    }
    OUT.write_text(json.dumps({"meta": meta, "study_rows": study, "llama_rows": llama_rows, "table": md,
                               "ratios": rt}, indent=2, default=str))
    print(f"\nwrote {OUT.relative_to(ROOT)} ({meta['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
