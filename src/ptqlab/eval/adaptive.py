"""Adaptive perplexity: evaluate windows until the degradation from FP is settled, not all of them.

A quantized model's window NLLs and the FP model's on the same windows are paired: their differences
``d_i = nll_q,i - nll_fp,i`` vary far less than the NLLs themselves, and the FP NLLs of every window are
already known from the reference. So after a few windows the degradation is known well enough to place
the configuration in its ZeroQuant-V2 class, or to rank it against the other runs of a sweep.

Per corpus ``c`` with ``N`` windows, ``n`` of them evaluated (in a fixed random order):

- the estimate is the control-variate ``ppl_c = exp(mean_fp_all + mean(d))``; at ``n == N`` it is computed
  exactly as :func:`ptqlab.eval.perplexity.perplexity` does, ``exp(mean of the quantized NLLs)``;
- the interval of ``mean(d)`` is ``mean(d) +- t_{(1+conf')/2, n-1} * sd(d) / sqrt(n) * sqrt((N-n)/(N-1))``
  (Student t with the finite-population correction: zero width at ``n == N``), with the Bonferroni split
  ``conf' = 1 - (1 - confidence) / C`` over the ``C`` corpora, mapped through the monotone
  ``x -> exp(mean_fp_all + x)``.

The degradation is ``delta = mean_c(ppl_q,c) - mean_c(ppl_fp,c)`` (ZeroQuant-V2 averages wikitext2, PTB and
C4); its interval is the mean of the corpus endpoints minus the mean FP perplexity. ZeroQuant-V2's classes:
1 for ``delta <= 0.1``, 2 for ``0.1 < delta <= 0.5``, 3 above.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..metrics import Metric, adaptive_name
from ..schema import AdaptiveConfig
from .perplexity import perplexity, perplexity_of

log = logging.getLogger(__name__)

CLASS_BOUNDS = (0.1, 0.5)
"""ZeroQuant-V2's class boundaries on the perplexity degradation: Class-1 up to 0.1, Class-2 up to 0.5."""

Band = tuple[float, float, float]
"""``(lo, estimate, hi)``."""


@dataclass(frozen=True)
class AdaptiveOutcome:
    """What an adaptive perplexity evaluation settled.

    Attributes:
        windows_used: Windows evaluated, per corpus.
        windows_total: Windows of the full set, per corpus.
        lo: Lower end of the interval of the degradation ``mean(ppl_q) - mean(ppl_fp)``.
        hi: Upper end of that interval.
        estimate: The point estimate of the degradation.
        stopped_early: Some corpus stopped before its full set.
        zq_class: The ZeroQuant-V2 class (1, 2 or 3) when the whole interval lies in it, else None.
        confidence: The joint confidence of the interval (over all corpora).
        target: What the evaluation went on until: ``class`` or ``rank``.

    """

    windows_used: dict[str, int]
    windows_total: dict[str, int]
    lo: float
    hi: float
    estimate: float
    stopped_early: bool
    zq_class: int | None
    confidence: float
    target: str


@dataclass
class CorpusRun:
    """One corpus of an adaptive evaluation: its windows, FP NLLs, order and what was evaluated so far.

    Attributes:
        name: The corpus.
        ids: All its windows, shape ``(N, seqlen)``.
        fp: The FP NLL of every window, in window order.
        order: The order windows are evaluated in (a permutation of ``range(N)``).
        nll: The quantized NLL of each window in window order, None where not evaluated.
        used: Windows evaluated (the first ``used`` of ``order``).
        seconds: Wall time of the evaluations.

    """

    name: str
    ids: torch.Tensor
    fp: list[float]
    order: list[int]
    nll: list[float | None] = field(default_factory=list)
    used: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.nll:
            self.nll = [None] * len(self.fp)

    @property
    def total(self) -> int:
        """Windows of the full set."""
        return len(self.fp)

    @property
    def tokens(self) -> int:
        """Tokens run through the model so far."""
        return self.used * int(self.ids.shape[1])

    @property
    def estimate(self) -> float:
        """The perplexity estimate of the full set (exact when every window was evaluated)."""
        return corpus_estimate(self.fp, self.nll)

    def advance(self, model: nn.Module, count: int, batch_size: int) -> int:
        """Evaluate the next ``count`` windows of the order (fewer at the end); returns how many."""
        idx = self.order[self.used : self.used + count]
        if not idx:
            return 0
        t0 = time.perf_counter()
        res = perplexity(model, self.ids[torch.tensor(idx)], batch_size=batch_size, progress=False,
                         desc=f"adaptive ppl {self.name}")
        self.seconds += time.perf_counter() - t0
        for i, value in zip(idx, res.nll, strict=True):
            self.nll[i] = value
        self.used += len(idx)
        return len(idx)


@dataclass
class AdaptiveRun:
    """An adaptive evaluation: each corpus's windows and what it settled."""

    corpora: dict[str, CorpusRun]
    outcome: AdaptiveOutcome


