"""What a run costs, as the report reads it: the bytes of its file and its speed in a runtime.

A run may carry measured costs beside its quality (:mod:`ptqlab.metrics`): ``size.file.gguf`` (the bytes
of the GGUF file llama.cpp loads), ``speed.<runtime>.pp<N>`` and ``speed.<runtime>.tg<N>`` (prompt
processing and generation in tokens per second, the median of repeats, with a standard error) and
``memory.<runtime>.peak`` (bytes). Every run also has the estimate ``size.model_bytes`` (from the effective
bits per weight).

:func:`run_size` is a run's size, measured where it has one and estimated otherwise, saying which
(:attr:`Size.source`); :func:`generation_speed` its generation speed, llama.cpp's where it was timed in
several runtimes. Costs are read only within a cohort, as every other number of the report, and a
speed is read beside the settings it was measured with (:func:`speed_settings`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..metrics import SIZE_MODEL_BYTES, SPEED_KINDS, SPEED_RUNTIMES, file_size_name, parse_name
from .runs import Z95, RunView, json_ready

__all__ = ["GGUF_SIZE", "MIB", "Size", "Speed", "SpeedMetric", "generation_speed", "has_cost", "measured_size",
           "run_size", "speed", "speed_metric", "speed_metrics", "speed_settings"]

GGUF_SIZE = file_size_name("gguf")
MIB = 2.0**20
RUNTIME_WORDS = {"llama_cpp": "llama.cpp", "torch": "torch", "vllm": "vLLM"}
MEASURED = "measured GGUF file"
ESTIMATED = "estimated from effective bits"


@dataclass(frozen=True)
class SpeedMetric:
    """A speed metric's parts: ``speed.llama_cpp.tg128`` is generation in llama.cpp over 128 tokens."""

    name: str
    runtime: str
    kind: str
    tokens: int

    @property
    def words(self) -> str:
        """``llama.cpp tg128``."""
        return f"{RUNTIME_WORDS.get(self.runtime, self.runtime)} {self.kind}{self.tokens}"

    @property
    def header(self) -> str:
        """``llama.cpp tg128 t/s``: a table column's head."""
        return f"{self.words} t/s"

    @property
    def order(self) -> tuple[int, int, int]:
        """llama.cpp first, then prompt before generation, then fewer tokens first."""
        rank = SPEED_RUNTIMES.index(self.runtime) if self.runtime in SPEED_RUNTIMES else len(SPEED_RUNTIMES)
        return rank, SPEED_KINDS.index(self.kind), self.tokens


def speed_metric(name: str) -> SpeedMetric | None:
    """The parts of a speed metric's name (None for any other metric)."""
    m = parse_name(name)
    if m.kind != "speed" or m.measure is None:
        return None
    runtime, _, what = m.measure.partition(".")
    kind = next((k for k in SPEED_KINDS if what.startswith(k) and what[len(k):].isdigit()), None)
    return None if kind is None else SpeedMetric(name, runtime, kind, int(what[len(kind):]))


def speed_metrics(views: Iterable[RunView], kind: str | None = None) -> list[SpeedMetric]:
    """The speed metrics any of ``views`` has (only ``kind``'s, ``pp`` or ``tg``, when given), in display order."""
    found = {s for v in views for n in v.metrics if (s := speed_metric(n)) is not None}
    return sorted((s for s in found if kind is None or s.kind == kind), key=lambda s: s.order)


@dataclass(frozen=True)
class Speed:
    """A run's tokens per second in a runtime (the median of repeats) and its standard error."""

    metric: SpeedMetric
    value: float
    stderr: float | None = None

    @property
    def half_width(self) -> float | None:
        """Half the 95 % interval, 1.96 standard errors (None without a standard error)."""
        return None if self.stderr is None else Z95 * self.stderr

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping (strict JSON)."""
        half = self.half_width
        return json_ready({"metric": self.metric.name, "runtime": RUNTIME_WORDS.get(self.metric.runtime),
                           "what": self.metric.words, "tokens_per_s": self.value, "stderr": self.stderr,
                           "interval": None if half is None else [self.value - half, self.value + half]})


def speed(v: RunView, metric: SpeedMetric) -> Speed | None:
    """The run's ``metric`` (None when it was not measured)."""
    value = v.metrics.get(metric.name)
    return None if value is None else Speed(metric, value, v.stderr.get(metric.name))


def generation_speed(v: RunView) -> Speed | None:
    """The run's generation tokens/s: llama.cpp's where several runtimes timed it (None: not measured)."""
    found = speed_metrics([v], "tg")
    return speed(v, found[0]) if found else None


@dataclass(frozen=True)
class Size:
    """A run's size in bytes and whether it is the measured GGUF file or the estimate from effective bits."""

    bytes: float
    measured: bool

    @property
    def source(self) -> str:
        """``measured GGUF file`` or ``estimated from effective bits``."""
        return MEASURED if self.measured else ESTIMATED

    @property
    def metric(self) -> str:
        """The metric the size is: ``size.file.gguf`` or ``size.model_bytes``."""
        return GGUF_SIZE if self.measured else SIZE_MODEL_BYTES

    @property
    def mib(self) -> float:
        """The size in MiB."""
        return self.bytes / MIB

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping (strict JSON)."""
        return json_ready({"bytes": self.bytes, "source": self.source, "metric": self.metric})


def measured_size(v: RunView) -> float | None:
    """The bytes of the run's GGUF file (None: not measured)."""
    return v.metrics.get(GGUF_SIZE)


def run_size(v: RunView, measured_only: bool = False) -> Size | None:
    """The run's measured file size, else (unless ``measured_only``) its estimated size; None with neither."""
    file = measured_size(v)
    if file is not None:
        return Size(file, True)
    return None if measured_only or v.size_bytes is None else Size(v.size_bytes, False)


def has_cost(v: RunView) -> bool:
    """Whether the run has a measured cost: its file's size or a speed."""
    return measured_size(v) is not None or bool(speed_metrics([v]))


def _setting(v: RunView) -> str:
    """``Intel(R) Xeon(R) Processor, cpu, 4 threads, median of 5 repeats``: what the run's speed was measured with.

    The CPU model leads where the run recorded its machine (runs stored before that have none).
    """
    spec = (v.record.config.get("evaluate") or {}).get("speed") or {}
    threads = spec.get("threads") or v.record.threads
    parts = [str((v.record.machine or {}).get("cpu") or ""), v.record.device or "",
             f"{threads} threads" if threads else "",
             f"median of {spec['repeats']} repeats" if spec.get("repeats") else ""]
    return ", ".join(p for p in parts if p)


def speed_settings(views: Iterable[RunView]) -> str:
    """The speed settings of the runs with a speed, for a caption ("" when none has one).

    Runs timed with different settings (CPU model, device, threads, repeats) are said to be so: their speeds
    are compared with care.
    """
    found = sorted({_setting(v) for v in views if speed_metrics([v])} - {""})
    if not found:
        return ""
    if len(found) == 1:
        return f"Speeds measured on {found[0]}."
    return (f"Speeds measured with different settings ({'; '.join(found)}): compare them with care.")
