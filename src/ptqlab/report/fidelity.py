"""Fidelity to FP at the level ``llama-perplexity --kl-divergence`` reports, from what runs store.

Per run against FP over the same tokens (the divergence metrics, see :data:`ptqlab.metrics.FIDELITY_KINDS`):
the KL's mean ± standard error, median, 90/95/99/99.9th percentiles and maximum, the same-top-token rate
(``top1``) and Δp (the change of the probability of the correct next token) by its RMS and tails. The KL
is ptqlab's: over FP's top-k tokens plus one tail bucket, a lower bound of the full-vocabulary KL that
llama.cpp computes (``bench/bench_kl_llamacpp.py`` measures both on the same tokens).

Computed here from the stored windows and task measures:

- the perplexity ratio ``PPL(Q) / PPL(FP)`` with its paired uncertainty: ``ln ratio`` is the mean of the
  per-window differences of mean token NLL (exactly ``ln PPL(Q) - ln PPL(FP)`` under the GPTQ protocol's
  equal windows), its standard error their standard deviation over ``sqrt(windows)``, and the ratio's
  the delta method's ``ratio * se(ln ratio)`` (llama.cpp's convention, which pairs over tokens instead:
  pairing over windows keeps the correlation of neighbouring tokens inside each sample);
- task items flipped right -> wrong (``lost``) and wrong -> right (``gained``) against FP, as counts, with
  McNemar's exact two-sided p-value (a binomial test of the flips at one half);
- whether two measured changes *cannot be told apart*: their difference is below the minimum detectable
  effect of their samples, ``(z_(1 - alpha/2) + z_power) * se``, at a two-sided 5 % level and 80 % power
  by default (2.80 standard errors), with the two standard errors combined as independent (conservative
  for two runs paired on the same items or windows, whose changes correlate positively).

The tables are :class:`~ptqlab.report.tables.Table` objects (imported when built, so that
:mod:`.tables` may import this module).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from ..metrics import MetricName, parse_name, sized_name, task_name
from .table import Table

if TYPE_CHECKING:
    from .runs import RunView

__all__ = ["ALPHA", "POWER", "Effect", "Flips", "Ratio", "cannot_tell_apart", "fidelity_table", "fidelity_tables",
           "flips", "flips_table", "mcnemar_exact", "minimum_detectable_effect", "ppl_ratio"]

ALPHA = 0.05
"""Two-sided significance level of the minimum detectable effect."""
POWER = 0.80
"""Power of the minimum detectable effect."""


@dataclass(frozen=True)
class Ratio:
    """A perplexity ratio ``PPL(Q) / PPL(FP)`` with its paired standard errors.

    Attributes:
        value: The ratio.
        se: Its standard error (delta method: ``value * log_se``).
        log: ``ln`` of the ratio.
        log_se: The standard error of ``log``, paired over windows.
        windows: Windows paired.

    """

    value: float
    se: float
    log: float
    log_se: float
    windows: int


def ppl_ratio(nll: Sequence[float], fp_nll: Sequence[float]) -> Ratio:
    """The perplexity ratio of Q to FP from each window's mean token NLL of both, paired by window.

    Raises:
        ValueError: The lists differ in length or are empty.

    """
    if len(nll) != len(fp_nll) or not nll:
        raise ValueError(f"paired windows needed: {len(nll)} vs {len(fp_nll)} NLLs")
    diffs = [a - b for a, b in zip(nll, fp_nll, strict=True)]
    log = statistics.fmean(diffs)
    log_se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    value = math.exp(log)
    return Ratio(value, value * log_se, log, log_se, len(diffs))


def mcnemar_exact(lost: int, gained: int) -> float:
    """McNemar's exact two-sided p-value of ``lost`` right -> wrong and ``gained`` wrong -> right flips.

    Under the null each flip goes either way with probability 1/2: ``p = min(1, 2 P(X <= min(lost, gained)))``
    for ``X ~ Binomial(lost + gained, 1/2)``; 1 with no flips. Computed in exact integer arithmetic.
    """
    if lost < 0 or gained < 0:
        raise ValueError(f"flip counts must be >= 0, got {lost} and {gained}")
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class Flips:
    """Items flipped against FP on one task, and McNemar's exact p-value.

    Attributes:
        lost: Items FP answered right and Q wrong.
        gained: Items FP answered wrong and Q right.
        items: Items both answered.
        p_value: McNemar's exact two-sided p-value.

    """

    lost: int
    gained: int
    items: int
    p_value: float

    @property
    def change(self) -> float:
        """The accuracy change ``(gained - lost) / items``."""
        return (self.gained - self.lost) / self.items


def flips(lost: float, gained: float, items: int) -> Flips:
    """The flips of a task from the stored fractions ``lm_eval.<task>.lost`` / ``.gained`` of ``items`` items.

    Raises:
        ValueError: ``items`` < 1, or a fraction that is not a whole number of items (a wrong item count).

    """
    if items < 1:
        raise ValueError(f"items must be >= 1, got {items}")
    counts = []
    for frac in (lost, gained):
        count = round(frac * items)
        if abs(frac * items - count) > 1e-6 * max(items, 1):
            raise ValueError(f"{frac} of {items} items is not a whole number of items")
        counts.append(count)
    return Flips(counts[0], counts[1], items, mcnemar_exact(counts[0], counts[1]))


@dataclass(frozen=True)
class Effect:
    """A measured change (against FP) and the standard error of its sample.

    Attributes:
        delta: The change.
        se: Its standard error.
        n: The sample size it is measured on (tokens, windows or items), for the record.

    """

    delta: float
    se: float
    n: int | None = None

    @classmethod
    def of_flips(cls, f: Flips) -> Effect:
        """An accuracy change from its flips: Wald's paired standard error, floored at one item's ``1 / n``."""
        n = f.items
        lost, gained = f.lost / n, f.gained / n
        d = gained - lost
        wald = math.sqrt(max(lost + gained - d * d, 0.0) / (n - 1)) if n > 1 else math.inf
        return cls(d, max(wald, 1.0 / n), n)

    @classmethod
    def of_rate(cls, p_q: float, p_fp: float, n: int) -> Effect:
        """A change of a rate measured on ``n`` items by each side, unpaired (binomial standard errors)."""
        se = math.sqrt(max(p_q * (1 - p_q), 0.0) / n + max(p_fp * (1 - p_fp), 0.0) / n)
        return cls(p_q - p_fp, max(se, 1.0 / n), n)

    @classmethod
    def of_ratio(cls, r: Ratio) -> Effect:
        """A perplexity ratio as the change of ``ln PPL``, paired over windows."""
        return cls(r.log, r.log_se, r.windows)


def minimum_detectable_effect(se: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at ``alpha`` finds with probability ``power``, given ``se``.

    ``(z_(1 - alpha/2) + z_power) * se``: 2.80 standard errors at 5 % and 80 %.
    """
    z = NormalDist()
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se


