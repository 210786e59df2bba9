"""Self-calibration of multiple-choice answers: expected calibration error and the reliability curve.

An item's confidence is the largest of its choices' probabilities, normalized over the choices
(``softmax`` of the choices' log-likelihoods, as lm-eval scores them); it is correct when that choice is
the gold one (lm-eval's own per-item ``acc``). Confidences fall into equal-width bins
``(0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]`` (B = 10 by default; as Guo et al. 2017, "On Calibration of
Modern Neural Networks"), and

    ECE = sum over bins b of |b| / n * |acc(b) - conf(b)|

with ``acc(b)`` the fraction of correct items of the bin and ``conf(b)`` their mean confidence. The
reliability curve is, per bin, its count, mean confidence and accuracy (None for an empty bin).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BINS = 10


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin ``(lo, hi]``: how many items fell in it, their mean confidence and accuracy."""

    lo: float
    hi: float
    count: int
    confidence: float | None
    accuracy: float | None


@dataclass(frozen=True)
class Reliability:
    """Expected calibration error over ``n`` items and the reliability curve it is computed from."""

    ece: float
    n: int
    bins: list[ReliabilityBin]

    def to_json(self) -> dict[str, Any]:
        """The ECE, the item count and the bins as a JSON-ready mapping."""
        return {"ece": self.ece, "n": self.n, "bins": [asdict(b) for b in self.bins]}


def choice_confidence(logliks: Sequence[float]) -> float:
    """The largest choice probability, normalized over the choices, of an item's log-likelihoods.

    Raises:
        ValueError: No choice, or a log-likelihood that is NaN.

    """
    if not logliks or any(math.isnan(x) for x in logliks):
        raise ValueError(f"an item needs finite choice log-likelihoods, got {list(logliks)}")
    top = max(logliks)
    if math.isinf(top):  # every choice impossible: no choice is preferred
        return 1.0 / len(logliks)
    total = sum(math.exp(x - top) for x in logliks)  # softmax's denominator, the top choice's term is 1
    return 1.0 / total


def bin_index(confidence: float, bins: int = DEFAULT_BINS) -> int:
    """The bin ``(k/bins, (k+1)/bins]`` that holds ``confidence`` (0 falls in the first bin)."""
    edges = [k / bins for k in range(bins + 1)]
    return min(max(bisect.bisect_left(edges, confidence) - 1, 0), bins - 1)


def reliability(confidence: Sequence[float], correct: Sequence[float], bins: int = DEFAULT_BINS) -> Reliability:
    """The expected calibration error and the reliability curve of items' confidences and correctness.

    Args:
        confidence: Each item's confidence, in [0, 1].
        correct: Each item's correctness, 0 or 1.
        bins: The number of equal-width confidence bins.

    Returns:
        ECE (0 when there are no items) and the bins.

    Raises:
        ValueError: Lengths differ, a confidence outside [0, 1], a correctness other than 0 or 1, or
            fewer than one bin.

    """
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences but {len(correct)} correctness values")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if any(not 0.0 <= c <= 1.0 for c in confidence):
        raise ValueError("confidences must lie in [0, 1]")
    if any(a not in (0, 1) for a in correct):
        raise ValueError("correctness values must be 0 or 1")
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, c in enumerate(confidence):
        members[bin_index(c, bins)].append(i)
    n = len(confidence)
    curve = [_bin(k, bins, [confidence[i] for i in idx], [correct[i] for i in idx]) for k, idx in enumerate(members)]
    ece = sum(b.count / n * abs(b.accuracy - b.confidence) for b in curve
              if b.accuracy is not None and b.confidence is not None)
    return Reliability(float(ece), n, curve)


def _bin(k: int, bins: int, confidence: list[float], correct: list[float]) -> ReliabilityBin:
    if not confidence:
        return ReliabilityBin(k / bins, (k + 1) / bins, 0, None, None)
    count = len(confidence)
    return ReliabilityBin(k / bins, (k + 1) / bins, count, sum(confidence) / count, sum(correct) / count)


def task_reliability(loglik: dict[str, list[list[float]]], correct: dict[str, list[float]],
                     bins: int = DEFAULT_BINS) -> dict[str, Reliability]:
    """ECE and reliability curve of each multiple-choice task, from its items' choice log-likelihoods.

    A task whose items are not each right or wrong (truthfulqa_mc2 scores the probability mass of several
    true answers) has no ECE: it is left out, and why is logged.

    Args:
        loglik: Per task, each item's log-likelihood of every choice (lm-eval's per-sample outputs).
        correct: Per task, each item's correctness (lm-eval's per-item ``acc``), in the same order.
        bins: The number of equal-width confidence bins.

    Returns:
        ``{task: reliability}`` for the tasks that have one.

    """
    out: dict[str, Reliability] = {}
    for task, items in loglik.items():
        right = correct.get(task, [])
        if not items:
            continue
        if len(right) != len(items) or any(c not in (0, 1) for c in right):
            log.info("%s: items are not scored right or wrong (several true answers?): no ECE", task)
            continue
        out[task] = reliability([choice_confidence(x) for x in items], right, bins)
    return out
