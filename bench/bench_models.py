"""`make bench-models`: the size series, each model loaded and evaluated in FP, resident and streamed.

For every alias whose file is here (``make models`` fetches the Qwen2.5-Coder ones), in fresh processes:

1. ``load``: ``ptqlab.models.loading.load_model(alias)`` timed in a child; the first load of a GGUF file
   dequantizes it into a float32 safetensors copy under ``$PTQLAB_CACHE`` (``cold``: whether this bench made
   that copy), later loads read the copy (``warm``, a second child).
2. ``resident`` and ``streamed``: ``ptqlab run`` of an FP configuration (wikitext2, ``--windows`` windows of
   ``--seqlen`` tokens; ``runtime.stream`` off / on) into a scratch store, its perplexity read back, the
   child's wall time and its peak resident memory (the child's own ``VmHWM``, read as it exits).

Writes ``bench/results/models.json`` and prints the table.

    python bench/bench_models.py                                   # every alias that is here
    python bench/bench_models.py --models smollm2-135m qwen2.5-coder-0.5b --windows 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import open_results

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
_PEAK = """
import atexit, os, sys
from ptqlab.memory import resident_bytes
atexit.register(lambda: open(os.environ["BENCH_PEAK_OUT"], "w").write(str(resident_bytes(peak=True))))
"""
_LOAD = _PEAK + """
import json, time
from ptqlab.models.loading import load_model
start = time.perf_counter()
loaded = load_model(sys.argv[1])
seconds = time.perf_counter() - start
params = sum(p.numel() for p in loaded.model.parameters())
print(json.dumps({"seconds": seconds, "params": params}))
"""
_CLI = _PEAK + """
from ptqlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def perplexity_name(corpus: str, seqlen: int, windows: int) -> str:
    """The stored perplexity metric's name (ptqlab.metrics)."""
    from ptqlab.metrics import perplexity_name as name

    return name(corpus, seqlen, windows)


def _child(script: str, args: list[str]) -> tuple[str, float, int]:
    """Run ``script`` with ``args`` in a fresh interpreter; its stdout, wall seconds and peak resident bytes.

    The peak is the child's own ``VmHWM``, read by the child as it exits: a fresh address space's high-water
    mark. Not ``ru_maxrss``, which Linux carries from this (torch-holding) parent into the child.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        env = {**os.environ, "BENCH_PEAK_OUT": str(peak_file)}
        proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                              env=env, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc.stdout, seconds, int(peak_file.read_text())


def _has_file(alias: str) -> bool:
    from ptqlab.errors import PtqlabError
    from ptqlab.models.loading import source_gguf

    try:
        path = source_gguf(alias)
    except PtqlabError:
        return False
    return path is None or path.exists()


def _cached_copy(alias: str) -> bool:
    from ptqlab.models.loading import gguf_cache_dir, model_fingerprint

    return (gguf_cache_dir(model_fingerprint(alias)) / "config.json").is_file()


def _load(alias: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for kind in ("cold", "warm"):
        if kind == "cold" and _cached_copy(alias):
            row["cold"] = None  # the dequantized copy was there already: no cold load measured
            continue
        text, _, peak = _child(_LOAD, [alias])
        got = json.loads(text.strip().splitlines()[-1])
        row[kind] = {"seconds": got["seconds"], "peak_bytes": peak}
        row["params"] = got["params"]
    return row


def _run(alias: str, stream: str, seqlen: int, windows: int, work: Path) -> dict[str, Any]:
    config = {"model": alias,
              "evaluate": {"perplexity": ["wikitext2"], "seqlen": seqlen, "max_windows": windows, "sample": None,
                           "sensitivity": None},
              "runtime": {"stream": stream}}
    path = work / f"{alias}-{stream}.yaml"
    path.write_text(yaml.safe_dump(config))
    text, seconds, peak = _child(_CLI, ["run", str(path), "--store", str(work / "runs.db"), "--force", "--quiet",
                                        "--json"])
    record = json.loads(text)
    name = perplexity_name("wikitext2", seqlen, windows)
    return {"ppl": record["metrics"][name]["value"], "seconds": seconds, "peak_bytes": peak}


def _table(rows: dict[str, Any]) -> str:
    lines = ["| model | parameters | load cold / warm s | FP ppl | resident s / peak MB | streamed s / peak MB |",
             "|---|---|---|---|---|---|"]
    for alias, r in rows.items():
        cold = "-" if not r["load"].get("cold") else f"{r['load']['cold']['seconds']:.1f}"
        res, st = r["resident"], r["streamed"]
        lines.append(f"| {alias} | {r['load']['params'] / 1e6:.0f}M | {cold} / {r['load']['warm']['seconds']:.1f} | "
                     f"{res['ppl']:.3f} | {res['seconds']:.0f} / {res['peak_bytes'] / 1e6:.0f} | "
                     f"{st['seconds']:.0f} / {st['peak_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure each model; write bench/results/models.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args(argv)
    command = "python bench/bench_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out, meta, saved = open_results("models.json", command.strip(), seqlen=args.seqlen, windows=args.windows)
    meta["model"] = "each alias, dequantized from its GGUF to float32"
    rows: dict[str, Any] = dict(saved.get("models", {}))
    with tempfile.TemporaryDirectory() as tmp:
        for alias in args.models:
            if not _has_file(alias):
                raise SystemExit(f"{alias}: its file is missing; run `make models` first")
            print(f"{alias}: load ...", flush=True)
            row = {"load": _load(alias)}
            for stream, key in (("off", "resident"), ("on", "streamed")):
                print(f"{alias}: FP run, {key} ...", flush=True)
                row[key] = _run(alias, stream, args.seqlen, args.windows, Path(tmp))
            rows[alias] = row
            out.write_text(json.dumps({"meta": meta, "models": rows}, indent=2) + "\n")
    print(_table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
