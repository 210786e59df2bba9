"""`make bench-export`: a SmolLM2 GPTQ run exported, read back by the real library, evaluated through it.

The configuration (GPTQ W4 g64 on c4local 16 x 512) is quantized by ptqlab's run path and exported as
compressed-tensors `pack-quantized`; transformers' `CompressedTensorsConfig(dequantize=True)` loads the
export (the library's decompressor), and both models' wikitext2 perplexity (2 windows of 2048) is measured
with ptqlab's perplexity function. Every weight must be equal and so must the perplexity.

    python bench/bench_export.py     # table + bench/results/export-smollm2.json
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = {"model": "smollm2-135m", "device": "cpu",
          "scheme": {"weight": {"bits": 4, "granularity": "group", "group_size": 64}},
          "recipe": [{"gptq": {}}], "calibration": {"dataset": "c4local", "samples": 16, "seqlen": 512}}


def main() -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from ptqlab.compile import bind, compile_config
    from ptqlab.data.corpora import eval_windows
    from ptqlab.eval.perplexity import perplexity
    from ptqlab.export.run import export_config
    from ptqlab.models.loading import load_model
    from ptqlab.pipeline.quantize import quantize
    from ptqlab.study.config import parse_config

    torch.set_num_threads(2)
    cfg = parse_config(CONFIG)
    with tempfile.TemporaryDirectory(prefix="ptqlab-export-") as tmp:
        out = Path(tmp) / "w4g64"
        t0 = time.perf_counter()
        result = export_config(cfg, "compressed-tensors", out, progress=False)
        export_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        theirs = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                      dtype=torch.float32).eval()
        loaded = load_model(cfg.model, cfg.dtype, "cpu")
        plan = bind(compile_config(cfg), loaded.model, loaded.tokenizer)
        quantize(loaded.model, plan.quantization, progress=False)
        ours = loaded.model.eval()
        mine = ours.state_dict()
        differ = [k for k, v in theirs.state_dict().items() if not torch.equal(v, mine[k])]
        ids = eval_windows("wikitext2", loaded.tokenizer, 2048, 2).input_ids
        ppl_ours = perplexity(ours, ids, progress=False).ppl
        ppl_theirs = perplexity(theirs, ids, progress=False).ppl
    row = {"run_id": result.run_id, "export_s": export_s, "safetensors_bytes": size, "weights_differing": len(differ),
           "ppl_ptqlab": ppl_ours, "ppl_loaded": ppl_theirs}
    table = ("| export | run | export s | safetensors MB | weights differing | wikitext2 ppl (ptqlab) | "
             "wikitext2 ppl (loaded by compressed-tensors) |\n|---|---|---|---|---|---|---|\n"
             f"| compressed-tensors pack-quantized W4 g64 | {result.run_id} | {export_s:.1f} | {size / 1e6:.1f} | "
             f"{len(differ)} | {ppl_ours:.4f} | {ppl_theirs:.4f} |")
    print(table)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": "python bench/bench_export.py"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export-smollm2.json").write_text(json.dumps({"meta": meta, "row": row, "table": table}, indent=2))


if __name__ == "__main__":
    main()