def window_order(n: int, seed: int) -> list[int]:
    """The fixed order windows are evaluated in: a permutation of ``range(n)`` from ``random.Random(seed)``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for aa in (m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: int) -> float:
    """``P(T > t)`` of Student's t with ``df`` degrees of freedom, for ``t >= 0``."""
    return 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile_bisect(p: float, df: int) -> float:
    """Student's t quantile by bisection on :func:`t_sf` (no scipy), to float precision."""
    if p < 0.5:
        return -t_quantile_bisect(1.0 - p, df)
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return mid
        if t_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy when installed).

    Raises:
        ValueError: ``p`` outside (0, 1) or ``df`` below 1.

    """
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return t_quantile_bisect(p, df)
    return float(student_t.ppf(p, df))


def interval(d: Sequence[float], total: int, confidence: float) -> tuple[float, float]:
    """Interval of the mean difference over all ``total`` windows from the ``len(d)`` evaluated.

    ``mean(d) +- t_{(1+confidence)/2, n-1} * sd(d) / sqrt(n) * sqrt((total - n) / (total - 1))``: zero
    width when every window was evaluated, unbounded with fewer than two of a larger set.

    Args:
        d: Paired differences ``nll_q - nll_fp`` of the evaluated windows.
        total: Windows of the full set (``>= len(d)``).
        confidence: Two-sided confidence level in (0, 1).

    Returns:
        ``(lo, hi)``.

    """
    n = len(d)
    if n == 0:
        return -math.inf, math.inf
    mean = math.fsum(d) / n
    if n >= total:
        return mean, mean
    if n < 2:
        return -math.inf, math.inf
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * statistics.stdev(d) / math.sqrt(n)
    half *= math.sqrt((total - n) / (total - 1))
    return mean - half, mean + half


def corpus_estimate(fp: Sequence[float], nll: Sequence[float | None]) -> float:
    """One corpus's perplexity estimate over all its windows: ``exp(mean_fp_all + mean(d))``.

    With every window evaluated it is ``exp(mean of nll)``, computed as ``perplexity()`` computes it (the
    same floats summed in window order), so it equals the full evaluation's value to the bit.
    """
    if all(v is not None for v in nll):
        return perplexity_of(sum(v for v in nll if v is not None) / len(nll))
    d = [v - f for v, f in zip(nll, fp, strict=True) if v is not None]
    if not d:
        return math.nan
    return perplexity_of(math.fsum(fp) / len(fp) + math.fsum(d) / len(d))


def corpus_band(fp: Sequence[float], nll: Sequence[float | None], confidence: float) -> Band:
    """``(lo, estimate, hi)`` of one corpus's perplexity over all its windows.

    Args:
        fp: The FP NLL of every window.
        nll: The quantized NLL of every window, None where not evaluated.
        confidence: Two-sided confidence of this corpus's interval.

    Returns:
        ``exp(mean_fp_all + x)`` at both ends of the interval of the mean difference and at its mean;
        with every window evaluated all three are ``exp(mean of nll)``, computed as ``perplexity()`` does.

    """
    estimate = corpus_estimate(fp, nll)
    if all(v is not None for v in nll):
        return estimate, estimate, estimate
    d = [v - f for v, f in zip(nll, fp, strict=True) if v is not None]
    mean_fp = math.fsum(fp) / len(fp)
    lo, hi = interval(d, len(fp), confidence)
    return perplexity_of(mean_fp + lo), estimate, perplexity_of(mean_fp + hi)


def bonferroni(confidence: float, parts: int) -> float:
    """The confidence of each of ``parts`` intervals so that all hold together at ``confidence``."""
    return 1.0 - (1.0 - confidence) / max(parts, 1)


def delta_interval(bands: Sequence[Band], fp_ppl: Sequence[float]) -> Band:
    """``(lo, estimate, hi)`` of ``mean(ppl_q) - mean(ppl_fp)`` from each corpus's band and FP perplexity."""
    fp_mean = sum(fp_ppl) / len(fp_ppl)
    lo, estimate, hi = (sum(b[k] for b in bands) / len(bands) - fp_mean for k in range(3))
    return lo, estimate, hi