def cannot_tell_apart(a: Effect, b: Effect, alpha: float = ALPHA, power: float = POWER) -> bool:
    """Whether two changes differ by less than the minimum detectable effect of their samples.

    The standard error of the difference is ``hypot(a.se, b.se)`` (independent samples; for two runs
    paired on the same items it overstates the error, so a True here is conservative). Compare a
    change with FP itself as ``Effect(0, 0)``.
    """
    return abs(a.delta - b.delta) < minimum_detectable_effect(math.hypot(a.se, b.se), alpha, power)


# --- from run views ----------------------------------------------------------------------------------------


def _is_fp(v: RunView) -> bool:
    return v.target == "FP" and not v.steps


def _divergences(v: RunView) -> dict[tuple[str, int, int], MetricName]:
    """``{(corpus, seqlen, windows): parsed kl name}`` of the run's divergence measurements."""
    out = {}
    for name in v.metrics:
        m = parse_name(name)
        if m.kind == "kl" and m.corpus is not None and m.seqlen is not None and m.windows is not None:
            out[(m.corpus, m.seqlen, m.windows)] = m
    return out


def _ppl_ratios(v: RunView) -> dict[str, tuple[str, Ratio]]:
    """``{corpus: (ppl metric name, ratio)}`` from the run's windows paired with FP's."""
    out: dict[str, tuple[str, Ratio]] = {}
    windows: Mapping[str, Mapping[str, Any]] = v.windows or v.record.windows or {}
    for name in sorted(windows):
        m = parse_name(name)
        w = windows[name]
        nll, fp_nll = w.get("nll") or [], w.get("fp_nll") or []
        if m.kind != "ppl" or m.corpus is None or len(nll) < 2 or len(nll) != len(fp_nll) or None in nll:
            continue
        out.setdefault(m.corpus, (name, ppl_ratio(nll, fp_nll)))
    return out


