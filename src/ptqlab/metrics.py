"""Metrics and their names: the one place that says how a measurement is named.

A name says its protocol and size (``ppl.wikitext2.s2048.w40``: 40 windows of 2048 wikitext2 tokens), so
numbers measured under different protocols never share a name. Evaluation, size accounting and methods
name what they measure through these functions; nothing else builds a metric name.
"""

from __future__ import annotations

from dataclasses import dataclass

SIZE_MODEL_BYTES = "size.model_bytes"
BITS_WEIGHT = "bits.weight"
BITS_ACTIVATION = "bits.activation"
BITS_KV = "bits.kv"
DIALOGUE_ANSWERS = "dialogue.answers"
DIALOGUE_JUDGE = "dialogue.judge.score"
DIALOGUE_UNRATED = "dialogue.judge.unrated"
DIVERGENCE_KINDS = ("kl", "top1", "top5")
PAIRED_TASK_MEASURES = ("agree_fp", "lost", "gained")
ADAPTIVE_MEASURES = ("delta_ppl", "lo", "hi", "windows", "early", "class")


@dataclass
class Metric:
    """A named measurement and its standard error, when one exists."""

    name: str
    value: float
    stderr: float | None = None


def sized_name(kind: str, corpus: str, seqlen: int, windows: int) -> str:
    """``<kind>.<corpus>.s<seqlen>.w<windows>``, e.g. ``kl.wikitext2.s512.w16``."""
    return f"{kind}.{corpus}.s{seqlen}.w{windows}"


def perplexity_name(corpus: str, seqlen: int, windows: int) -> str:
    """``ppl.<corpus>.s<seqlen>.w<windows>``: perplexity under the GPTQ protocol."""
    return sized_name("ppl", corpus, seqlen, windows)


def divergence_name(kind: str, corpus: str, seqlen: int, windows: int) -> str:
    """``kl.*``, ``top1.*`` or ``top5.*`` of the divergence from FP on a corpus's first windows."""
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence measure {kind!r}; known: {', '.join(DIVERGENCE_KINDS)}")
    return sized_name(kind, corpus, seqlen, windows)


def task_name(task: str, measure: str) -> str:
    """``lm_eval.<task>.<measure>``: lm-eval's own measure names, or a paired measure against FP."""
    return f"lm_eval.{task}.{measure}"


def retrieval_name(length: int, pairs: int, samples: int) -> str:
    """``retrieval.len<length>.p<pairs>.n<samples>``: long-context pass-key retrieval accuracy."""
    return f"retrieval.len{length}.p{pairs}.n{samples}"


def method_name(method: str, measure: str) -> str:
    """``<method>.<measure>``: what a quantization method reports about its own work."""
    return f"{method}.{measure}"


def adaptive_name(measure: str) -> str:
    """``adaptive.<measure>``: what adaptive perplexity settled.

    Measures: ``delta_ppl`` (the point estimate of mean quantized minus mean FP perplexity over the
    corpora), ``lo`` and ``hi`` (its interval), ``windows`` (windows evaluated, all corpora), ``early``
    (1 when some corpus stopped before its full set) and ``class`` (the ZeroQuant-V2 class the interval
    settles, when it does).
    """
    if measure not in ADAPTIVE_MEASURES:
        raise ValueError(f"unknown adaptive measure {measure!r}; known: {', '.join(ADAPTIVE_MEASURES)}")
    return f"adaptive.{measure}"
