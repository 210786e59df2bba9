"""Fake-quantized Hugging Face safetensors, and the model card every export carries.

The ``hf`` format is the quantized weights, dequantized, in the model's own layout.
Any transformers user loads the directory with ``AutoModelForCausalLM.from_pretrained`` and gets the
weights ptqlab evaluated. Only weights can be held this way: activation, attention-input and KV-cache
quantizers run at inference time and an online rotation is a forward hook, so such schemes are refused
(they need a runtime that executes them). A README card gives the scheme, the recipe, the run id and
the run's metrics when it is stored.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..schema import RunConfig
from ..store import RunRecord

_HOW = {
    "hf": ["Fake-quantized weights: every quantized linear holds its dequantized values (the codes times their",
           "scales) in the model's dtype, so `AutoModelForCausalLM.from_pretrained` loads the exact weights ptqlab",
           "evaluated; the file is as large as the original."],
    "compressed-tensors": ["compressed-tensors, in the layout `quantization_config.format` names (packed INT "
                           "codes,", "INT8 or FP8 weights, with the activations' scheme for W8A8): the run's own "
                           "codes, scales and zero", "points; vLLM and transformers (`CompressedTensorsConfig`) "
                           "load it."],
    "gguf": ["GGUF for llama.cpp (`model.gguf`): each quantized linear in the llama.cpp block type of its ptqlab "
             "format", "(`gguf_q4_0` is Q4_0, ...), written from the run's own codes and FP16 block parameters, "
             "so llama.cpp", "runs the weights ptqlab evaluated; transformers reads it with `gguf_file=`."],
}


def model_card(cfg: RunConfig, rid: str, record: RunRecord | None, fmt: str) -> str:
    """The README of an export: what was quantized how, and what the run measured."""
    scheme = yaml.safe_dump(cfg.scheme.model_dump(mode="json", exclude_none=True), sort_keys=False).strip()
    recipe = yaml.safe_dump(cfg.recipe, sort_keys=False).strip() if cfg.recipe else "[] (round to nearest)"
    lines = [
        "---", "library_name: transformers", f"tags: [ptqlab, quantized, {fmt}]", "---", "",
        f"# {Path(cfg.model).name}, quantized by ptqlab (run `{rid}`)", "", *_HOW[fmt], "",
        f"- model: `{cfg.model}` ({cfg.dtype})", "", "## Scheme", "", "```yaml", scheme, "```", "",
        "## Recipe", "", "```yaml", recipe, "```", "",
        f"Calibration: {cfg.calibration.dataset}, {cfg.calibration.samples} x {cfg.calibration.seqlen} tokens, "
        f"seed {cfg.calibration.seed}.", "",
    ]
    if record is not None and record.metrics:
        lines += ["## Metrics of the run", "", "| metric | value |", "|---|---|"]
        lines += [f"| {m.name} | {m.value:.6g} |" for m in record.metrics]
        lines.append("")
    return "\n".join(lines)