def zq_class(delta: float) -> int | None:
    """ZeroQuant-V2's class of a perplexity degradation: 1 (<= 0.1), 2 (<= 0.5) or 3; None for nan."""
    if math.isnan(delta):
        return None
    if delta <= CLASS_BOUNDS[0]:
        return 1
    return 2 if delta <= CLASS_BOUNDS[1] else 3


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two closed intervals share a point."""
    return a[0] <= b[1] and b[0] <= a[1]


def settled(lo: float, hi: float, target: str, peers: Sequence[tuple[float, float]] = ()) -> bool:
    """Whether an interval of the degradation answers the question.

    Args:
        lo: Lower end.
        hi: Upper end.
        target: ``class``: the interval lies in one ZeroQuant-V2 class; ``rank``: it overlaps none of ``peers``.
        peers: The degradation intervals of the other runs (``rank``); none settles at once.

    Returns:
        True when evaluation can stop.

    """
    if math.isnan(lo) or math.isnan(hi):
        return False
    if target == "rank":
        return not any(overlaps((lo, hi), peer) for peer in peers)
    first = zq_class(lo)
    return first is not None and first == zq_class(hi)


def check_reference(windows: Mapping[str, torch.Tensor], fp_nll: Mapping[str, Sequence[float]]) -> None:
    """Adaptive evaluation needs the FP NLL of every window of every corpus.

    Raises:
        ConfigError: Naming the corpus whose FP window NLLs are missing or of the wrong count.

    """
    for corpus, ids in windows.items():
        fp = fp_nll.get(corpus)
        if fp is None:
            raise ConfigError(
                f"evaluate.adaptive compares against the FP reference, but it has no window NLLs for {corpus!r}: "
                "pass the FP reference measured before quantizing (ptqlab.reference(...))"
            )
        if len(fp) != ids.shape[0]:
            raise ConfigError(f"evaluate.adaptive: the FP reference has {len(fp)} window NLLs for {corpus!r}, "
                              f"the evaluation {ids.shape[0]} windows")


def outcome(corpora: Sequence[CorpusRun], config: AdaptiveConfig) -> AdaptiveOutcome:
    """What the windows evaluated so far settle (the interval at ``config.confidence`` over all corpora)."""
    each = bonferroni(config.confidence, len(corpora))
    bands = [corpus_band(c.fp, c.nll, each) for c in corpora]
    fp_ppl = [perplexity_of(sum(c.fp) / c.total) for c in corpora]
    lo, estimate, hi = delta_interval(bands, fp_ppl)
    cls = zq_class(lo)
    return AdaptiveOutcome(
        windows_used={c.name: c.used for c in corpora},
        windows_total={c.name: c.total for c in corpora},
        lo=lo, hi=hi, estimate=estimate,
        stopped_early=any(c.used < c.total for c in corpora),
        zq_class=cls if cls is not None and cls == zq_class(hi) else None,
        confidence=config.confidence,
        target=config.target,
    )


def adaptive_perplexity(
    model: nn.Module,
    windows: Mapping[str, torch.Tensor],
    fp_nll: Mapping[str, Sequence[float]],
    config: AdaptiveConfig,
    *,
    batch_size: int = 1,
    peers: Sequence[tuple[float, float]] = (),
    progress: bool = True,
) -> AdaptiveRun:
    """Evaluate perplexity windows round-robin over the corpora until the degradation is settled.

    Each corpus's windows go in the order :func:`window_order` gives; the first round evaluates
    ``config.min_windows`` of each, every later round ``config.step``, through
    :func:`ptqlab.eval.perplexity.perplexity` in batches of ``batch_size``. After each round the interval
    of the degradation is checked with :func:`settled`; the full set of every corpus is the ceiling.

    Args:
        model: The (quantized) model, where it runs.
        windows: All windows of each corpus, shape ``(N, seqlen)``.
        fp_nll: The FP NLL of every window of each corpus.
        config: The ``evaluate.adaptive`` section.
        batch_size: Windows per forward pass.
        peers: The degradation intervals of other runs (``target: rank``).
        progress: Show a bar over the windows.

    Returns:
        Each corpus's window NLLs and what was settled.

    Raises:
        ConfigError: A corpus without the FP NLL of each of its windows.

    """
    check_reference(windows, fp_nll)
    corpora = [CorpusRun(name, ids, list(fp_nll[name]), window_order(ids.shape[0], config.seed))
               for name, ids in windows.items()]
    count = config.min_windows
    with tqdm(total=sum(c.total for c in corpora), desc="adaptive ppl", unit="win", disable=not progress) as bar:
        while True:
            for corpus in corpora:
                bar.update(corpus.advance(model, count, batch_size))
            result = outcome(corpora, config)
            bar.set_postfix(delta=f"{result.estimate:.4g}", lo=f"{result.lo:.4g}", hi=f"{result.hi:.4g}")
            if not result.stopped_early or settled(result.lo, result.hi, config.target, peers):
                break
            count = config.step
    _log(result)
    return AdaptiveRun({c.name: c for c in corpora}, result)


def _log(result: AdaptiveOutcome) -> None:
    used, total = sum(result.windows_used.values()), sum(result.windows_total.values())
    log.info("adaptive ppl: %d/%d windows, delta %.4f in [%.4f, %.4f] at %.0f%%, class %s%s", used, total,
             result.estimate, result.lo, result.hi, 100 * result.confidence,
             result.zq_class if result.zq_class is not None else "unsettled",
             " (stopped early)" if result.stopped_early else "")


def outcome_metrics(result: AdaptiveOutcome) -> list[Metric]:
    """The outcome as metrics (``adaptive.delta_ppl``, ``lo``, ``hi``, ``windows``, ``early``, ``class``)."""
    metrics = [
        Metric(adaptive_name("delta_ppl"), result.estimate),
        Metric(adaptive_name("lo"), result.lo),
        Metric(adaptive_name("hi"), result.hi),
        Metric(adaptive_name("windows"), float(sum(result.windows_used.values()))),
        Metric(adaptive_name("early"), float(result.stopped_early)),
    ]
    if result.zq_class is not None:
        metrics.append(Metric(adaptive_name("class"), float(result.zq_class)))
    return metrics
