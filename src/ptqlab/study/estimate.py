"""How long a run will take, from the timings of the runs already in the store.

A run that repeats a stored protocol (same model, method and ``evaluate`` section) takes what those runs
took: the median of their totals. Otherwise the run is cut into phases (loading, quantization, FP
references, each evaluation) and each phase is priced at the median rate the store's runs of the same model
had for it: seconds per load, per quantization with the same method, per perplexity token, per task item,
per divergence or retrieval token. A quantization with no stored run at its weight bits is priced at the
same recipe's runs at other bits (GPTQ's Hessians and column loop, LoRC's SVDs cost the same at 3 as at 4
bits). A phase the model's runs never had (a recipe, the divergence) is priced at the stored model of the
nearest forward cost, scaled by the two models' seconds per perplexity token (named in
:attr:`Estimate.borrowed`). A phase with no
stored rate is named, and the run then has no total: a sum that leaves out a phase is not its time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_PHASES = ("load", "quantize", "reference", "perplexity", "tasks", "divergence", "long_context", "sensitivity")


@dataclass(frozen=True)
class Workload:
    """What a run computes, counted (None where a count is not known).

    Attributes:
        model: The model as the configuration names it.
        method: The recipe's methods joined by ``,`` (``rtn`` when it names none) and the weight bits.
        ppl_tokens: Perplexity tokens over all corpora.
        task_items: Task items over all tasks.
        divergence_tokens: Tokens the divergence runs over.
        retrieval_tokens: Prompt tokens of the long-context retrieval (lengths x samples).
        sensitivity: Whether the per-module sensitivity runs.
        reference_cached: Whether the FP perplexity reference is in the disk cache; only False prices it (a
            sweep measures it once for all its runs).

    """

    model: str
    method: str
    ppl_tokens: int | None = 0
    task_items: int | None = 0
    divergence_tokens: int = 0
    retrieval_tokens: int = 0
    sensitivity: bool = False
    reference_cached: bool | None = None


def method_key(config: dict[str, Any]) -> str:
    """The method of a normalized configuration: recipe names and weight bits (``gptq@4``, ``rtn@16``)."""
    names = ",".join(next(iter(step)) for step in config.get("recipe") or []) or "rtn"
    weight = (config.get("scheme") or {}).get("weight") or {}
    return f"{names}@{weight.get('bits', 16)}"


def workload_of(config: dict[str, Any]) -> Workload:
    """The workload of a normalized configuration, counted from its keys (corpora assumed long enough)."""
    ev = config.get("evaluate") or {}
    windows, seqlen = ev.get("max_windows"), int(ev.get("seqlen") or 0)
    corpora = ev.get("perplexity") or []
    ppl = None if corpora and windows is None else len(corpora) * int(windows or 0) * seqlen
    tasks, limit = ev.get("tasks") or [], ev.get("limit")
    items = None if tasks and limit is None else len(tasks) * int(limit or 0)
    div = ev.get("divergence")
    div = {"seqlen": 512, "windows": 16} if div is True else (div or {})
    lc = ev.get("long_context") or {}
    return Workload(
        model=str(config.get("model")),
        method=method_key(config),
        ppl_tokens=ppl,
        task_items=items,
        divergence_tokens=int(div.get("windows", 0)) * int(div.get("seqlen", 0)),
        retrieval_tokens=sum(lc.get("lengths") or []) * int(lc.get("samples") or 0),
        sensitivity=ev.get("sensitivity") is not None,
    )


@dataclass
class Estimate:
    """Seconds per phase (the phases the run has), and the phases it has but no stored rate prices."""

    seconds: dict[str, float] = field(default_factory=dict)
    unpriced: list[str] = field(default_factory=list)
    basis: str = ""
    borrowed: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> float | None:
        """The sum of the phases, or None when a phase could not be priced."""
        return self.priced if self.seconds and not self.unpriced else None

    @property
    def priced(self) -> float:
        """The sum of the phases that could be priced (a lower bound where some could not)."""
        return sum(self.seconds.values())


class Estimator:
    """Prices runs from the store's finished runs (:meth:`~ptqlab.store.Store.timings`)."""

    def __init__(self, done: Iterable[tuple[dict[str, Any], dict[str, float]]]) -> None:
        self._totals: dict[tuple[str, str, str], list[float]] = {}
        self._rates: dict[tuple[str, str], list[float]] = {}
        self._runs: dict[str, int] = {}
        for config, timings in done:
            self._add(config, timings)

    def _add(self, config: dict[str, Any], t: dict[str, float]) -> None:
        if "total_s" not in t:
            return
        work, model = workload_of(config), str(config.get("model"))
        self._runs[model] = self._runs.get(model, 0) + 1
        self._totals.setdefault(_exact(config), []).append(float(t["total_s"]))

        def rate(phase: str, value: float) -> None:
            self._rates.setdefault((model, phase), []).append(value)

        if t.get("load_s", 0.0) > 0:
            rate("load", t["load_s"] + t.get("data_s", 0.0))
        if "quantize_s" in t and not t.get("qmodel_reused"):
            rate(f"quantize:{work.method}", t["quantize_s"])
        speeds = [v for k, v in t.items() if k.startswith("eval.") and k.endswith("_tok_per_s") and v > 0]
        if speeds:
            rate("ppl_token", 1.0 / statistics.median(speeds))
        if t.get("lm_eval_s") and work.task_items:
            rate("task_item", t["lm_eval_s"] / work.task_items)
        if t.get("divergence_s") and work.divergence_tokens:
            rate("divergence_token", t["divergence_s"] / work.divergence_tokens)
        retrieval = sum(v for k, v in t.items() if k.startswith("retrieval.len"))
        if retrieval and work.retrieval_tokens:
            rate("retrieval_token", retrieval / work.retrieval_tokens)
        if "sensitivity_s" in t:
            rate("sensitivity", t["sensitivity_s"])

    def _rate(self, model: str, phase: str) -> float | None:
        found = self._rates.get((model, phase))
        if not found and phase.startswith("quantize:"):  # the same recipe at other weight bits
            found = self._recipe_runs(model, phase)
        return statistics.median(found) if found else None

    def _recipe_runs(self, model: str, phase: str) -> list[float]:
        """Seconds of the stored runs of ``phase``'s recipe on ``model`` at any weight bits."""
        recipe = phase.rsplit("@", 1)[0] + "@"
        return [v for (m, p), vs in self._rates.items() if m == model and p.startswith(recipe) for v in vs]

    def _borrowed_rate(self, model: str, phase: str) -> tuple[float, str] | None:
        """``phase``'s rate on the other stored model nearest in seconds per token, scaled to ``model``."""
        own = self._rate(model, "ppl_token")
        if own is None:
            return None
        found = []
        for other in sorted({m for m, _ in self._rates} - {model}):
            rate, theirs = self._rate(other, "ppl_token"), self._rate(other, phase)
            if rate is not None and theirs is not None:
                found.append((abs(math.log(own / rate)), other, theirs * own / rate))
        if not found:
            return None
        _, other, seconds = min(found)
        return seconds, other

    def total(self, config: dict[str, Any]) -> float | None:
        """Seconds for a normalized configuration: stored runs of the same protocol, else by phase."""
        same = self._totals.get(_exact(config))
        if same:
            return statistics.median(same)
        return self.estimate(workload_of(config)).total

    def estimate(self, work: Workload) -> Estimate:
        """Seconds per phase of ``work``, priced at the stored rates of its model."""
        out = Estimate(basis=f"{self._runs.get(work.model, 0)} finished runs of {work.model} in the store")
        wanted: dict[str, tuple[str, float] | None] = {
            "load": ("load", 1.0),
            "quantize": (f"quantize:{work.method}", 1.0),
            "perplexity": None if work.ppl_tokens is None else ("ppl_token", float(work.ppl_tokens)),
            "reference": ("ppl_token", float(work.ppl_tokens or 0) if work.reference_cached is False else 0.0),
            "tasks": None if work.task_items is None else ("task_item", float(work.task_items)),
            "divergence": ("divergence_token", float(work.divergence_tokens)),
            "long_context": ("retrieval_token", float(work.retrieval_tokens)),
            "sensitivity": ("sensitivity", 1.0 if work.sensitivity else 0.0),
        }
        for phase in _PHASES:
            priced = wanted[phase]
            if priced is None:
                if phase in ("perplexity", "tasks"):
                    out.unpriced.append(f"{phase} (count unknown)")
                continue
            name, amount = priced
            if amount == 0 or (phase == "perplexity" and not work.ppl_tokens):
                continue
            r = self._rate(work.model, name)
            if r is None and name != "ppl_token":
                borrowed = self._borrowed_rate(work.model, name)
                if borrowed is not None:
                    r, out.borrowed[phase] = borrowed
            if r is None:
                out.unpriced.append(phase)
            else:
                out.seconds[phase] = r * amount
        return out


def _exact(config: dict[str, Any]) -> tuple[str, str, str]:
    evaluation = repr(sorted((config.get("evaluate") or {}).items()))
    return str(config.get("model")), method_key(config), evaluation