KL_COLUMNS = [("KL", "kl"), ("± se", "kl_se"), ("median", "kl_p50"), ("p90", "kl_p90"), ("p95", "kl_p95"),
              ("p99", "kl_p99"), ("p99.9", "kl_p999"), ("max", "kl_max"), ("same top", "top1"),
              ("Δp RMS", "dp_rms"), ("Δp p1", "dp_p1"), ("Δp p99", "dp_p99")]


def fidelity_table(views: Iterable[RunView], alpha: float = ALPHA, power: float = POWER) -> Table:
    """One row per quantized run and corpus: KL statistics, same-top rate, Δp and the perplexity ratio.

    Columns: the run's label, what the divergence was measured on, the KL statistics, ``same top``
    (fraction), Δp RMS and its 1st/99th percentiles (fractions), the perplexity ratio on that corpus with
    its paired standard error, ``ppl ≈ FP`` (the ratio cannot be told from 1) and ``KL ≈ above`` (the
    KL cannot be told from the row above's: same model and divergence protocol, rows by increasing KL).
    A run without a divergence on a corpus still gets its perplexity-ratio row there.
    """
    t = Table("fidelity", "Fidelity to FP (llama.cpp's KL-divergence statistics)",
              ["run", "on", *(c for c, _ in KL_COLUMNS), "ppl ratio", "± ratio", "ppl ≈ FP", "KL ≈ above"],
              note=_NOTE.format(alpha=alpha * 100, power=power * 100))
    rows: list[_Row] = []
    for v in views:
        if _is_fp(v):
            continue
        divs, ratios = _divergences(v), _ppl_ratios(v)
        for corpus in sorted({c for c, _, _ in divs} | set(ratios)):
            keys: list[tuple[str, int, int] | None] = [k for k in sorted(divs) if k[0] == corpus]
            for key in keys or [None]:
                rows.append(_fidelity_row(v, corpus, key, ratios.get(corpus), alpha, power))
    rows.sort(key=lambda r: (r.group, r.kl if r.kl is not None else math.inf, r.ratio, r.run))
    above: _Row | None = None
    for row in rows:
        tied = None
        if (above is not None and above.group == row.group and row.kl is not None and row.kl_se is not None
                and above.kl is not None and above.kl_se is not None):
            tied = cannot_tell_apart(Effect(row.kl, row.kl_se), Effect(above.kl, above.kl_se), alpha, power)
        t.add([*row.cells, tied], [row.run])
        above = row
    return t


@dataclass
class _Row:
    cells: list[Any]
    run: str
    group: tuple[str, str, str]  # model, corpus, divergence protocol: rows compared only within one
    kl: float | None
    kl_se: float | None
    ratio: float


