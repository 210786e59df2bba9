"""Metrics and their names: the one place that says how a measurement is named.

A name says its protocol and size (``ppl.wikitext2.s2048.w40``: 40 windows of 2048 wikitext2 tokens), so
numbers measured under different protocols never share a name. Evaluation, size accounting and methods
name what they measure through these functions; nothing else builds a metric name, and
:func:`parse_name` reads one back (the report reads names only through it).
"""

from __future__ import annotations

from dataclasses import dataclass

SIZE_MODEL_BYTES = "size.model_bytes"
BITS_WEIGHT = "bits.weight"
BITS_ACTIVATION = "bits.activation"
BITS_KV = "bits.kv"
BITS_SOURCE = "bits.source"
"""Bits per weight of the decoder linears in the file the model was read from (a GGUF's: its FP reference is the
dequantized file, not FP16); absent when the weights came in floating point (safetensors)."""
DIALOGUE_ANSWERS = "dialogue.answers"
DIALOGUE_JUDGE = "dialogue.judge.score"
DIALOGUE_UNRATED = "dialogue.judge.unrated"
FIDELITY_KINDS = ("kl_se", "kl_p50", "kl_p90", "kl_p95", "kl_p99", "kl_p999", "kl_max",
                  "dp_mean", "dp_rms", "dp_min", "dp_p1", "dp_p5", "dp_p50", "dp_p95", "dp_p99", "dp_max")
"""The statistics ``llama-perplexity --kl-divergence`` reports, beside the means, per run against FP.

``kl_se``: the standard error of the mean per-token KL (``kl``); ``kl_p50`` (the median) ... ``kl_p999``
(the 99.9th percentile) and ``kl_max``: of the per-token KL. ``dp_*``: of Δp, the probability Q gives
the correct next token minus FP's (a fraction, not percent): its mean, RMS, minimum, 1st ... 99th
percentiles and maximum. The same-top-token rate is ``top1``. Which KL: see :mod:`ptqlab.eval.divergence`
(over FP's top-k tokens plus a tail bucket: a lower bound of the full-vocabulary KL).
"""
DIVERGENCE_KINDS = ("kl", "top1", "top5", *FIDELITY_KINDS)
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
    """``kl.*``, ``top1.*``, ``top5.*`` or a :data:`FIDELITY_KINDS` statistic (``kl_p99.*``) of a corpus's windows."""
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


SPEED_RUNTIMES = ("llama_cpp", "torch", "vllm")
"""The runtimes a run's speed is measured in, as they appear in metric names (``llama.cpp`` is ``llama_cpp``)."""
SPEED_KINDS = ("pp", "tg")
"""``pp``: prompt processing (tokens/s over a prompt of N tokens in one batch); ``tg``: generation (tokens/s
over N tokens generated one at a time), as llama.cpp's ``llama-bench`` names them (``pp512``, ``tg128``)."""


def speed_name(runtime: str, kind: str, tokens: int) -> str:
    """``speed.<runtime>.<kind><tokens>``, e.g. ``speed.llama_cpp.tg128``: tokens per second (median of repeats)."""
    if runtime not in SPEED_RUNTIMES:
        raise ValueError(f"unknown speed runtime {runtime!r}; known: {', '.join(SPEED_RUNTIMES)}")
    if kind not in SPEED_KINDS:
        raise ValueError(f"unknown speed kind {kind!r}; known: {', '.join(SPEED_KINDS)}")
    return f"speed.{runtime}.{kind}{tokens}"


def file_size_name(fmt: str) -> str:
    """``size.file.<fmt>``: the bytes of the file a runtime loads (``size.file.gguf``)."""
    return f"size.file.{fmt}"


def peak_memory_name(runtime: str) -> str:
    """``memory.<runtime>.peak``: the peak resident memory (bytes) of the process that ran the model."""
    if runtime not in SPEED_RUNTIMES:
        raise ValueError(f"unknown speed runtime {runtime!r}; known: {', '.join(SPEED_RUNTIMES)}")
    return f"memory.{runtime}.peak"


SIZED_KINDS = ("ppl", *DIVERGENCE_KINDS)
FEWSHOT_SUFFIX = ".fewshot"


@dataclass(frozen=True)
class MetricName:
    """A metric name read back into the parts its builder put in (:func:`parse_name`); ``str()`` rebuilds it.

    Attributes:
        kind: The first part: ``ppl``, ``kl``, ``top1``, ``top5`` (or a :data:`FIDELITY_KINDS` statistic),
            ``lm_eval``, ``retrieval``, ``adaptive``, ``bits``, ``size``, ``dialogue`` or a method's name.
        corpus: Perplexity and divergence: the corpus.
        seqlen: Perplexity and divergence: the window length.
        windows: Perplexity and divergence: the number of windows.
        task: lm-eval: the task.
        measure: lm-eval (without its few-shot suffix), adaptive, a method's or another kind's own measure.
        shots: lm-eval on a few-shot curve: the count.
        length: Retrieval: the prompt length.
        pairs: Retrieval: the key-value pairs.
        samples: Retrieval: the samples.

    """

    kind: str
    corpus: str | None = None
    seqlen: int | None = None
    windows: int | None = None
    task: str | None = None
    measure: str | None = None
    shots: int | None = None
    length: int | None = None
    pairs: int | None = None
    samples: int | None = None

    def __str__(self) -> str:
        """The name again, through the builder of its kind."""
        sized = self.corpus is not None and self.seqlen is not None and self.windows is not None
        if self.kind in SIZED_KINDS and sized:
            return sized_name(self.kind, str(self.corpus), int(self.seqlen or 0), int(self.windows or 0))
        if self.kind == "lm_eval" and self.task is not None and self.measure is not None:
            suffix = "" if self.shots is None else f"{FEWSHOT_SUFFIX}{self.shots}"
            return task_name(self.task, self.measure + suffix)
        if self.kind == "retrieval" and None not in (self.length, self.pairs, self.samples):
            return retrieval_name(int(self.length or 0), int(self.pairs or 0), int(self.samples or 0))
        return self.kind if self.measure is None else f"{self.kind}.{self.measure}"


def _prefixed_int(part: str, prefix: str) -> int | None:
    rest = part.removeprefix(prefix)
    return int(rest) if part.startswith(prefix) and rest.isdigit() else None


def parse_name(name: str) -> MetricName:
    """Read a metric name back into its parts (the inverse of the builders above: ``str(parse_name(n)) == n``).

    A name that no builder of its kind could have made (``ppl.wikitext2`` without its size) keeps its
    kind and the rest as its measure.
    """
    kind, _, rest = name.partition(".")
    parts = rest.split(".") if rest else []
    if kind in SIZED_KINDS and len(parts) == 3:
        seqlen, windows = _prefixed_int(parts[1], "s"), _prefixed_int(parts[2], "w")
        if seqlen is not None and windows is not None:
            return MetricName(kind, corpus=parts[0], seqlen=seqlen, windows=windows)
    if kind == "lm_eval" and len(parts) >= 2:
        measure, shots = ".".join(parts[1:]), None
        head, sep, count = measure.rpartition(FEWSHOT_SUFFIX)
        if sep and count.isdigit():
            measure, shots = head, int(count)
        return MetricName(kind, task=parts[0], measure=measure, shots=shots)
    if kind == "retrieval" and len(parts) == 3:
        length, pairs, samples = (_prefixed_int(p, x) for p, x in zip(parts, ("len", "p", "n"), strict=True))
        if None not in (length, pairs, samples):
            return MetricName(kind, length=length, pairs=pairs, samples=samples)
    return MetricName(kind, measure=rest or None)
