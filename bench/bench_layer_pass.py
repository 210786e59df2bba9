"""Calibration memory against time: `runtime.layer_pass` one vs per_group on SmolLM2 layers (GPTQ W4 g64).

Each job runs in its own process: SmolLM2-135M cut to its first `--layers` decoder layers (float32, weights
copied out of the file mapping so that the model is resident before the clock starts), calibration windows
of c4local (`--samples` x 512, chunks of 8), GPTQ W4 g64; peak is the process's VmHWM over its resident
memory just before quantization, time the quantization's. Both modes must give the same weights.

    python bench/bench_layer_pass.py                      # 8 layers, 16 and 64 samples
    python bench/bench_layer_pass.py --layers 30 --samples 128
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCHEME = {"weight": {"bits": 4, "granularity": "group", "group_size": 64}}


def _resident_mb(peak: bool = False) -> int:
    from ptqlab.memory import resident_bytes

    found = resident_bytes(peak)
    if found is None:
        raise RuntimeError("no VmRSS / VmHWM in /proc/self/status: this benchmark needs Linux")
    return found // 2**20


def job(layers: int, samples: int, layer_pass: str) -> dict:
    """One quantization in this process: peak MB over the resident model, seconds, a weights checksum."""
    import torch

    from ptqlab.api import plan_quantization, run_quantization
    from ptqlab.data.calibration import calibration_windows
    from ptqlab.memory import return_freed
    from ptqlab.models.loading import load_model
    from ptqlab.pipeline.plan import RunOptions

    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m", "float32", "cpu")
    model = loaded.model
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    for p in model.parameters():
        p.data = p.data.clone()  # resident, not a file mapping
    cal = calibration_windows(loaded.tokenizer, "c4local", samples, 512, 0)
    plan = plan_quantization(model, SCHEME, [{"gptq": {}}], cal)
    return_freed()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
    before = _resident_mb()
    t0 = time.perf_counter()
    run_quantization(model, plan, progress=False, options=RunOptions(layer_pass=layer_pass))
    seconds = time.perf_counter() - t0
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return {"layers": layers, "samples": samples, "layer_pass": layer_pass, "seconds": seconds,
            "peak_over_model_mb": _resident_mb(peak=True) - before, "checksum": checksum}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--samples", type=int, nargs="+", default=[16, 64])
    p.add_argument("--job", nargs=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.job:
        layers, samples, mode = args.job
        args.out.write_text(json.dumps(job(int(layers), int(samples), mode)))
        return
    rows = []
    for samples in args.samples:
        for mode in ("one", "per_group"):
            out = Path(tempfile.mkstemp(suffix=".json")[1])
            cmd = [sys.executable, __file__, "--job", str(args.layers), str(samples), mode, "--out", str(out)]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
            rows.append(json.loads(out.read_text()))
    lines = ["| calibration | `one` peak MB | `per_group` peak MB | `one` s | `per_group` s | time ratio "
             "| same weights |", "|---|---|---|---|---|---|---|"]
    for one, per in zip(rows[::2], rows[1::2], strict=True):
        lines.append(f"| {one['samples']} x 512 | {one['peak_over_model_mb']} | {per['peak_over_model_mb']} | "
                     f"{one['seconds']:.1f} | {per['seconds']:.1f} | {per['seconds'] / one['seconds']:.2f}x | "
                     f"{one['checksum'] == per['checksum']} |")
    table = "\n".join(lines)
    print(table)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": f"python bench/bench_layer_pass.py --layers {args.layers} --samples "
                       + " ".join(map(str, args.samples))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "layer-pass.json").write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2))


if __name__ == "__main__":
    main()
