"""`make bench-scale`: peak memory and time of resident vs layer-streamed GPTQ + evaluation, and the task path.

Each job is one `ptqlab run` of the same configuration in its own process (peak RSS is per process), with
`runtime.stream: off` (the whole model resident; calibration in `layer_pass: one` pass per layer holding
every chunk at each linear group, or `per_group` passes holding one chunk at a time) or `on` (one decoder
layer at a time, read from the safetensors shards; the quantized model written out layer by layer), and a
fresh `$PTQLAB_CACHE` (so the FP reference is measured in the run, not read from disk). A GGUF model
(SmolLM2's alias) is read from its dequantized safetensors copy, made once before the jobs. The baseline
is the peak of a process that only imports ptqlab and tokenizes the same data: what the model costs is the
difference.

    python bench/bench_scale.py                     # SmolLM2-135M, table + bench/results/scale-smollm2-135m.json
    python bench/bench_scale.py --model random-1b --peer  # a random 1.1B Llama (TinyLlama's shape), and
                                                          # llm-compressor's GPTQ on it beside ours
    python bench/bench_scale.py --model /path/to/hf_dir --samples 128 --windows 8

`random-1b` is written once to bench/results/tmp/random-llama-1b (4.4 GB of float32 safetensors shards, the
stories260K tokenizer). With `--peer`, llm-compressor 0.14 (its own venv, bench/peers/setup_llmcompressor.sh)
runs GPTQ W4 g64 on the same calibration windows, sequential pipeline; its peak RSS and time are its whole
process's (load + oneshot + a 1-window evaluation).
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
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PEER_PY = ROOT / ".venv-llmcompressor" / "bin" / "python"
RANDOM_1B = RESULTS / "tmp" / "random-llama-1b"


def random_1b() -> Path:
    """A random Llama of TinyLlama-1.1B's shape as sharded safetensors (written once), with a small tokenizer."""
    if (RANDOM_1B / "model.safetensors.index.json").is_file():
        return RANDOM_1B
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ptqlab.models.loading import stories260k_dir

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    tmp = RANDOM_1B.with_name(RANDOM_1B.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="500MB")
    for f in stories260k_dir().iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, tmp)
    tmp.rename(RANDOM_1B)
    return RANDOM_1B


def peer_tokens(args: argparse.Namespace, path: Path) -> None:
    """The calibration windows ptqlab's runs read, and the first evaluation window, for the peer."""
    from safetensors.torch import save_file

    from ptqlab.data.calibration import calibration_windows
    from ptqlab.data.corpora import eval_windows
    from ptqlab.models.loading import load_tokenizer

    tok = load_tokenizer(args.model)
    cal = calibration_windows(tok, "c4local", args.samples, 512, 0)
    ev = eval_windows("wikitext2", tok, args.seqlen, 1).input_ids
    save_file({"calibration": cal.contiguous(), "eval": ev.contiguous()}, str(path))


VARIANTS = (("off", "one"), ("off", "per_group"), ("on", "auto"))  # runtime.stream, runtime.layer_pass


def _config(args: argparse.Namespace, stream: str, layer_pass: str, offload: Path) -> dict:
    return {"model": args.model, "device": "cpu",
            "scheme": {"weight": {"bits": 4, "granularity": "group", "group_size": 64}},
            "recipe": [{"gptq": {}}],
            "calibration": {"dataset": "c4local", "samples": args.samples, "seqlen": 512},
            "evaluate": {"perplexity": ["wikitext2"], "seqlen": args.seqlen, "max_windows": args.windows,
                         "divergence": {"windows": 1, "seqlen": args.seqlen}},
            "runtime": {"stream": stream, "layer_pass": layer_pass, "offload_dir": str(offload)}}


def job(config: Path, store: Path, baseline: bool) -> dict:
    """One run (or, for the baseline, only the imports and the tokenized data); peak RSS and seconds."""
    import torch

    from ptqlab.cli import main
    from ptqlab.compile import bind, compile_config
    from ptqlab.models.loading import load_tokenizer, model_directory
    from ptqlab.models.shards import skeleton
    from ptqlab.study.config import load_config

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if baseline:
        cfg = load_config(config)
        bind(compile_config(cfg), skeleton(model_directory(cfg.model), torch.float32), load_tokenizer(cfg.model))
    else:
        assert main(["run", str(config), "--store", str(store), "--quiet"]) == 0
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would start from the parent's peak, inherited at fork)."""
    from ptqlab.memory import resident_bytes

    peak = resident_bytes(peak=True)
    return peak / 2**20 if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_job(config: Path, store: Path, cache: Path, baseline: bool = False) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--job", str(config), "--store", str(store), "--out", str(out)]
    if baseline:
        cmd.append("--baseline")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PTQLAB_CACHE": str(cache)})
    return json.loads(out.read_text())


