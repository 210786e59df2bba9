"""`make bench-export`: SmolLM2 GPTQ runs exported, read back by the real libraries, evaluated through them.

Each row's configuration is quantized by ptqlab's run path and exported; the real library loads the export
(compressed-tensors: transformers' `CompressedTensorsConfig(dequantize=True)`, the library's decompressor;
GGUF: transformers' GGUF loader, gguf-py's dequantizers), and both models' wikitext2 perplexity (2 windows
of 2048) is measured with ptqlab's perplexity function. Every weight must be equal and the perplexities
within 0.1 %. The GGUF file's perplexity is also measured by llama.cpp itself on the same windows (its own
kernels: activations are quantized to Q8_0 in its matmuls), through llama-cpp-python's `Llama` API (no
`llama-perplexity` binary). It needs the `llamacpp` extra, which `make bench-export` installs (llama-cpp-python
builds llama.cpp from source with the machine's compiler and cmake: minutes, once); without it the bench stops
before measuring anything.

    pip install -e ".[llamacpp]"     # once
    python bench/bench_export.py     # table + bench/results/export-smollm2.json
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CALIBRATION = {"dataset": "c4local", "samples": 16, "seqlen": 512}
ROWS = [
    ("compressed-tensors W4 g64", "compressed-tensors",
     {"weight": {"bits": 4, "granularity": "group", "group_size": 64}}),
    ("GGUF Q4_0 (W4 g32)", "gguf", {"weight": {"format": "gguf_q4_0"}}),
]


def _config(scheme: dict) -> dict:
    return {"model": "smollm2-135m", "device": "cpu", "scheme": scheme, "recipe": [{"gptq": {}}],
            "calibration": CALIBRATION}


def _load_export(fmt: str, out: Path) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    if fmt == "gguf":
        return AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                dtype=torch.float32).eval()


LLAMA_CPP_MISSING = (
    "bench_export measures the GGUF export's perplexity with llama.cpp, through llama-cpp-python, which is not "
    "installed ({error}). Install the `llamacpp` extra: `.venv/bin/python -m pip install -e \".[llamacpp]\"` "
    "(`make bench-export` does; it builds llama.cpp from source, a few minutes once), then run the bench again.")


def _require_llama_cpp() -> None:
    """Stop with how to install llama-cpp-python when it cannot be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise SystemExit(LLAMA_CPP_MISSING.format(error=f"{type(exc).__name__}: {exc}")) from exc


def _llama_cpp_ppl(path: Path, ids: torch.Tensor) -> float:
    """Perplexity of the GGUF file by llama.cpp (llama-cpp-python's `Llama` API) on the same windows."""
    _require_llama_cpp()
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=ids.shape[1], logits_all=True, n_threads=2, verbose=False)
    nll, count = 0.0, 0
    for window in ids.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.tensor(llm.scores[: len(window)], dtype=torch.float64)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll -= float(logp.gather(1, torch.tensor(window[1:])[:, None]).sum())
        count += len(window) - 1
    return math.exp(nll / count)


def measure(label: str, fmt: str, scheme: dict) -> dict:
    """Export one configuration, load it back by the library, and compare weights and perplexity."""
    from ptqlab.compile import bind, compile_config
    from ptqlab.data.corpora import eval_windows
    from ptqlab.eval.perplexity import perplexity
    from ptqlab.export.run import export_config
    from ptqlab.models.loading import load_model
    from ptqlab.pipeline.quantize import quantize
    from ptqlab.study.config import parse_config

    cfg = parse_config(_config(scheme))
    with tempfile.TemporaryDirectory(prefix="ptqlab-export-") as tmp:
        out = Path(tmp) / "export"
        t0 = time.perf_counter()
        result = export_config(cfg, fmt, out, progress=False)
        export_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".safetensors", ".gguf"))
        theirs = _load_export(fmt, out)
        loaded = load_model(cfg.model, cfg.dtype, "cpu")
        plan = bind(compile_config(cfg), loaded.model, loaded.tokenizer)
        quantize(loaded.model, plan.quantization, progress=False)
        ours = loaded.model.eval()
        mine = ours.state_dict()
        differ = [k for k, v in theirs.state_dict().items() if not torch.equal(v, mine[k])]
        ids = eval_windows("wikitext2", loaded.tokenizer, 2048, 2).input_ids
        ppl_ours = perplexity(ours, ids, progress=False).ppl
        ppl_theirs = perplexity(theirs, ids, progress=False).ppl
        del theirs, ours
        ppl_llama = _llama_cpp_ppl(out / "model.gguf", ids) if fmt == "gguf" else None
    return {"export": label, "format": fmt, "run_id": result.run_id, "export_s": export_s, "file_bytes": size,
            "weights_differing": len(differ), "ppl_ptqlab": ppl_ours, "ppl_loaded": ppl_theirs,
            "ppl_llama_cpp": ppl_llama, "relative_ppl_difference": abs(ppl_theirs - ppl_ours) / ppl_ours}


def main() -> None:
    _require_llama_cpp()  # before the exports, not minutes into them
    torch.set_num_threads(2)
    rows = [measure(label, fmt, scheme) for label, fmt, scheme in ROWS]
    lines = ["| export | run | export s | file MB | weights differing | wikitext2 ppl, ptqlab | "
             "wikitext2 ppl, loaded by the library | difference | wikitext2 ppl, llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        llama = "-" if r["ppl_llama_cpp"] is None else f"{r['ppl_llama_cpp']:.4f}"
        lines.append(f"| {r['export']} | {r['run_id']} | {r['export_s']:.1f} | {r['file_bytes'] / 1e6:.1f} | "
                     f"{r['weights_differing']} | {r['ppl_ptqlab']:.4f} | {r['ppl_loaded']:.4f} | "
                     f"{100 * r['relative_ppl_difference']:.3f} % | {llama} |")
    table = "\n".join(lines)
    print(table)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": "python bench/bench_export.py"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export-smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2))


if __name__ == "__main__":
    main()
