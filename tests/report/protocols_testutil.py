"""A store holding the same configurations evaluated under two protocols (and a third with no FP run).

Like the bench store of issue 30: protocol ``zq`` measures three corpora (FP ppl 20 / 30 / 25), protocol
``qllm`` measures wikitext2 alone at a different FP (30, as if another text sample) plus piqa on 30 items;
their wikitext2 metric names are the same (``ppl.wikitext2.s512.w4``), so only the protocol tells them
apart. Protocol ``lone`` (2 windows) has quantized runs and no FP run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from report_testutil import FP_NOISE, Q_NOISE, SIZE_PER_BIT, act, weight

from ptqlab.metrics import Metric
from ptqlab.store import RunRecord, Store

FP_PPL = {"zq": {"wikitext2": 20.0, "ptb_new": 30.0, "c4local_new": 25.0},
          "qllm": {"wikitext2": 30.0}, "lone": {"wikitext2": 20.0}}
EVALUATE = {
    "zq": {"perplexity": ["wikitext2", "ptb_new", "c4local_new"], "seqlen": 512, "max_windows": 4, "tasks": [],
           "limit": None, "divergence": False, "long_context": None},
    "qllm": {"perplexity": ["wikitext2"], "seqlen": 512, "max_windows": 4, "tasks": ["piqa"], "limit": 30,
             "divergence": False, "long_context": None},
    "lone": {"perplexity": ["wikitext2"], "seqlen": 512, "max_windows": 2, "tasks": [], "limit": None,
             "divergence": False, "long_context": None},
}
ITEMS = 30


def ppl_name(corpus: str, windows: int = 4) -> str:
    return f"ppl.{corpus}.s512.w{windows}"


def _fp_nll(proto: str, corpus: str, windows: int) -> list[float]:
    return [math.log(FP_PPL[proto][corpus]) + e for e in FP_NOISE[:windows]]


def two_protocol_run(rid: str, proto: str, *, w: dict[str, Any] | None = None, a: dict[str, Any] | None = None,
                     recipe: tuple[str, ...] = (), d: float = 0.0, windows: bool = True, bits_weight: float = 16.0,
                     extra: list[Metric] | None = None, n: int = 0) -> RunRecord:
    """A finished run of protocol ``proto`` whose perplexity is FP's times exp(d) per window (plus noise)."""
    fp = not (w or a)
    ev = EVALUATE[proto]
    config = {"model": "tiny", "dtype": "float32", "scheme": {"weight": w, "activation": a, "kv_cache": None},
              "recipe": [{name: {}} for name in recipe], "evaluate": dict(ev)}
    metrics = [Metric("bits.weight", bits_weight), Metric("size.model_bytes", bits_weight * SIZE_PER_BIT)]
    wins = {}
    count = ev["max_windows"]
    for corpus in ev["perplexity"]:
        base = _fp_nll(proto, corpus, count)
        nll = base if fp else [x + d + e for x, e in zip(base, Q_NOISE, strict=False)]
        metrics.append(Metric(ppl_name(corpus, count), math.exp(sum(nll) / len(nll))))
        if windows:
            wins[ppl_name(corpus, count)] = {"nll": nll, "fp_nll": base}
    return RunRecord(id=rid, qmodel_key=rid, model="tiny", model_fingerprint="fp-tiny", architecture="Tiny",
                     config=config, status="done", created_at=f"2026-01-01T00:00:{n:02d}+00:00",
                     metrics=metrics + (extra or []), windows=wins)


def acc(task: str, value: float, items: int | None = ITEMS, lost: float | None = None,
        gained: float | None = None) -> list[Metric]:
    """lm-eval's accuracy with its sample standard error (0 at 0 or 1, as lm-eval writes it)."""
    se = math.sqrt(value * (1 - value) / (items - 1)) if items else None
    out = [Metric(f"lm_eval.{task}.acc", value, se)]
    if lost is not None and gained is not None:
        out += [Metric(f"lm_eval.{task}.lost", lost), Metric(f"lm_eval.{task}.gained", gained),
                Metric(f"lm_eval.{task}.agree_fp", 1 - lost - gained)]
    return out


FP_PIQA = 11 / 30  # 0.3667, as lambada's FP accuracy in the bench store
# the same configurations under both protocols, with different losses under each
RUNS: list[dict[str, Any]] = [
    dict(rid="zq-fp", proto="zq", extra=acc("piqa", 0.6, 400)),  # a piqa accuracy on 400 items: another protocol
    dict(rid="zq-w8", proto="zq", w=weight(8), recipe=("rtn",), d=0.001, bits_weight=8.03),
    dict(rid="zq-w4", proto="zq", w=weight(4), recipe=("rtn",), d=0.08, bits_weight=4.03),
    dict(rid="zq-g4", proto="zq", w=weight(4, "group", group=64), recipe=("rtn",), d=0.002, bits_weight=4.5),
    dict(rid="zq-w3", proto="zq", w=weight(3), recipe=("rtn",), d=0.5, bits_weight=3.03),
    dict(rid="zq-a8", proto="zq", a=act(8), d=0.002, windows=False),
    dict(rid="q-fp", proto="qllm", extra=acc("piqa", FP_PIQA)),
    dict(rid="q-w8", proto="qllm", w=weight(8), recipe=("rtn",), d=0.0005, bits_weight=8.03,
         extra=acc("piqa", FP_PIQA, lost=0.0, gained=0.0)),
    dict(rid="q-w4", proto="qllm", w=weight(4), recipe=("rtn",), d=0.002, bits_weight=4.03,
         extra=acc("piqa", 0.4, lost=1 / 30, gained=2 / 30)),
    dict(rid="q-g4", proto="qllm", w=weight(4, "group", group=64), recipe=("rtn",), d=0.001, bits_weight=4.5,
         extra=acc("piqa", 0.3)),  # no paired measures: FP from the FP run of its cohort
    dict(rid="q-w3", proto="qllm", w=weight(3), recipe=("rtn",), d=0.2, bits_weight=3.03,
         extra=acc("piqa", 0.3, lost=0.1, gained=1 / 30)),
    dict(rid="q-w2a2", proto="qllm", w=weight(2), a=act(2), recipe=("rtn",), d=3.0, bits_weight=2.03,
         extra=acc("piqa", 0.0, lost=FP_PIQA, gained=0.0)),  # lost every item FP answered: lm-eval's stderr is 0
    dict(rid="q-a8", proto="qllm", a=act(8), d=0.002, windows=False),
    dict(rid="lone-w4", proto="lone", w=weight(4), recipe=("rtn",), d=0.01, bits_weight=4.03, windows=False),
    dict(rid="lone-w8", proto="lone", w=weight(8), recipe=("rtn",), d=0.001, bits_weight=8.03),
]


def build_two_protocol_store(path: Path, runs: list[dict[str, Any]] = RUNS) -> Store:
    store = Store(path)
    for n, spec in enumerate(runs):
        store.save(two_protocol_run(n=n, **spec))
    return store
