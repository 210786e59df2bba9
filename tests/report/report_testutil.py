"""A results store with known runs: every number the report derives can be computed here by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ptqlab.metrics import Metric
from ptqlab.store import RunRecord, Store

FP_PPL = {"wikitext2": 20.0, "ptb_new": 30.0, "c4local_new": 25.0}
FP_NOISE = (-0.02, 0.01, 0.0, 0.01)  # FP window NLLs around log(ppl)
Q_NOISE = (0.0, 0.002, -0.002, 0.0)  # the quantized windows' own departures (paired differences spread)
SIZE_PER_BIT = 6e6  # bytes per effective bit per weight


def ppl_name(corpus: str) -> str:
    return f"ppl.{corpus}.s512.w4"


def fp_nll(corpus: str) -> list[float]:
    return [math.log(FP_PPL[corpus]) + e for e in FP_NOISE]


def q_nll(corpus: str, d: float) -> list[float]:
    return [x + d + e for x, e in zip(fp_nll(corpus), Q_NOISE, strict=True)]


def weight(bits: int, gran: str = "channel", sym: bool = False, group: int | None = None) -> dict[str, Any]:
    return {"bits": bits, "format": "int", "granularity": gran, "group_size": group, "symmetric": sym}


def act(bits: int, sym: bool = False) -> dict[str, Any]:
    return {"bits": bits, "format": "int", "granularity": "token", "symmetric": sym, "dynamic": True}


def kv(bits: int) -> dict[str, Any]:
    return {"bits": bits, "granularity": "group", "group_size": 64, "symmetric": False}


def make_run(rid: str, *, w: dict[str, Any] | None = None, a: dict[str, Any] | None = None,
             k: dict[str, Any] | None = None, recipe: tuple[str, ...] = (), d: float = 0.0, windows: bool = True,
             bits_weight: float = 16.0, extra: list[Metric] | None = None, n: int = 0,
             sensitivity: list[dict[str, Any]] | None = None) -> RunRecord:
    """A finished run whose perplexity is FP's times exp(d) per window (plus Q_NOISE)."""
    fp = not (w or a or k)
    config = {"model": "tiny", "scheme": {"weight": w, "activation": a, "kv_cache": k, "overrides": []},
              "recipe": [{name: {}} for name in recipe], "evaluate": {"seqlen": 512, "max_windows": 4}}
    metrics = [Metric("bits.weight", bits_weight), Metric("size.model_bytes", bits_weight * SIZE_PER_BIT)]
    wins = {}
    for corpus in FP_PPL:
        nll = fp_nll(corpus) if fp else q_nll(corpus, d)
        metrics.append(Metric(ppl_name(corpus), math.exp(sum(nll) / len(nll))))
        if windows:
            wins[ppl_name(corpus)] = {"nll": nll, "fp_nll": fp_nll(corpus)}
    return RunRecord(id=rid, qmodel_key=rid, model="tiny", model_fingerprint="fp-tiny", architecture="Tiny",
                     config=config, status="done", created_at=f"2026-01-01T00:00:{n:02d}+00:00",
                     metrics=metrics + (extra or []), windows=wins, sensitivity=sensitivity or [])


def acc_metrics(task: str, acc: float, items: int, lost: float | None = None,
                gained: float | None = None) -> list[Metric]:
    se = math.sqrt(acc * (1 - acc) / (items - 1))
    out = [Metric(f"lm_eval.{task}.acc", acc, se)]
    if lost is not None and gained is not None:
        out += [Metric(f"lm_eval.{task}.lost", lost), Metric(f"lm_eval.{task}.gained", gained),
                Metric(f"lm_eval.{task}.agree_fp", 1 - lost - gained)]
    return out


def retrieval(acc512: float, acc2048: float) -> list[Metric]:
    return [Metric("retrieval.len512.p4.n10", acc512), Metric("retrieval.len2048.p4.n10", acc2048)]


def module_errors(scale: float) -> list[dict[str, Any]]:
    """Per-module errors of a 2-layer model: larger in deeper layers and in the MLP."""
    return [{"module": f"model.layers.{layer}.{name}", "layer": layer, "kind": "linear",
             "rel_error": scale * (1 + layer) * (2 if "mlp" in name else 1), "sqnr_db": 20.0}
            for layer in range(2) for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]


RUNS: list[dict[str, Any]] = [
    dict(rid="fp", extra=acc_metrics("piqa", 0.60, 400) + retrieval(1.0, 0.9)),
    dict(rid="w8row", w=weight(8), recipe=("rtn",), d=0.001, bits_weight=8.03),
    dict(rid="w4row", w=weight(4), recipe=("rtn",), d=0.10, bits_weight=4.03,
         extra=acc_metrics("piqa", 0.55, 400, lost=0.08, gained=0.03) + [Metric("kl.wikitext2.s512.w16", 0.2)],
         sensitivity=module_errors(0.01)),
    dict(rid="w4g64", w=weight(4, "group", group=64), recipe=("rtn",), d=0.05, bits_weight=4.5),
    dict(rid="w4gptq", w=weight(4), recipe=("gptq",), d=0.06, bits_weight=4.03),
    dict(rid="w3row", w=weight(3), recipe=("rtn",), d=0.5, bits_weight=3.03, sensitivity=module_errors(0.1)),
    dict(rid="w3g64", w=weight(3, "group", group=64), recipe=("rtn",), d=0.3, bits_weight=3.5),
    dict(rid="w3lorc", w=weight(3), recipe=("rtn", "lorc"), d=0.2, bits_weight=3.3),
    dict(rid="w4lorc", w=weight(4), recipe=("rtn", "lorc"), d=0.08, bits_weight=4.3),
    dict(rid="a8", a=act(8), d=0.03, windows=False),
    dict(rid="a4", a=act(4), d=1.2),
    dict(rid="w8a8", w=weight(8), a=act(8), recipe=("rtn",), d=0.002, bits_weight=8.03),
    dict(rid="w4a4", w=weight(4), a=act(4), recipe=("rtn",), d=1.5, bits_weight=4.03),
    dict(rid="kv8", k=kv(8), d=0.0005, extra=retrieval(1.0, 0.9)),
    dict(rid="kv4", k=kv(4), d=0.02, extra=retrieval(0.9, 0.5) + [Metric("kl.wikitext2.s512.w16", 0.05)]),
]


def build_store(path: Path, runs: list[dict[str, Any]] = RUNS) -> Store:
    store = Store(path)
    for n, spec in enumerate(runs):
        store.save(make_run(n=n, **spec))
    return store


def expected_quality(d: float) -> tuple[float, float]:
    """(mean ppl, increase over FP) of a run made with ``d``, from the definitions."""
    q = [math.exp(sum(q_nll(c, d)) / 4) for c in FP_PPL]
    fp = [math.exp(sum(fp_nll(c)) / 4) for c in FP_PPL]
    return sum(q) / 3, sum(q) / 3 - sum(fp) / 3