def _fidelity_row(v: RunView, corpus: str, key: tuple[str, int, int] | None, ratio: tuple[str, Ratio] | None,
                  alpha: float, power: float) -> _Row:
    if key is None:
        stats: list[Any] = [None] * len(KL_COLUMNS)
        on = corpus
    else:
        stats = [v.metrics.get(sized_name(kind, *key)) for _, kind in KL_COLUMNS]
        on = f"{corpus} s{key[1]} w{key[2]}"
    tail: list[Any] = [None, None, None]
    if ratio is not None:
        r = ratio[1]
        same = None if math.isnan(r.log_se) else cannot_tell_apart(Effect.of_ratio(r), Effect(0.0, 0.0), alpha, power)
        tail = [r.value, r.se, same]
    divergence = json.dumps((v.record.config.get("evaluate") or {}).get("divergence"), sort_keys=True)
    group = (v.record.model_fingerprint, corpus, "" if key is None else divergence)
    return _Row([v.label, on, *stats, *tail], v.id, group, stats[0], stats[1],
                math.inf if ratio is None else ratio[1].value)


_NOTE = ("KL(FP || Q) per token in nats over FP's top-k tokens plus a tail bucket (a lower bound of the "
         "full-vocabulary KL that llama-perplexity reports: bench/bench_kl_llamacpp.py checks the statistics "
         "against `llama-perplexity --kl-divergence` on the same GGUF and tokens); ± se treats tokens as "
         "independent, as llama-perplexity does. same top: the "
         "fraction of tokens where both models rank the same token first. Δp: the probability of the correct "
         "next token under Q minus FP's (fractions). ppl ratio: PPL(Q)/PPL(FP), paired over windows. "
         "≈: the difference is below the minimum detectable effect at {alpha:g} % two-sided and {power:g} % power.")


def _task_items(v: RunView, task: str) -> int | None:
    """Items of a task: the report's count where it has one, else read back from lm-eval's standard error."""
    if task in v.items:
        return int(v.items[task])
    for measure in ("acc", "acc_norm"):
        name = task_name(task, measure)
        p, se = v.metrics.get(name), v.stderr.get(name)
        if p is not None and se and 0 < p < 1:
            return round(p * (1 - p) / (se * se) + 1)
    return None


def flips_table(views: Iterable[RunView], alpha: float = ALPHA, power: float = POWER) -> Table:
    """One row per quantized run and task with paired measures: flips against FP and McNemar's exact p.

    Columns: run, task, items, the run's accuracy, right -> wrong, wrong -> right, McNemar's p and
    ``≈ FP`` (the accuracy change is below the minimum detectable effect of its paired sample).
    """
    t = Table("fidelity-flips", "Task answers flipped against FP (McNemar's exact test)",
              ["run", "task", "items", "acc", "right→wrong", "wrong→right", "McNemar p", "≈ FP"],
              note=(f"Items FP answered right and the run wrong, and the reverse; p: McNemar's exact two-sided "
                    f"test. ≈ FP: the change is below the minimum detectable effect ({alpha * 100:g} % two-sided, "
                    f"{power * 100:g} % power) of its paired sample."))
    for v in views:
        if _is_fp(v):
            continue
        for name in sorted(v.metrics):
            m = parse_name(name)
            if m.kind != "lm_eval" or m.measure != "lost" or m.task is None or m.shots is not None:
                continue
            gained = v.metrics.get(task_name(m.task, "gained"))
            n = _task_items(v, m.task)
            if gained is None or n is None:
                continue
            try:
                f = flips(v.metrics[name], gained, n)
            except ValueError:
                continue  # an item count that does not fit the fractions: no row rather than a wrong one
            same = cannot_tell_apart(Effect.of_flips(f), Effect(0.0, 0.0), alpha, power)
            t.add([v.label, m.task, n, v.metrics.get(task_name(m.task, "acc")), f.lost, f.gained, f.p_value, same],
                  [v.id])
    return t


def fidelity_tables(views: Iterable[RunView], alpha: float = ALPHA, power: float = POWER) -> list[Table]:
    """:func:`fidelity_table` and :func:`flips_table`, each only when it has rows."""
    views = list(views)
    return [t for t in (fidelity_table(views, alpha, power), flips_table(views, alpha, power)) if t.rows]
