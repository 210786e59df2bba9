"""Shared by the bench scripts: results files that resume a killed run of the same protocol."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def open_results(name: str, command: str, **protocol: Any) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The results file ``bench/results/<name>``, this run's meta, and what an earlier run saved there.

    Earlier results are kept only when they were measured with the same ``protocol`` settings; a change
    of protocol starts over.
    """
    out = RESULTS / name
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "model": "smollm2-135m fp32", "command": command, **protocol}
    saved = json.loads(out.read_text()) if out.exists() else {}
    if {k: saved.get("meta", {}).get(k) for k in protocol} != protocol:
        saved = {}
    return out, meta, saved


def perplexities(model: torch.nn.Module, tokenizer: Any, corpora: tuple[str, ...], seqlen: int, windows: int,
                 progress: bool = False) -> dict[str, float]:
    """Perplexity per corpus through ptqlab's one evaluation path (first ``windows`` windows of ``seqlen``)."""
    from ptqlab.eval import plan_evaluation
    from ptqlab.schema import Evaluate

    config = Evaluate(perplexity=list(corpora), seqlen=seqlen, max_windows=windows, sample=None, sensitivity=None)
    return _perplexities(model, tokenizer, plan_evaluation(config, tokenizer), progress)[0]


def perplexity_on(model: torch.nn.Module, tokenizer: Any, corpus: str, ids: torch.Tensor
                  ) -> tuple[float, dict[str, float]]:
    """Perplexity of given windows (windows, seqlen) of ``corpus`` through the one evaluation path, and its timings."""
    from ptqlab.eval import EvalPlan
    from ptqlab.schema import Evaluate

    config = Evaluate(perplexity=[corpus], seqlen=int(ids.shape[1]), max_windows=int(ids.shape[0]), sample=None,
                      sensitivity=None)
    ppl, timings = _perplexities(model, tokenizer, EvalPlan(config, windows={corpus: ids}), False)
    return ppl[corpus], timings


def _perplexities(model: torch.nn.Module, tokenizer: Any, plan: Any, progress: bool
                  ) -> tuple[dict[str, float], dict[str, float]]:
    from ptqlab.eval import evaluate
    from ptqlab.metrics import perplexity_name

    result = evaluate(model, tokenizer, plan, progress=progress)
    metrics = {m.name: m.value for m in result.metrics}
    ppl = {c: metrics[perplexity_name(c, int(ids.shape[1]), int(ids.shape[0]))] for c, ids in plan.windows.items()}
    return ppl, result.timings