def _metrics(store: Path) -> dict[str, float]:
    from ptqlab.store import Store

    (record,) = Store(str(store)).list_runs()
    return {m.name: m.value for m in record.metrics} | {f"time.{k}": v for k, v in record.timings.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--peer", action="store_true", help="llm-compressor's GPTQ on the same model and windows")
    p.add_argument("--job", type=Path)
    p.add_argument("--store", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--baseline", action="store_true")
    args = p.parse_args()
    if args.job:
        args.out.write_text(json.dumps(job(args.job, args.store, args.baseline)))
        return
    label = args.model
    if args.model == "random-1b":
        args.model = str(random_1b())
    else:  # a GGUF file or alias: its dequantized safetensors copy, made once here and not in each job
        from ptqlab.models.loading import model_directory

        args.model = str(model_directory(args.model))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptqlab-scale-") as tmp:
        work = Path(tmp)
        for stream, layer_pass in VARIANTS:
            name = f"{stream}-{layer_pass}"
            cfg = work / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump(_config(args, stream, layer_pass, work / "offload")))
            if not rows:
                base = run_job(cfg, work / "base.db", work / "cache-base", baseline=True)
            res = run_job(cfg, work / f"{name}.db", work / f"cache-{name}")
            rows.append({"stream": stream, "layer_pass": layer_pass, **res, "metrics": _metrics(work / f"{name}.db")})
        peer = run_peer(args, work) if args.peer else None
    off, per_group, on = rows
    ppl = next(k for k in off["metrics"] if k.startswith("ppl."))
    kl = next(k for k in off["metrics"] if k.startswith("kl."))
    lines = [f"| run | seconds | peak RSS MB | over baseline MB | {ppl} | {kl} |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| stream: {r['stream']}, layer_pass: {r['layer_pass']} | {r['seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - base['peak_rss_mb']:.0f} | {r['metrics'][ppl]:.4f} | "
                     f"{r['metrics'][kl]:.5f} |")
    lines.append(f"| baseline (imports + tokenized data) | {base['seconds']:.1f} | {base['peak_rss_mb']:.0f} | 0 | | |")
    ratio_t = on["seconds"] / off["seconds"]
    ratio_m = (on["peak_rss_mb"] - base["peak_rss_mb"]) / (off["peak_rss_mb"] - base["peak_rss_mb"])
    lines += ["", f"streamed / resident: time {ratio_t:.2f}x, memory over baseline {ratio_m:.2f}x; "
              f"same {ppl}: {on['metrics'][ppl] == off['metrics'][ppl]}",
              f"per-group passes / one pass (resident): quantize time "
              f"{per_group['metrics']['time.quantize_s'] / off['metrics']['time.quantize_s']:.2f}x, peak "
              f"{per_group['peak_rss_mb'] - off['peak_rss_mb']:+.0f} MB; same {ppl}: "
              f"{per_group['metrics'][ppl] == off['metrics'][ppl]}"]
    if peer is not None:
        lines += [f"llm-compressor GPTQ (load + oneshot + 1 window): {peer['seconds']:.1f} s, peak RSS "
                  f"{peer['peak_rss_mb']:.0f} MB (oneshot {peer['quant_seconds']:.1f} s); ptqlab streamed / "
                  f"llm-compressor: peak RSS {on['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x, time "
                  f"{on['seconds'] / peer['seconds']:.2f}x; resident / llm-compressor: peak RSS "
                  f"{off['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x (one pass), "
                  f"{per_group['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x (per-group passes)"]
    table = "\n".join(lines)
    print(table)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": f"python bench/bench_scale.py --model {label} --samples {args.samples} "
                       f"--windows {args.windows} --seqlen {args.seqlen}" + (" --peer" if args.peer else "")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = Path(label).name.lower()
    (RESULTS / f"scale-{name}.json").write_text(json.dumps({"meta": meta, "baseline": base, "rows": rows,
                                                              "peer": peer, "table": table}, indent=2))


def run_peer(args: argparse.Namespace, work: Path) -> dict:
    """llm-compressor's GPTQ W4 g64 on the same model and calibration windows, in its own venv and process."""
    if not PEER_PY.exists():
        subprocess.run(["bash", str(ROOT / "bench/peers/setup_llmcompressor.sh")], check=True, cwd=ROOT)
    tokens = work / "tokens.safetensors"
    peer_tokens(args, tokens)
    out = work / "peer.json"
    cmd = [str(PEER_PY), str(ROOT / "bench/peers/llmcompressor_gptq.py"), "--tokens", str(tokens), "--scheme",
           "w4_g64", "--out", str(out)]
    if args.model != "smollm2-135m":
        cmd += ["--model-dir", args.model]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    res = json.loads(out.read_text())
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": res["peak_rss_mb"],
            "quant_seconds": res["quant_seconds"], "ppl": res.get("ppl")}


if __name__ == "__main__":
    main()
