"""``ptqlab compare``: stored runs side by side, metric by metric, with differences from the first run.

A difference is *paired* when both runs stored the same windows of a perplexity metric (its standard
error comes from the per-window NLL differences, which cancel the windows' own spread); otherwise its
standard error combines the two runs' standard errors, where both have one.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import statistics
from dataclasses import dataclass
from typing import Any

from ..errors import ReportError
from ..store import Store
from .runs import RunView, load_views

__all__ = ["Comparison", "Row", "compare_runs"]


@dataclass
class Row:
    """One metric across the runs and each run's difference from the first."""

    metric: str
    values: list[float | None]
    stderr: list[float | None]
    diffs: list[float | None]
    diff_se: list[float | None]
    paired: list[bool]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {"metric": self.metric, "values": self.values, "stderr": self.stderr, "diffs": self.diffs,
                "diff_se": self.diff_se, "paired": self.paired}


@dataclass
class Comparison:
    """The runs compared and one row per metric any of them has."""

    runs: list[RunView]
    rows: list[Row]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {"runs": [{"id": v.id, "label": v.label} for v in self.runs], "rows": [r.to_json() for r in self.rows]}


def _paired_se(a: dict[str, Any] | None, b: dict[str, Any] | None, value_b: float) -> float | None:
    if not a or not b or len(a["nll"]) != len(b["nll"]) or len(a["nll"]) < 2:
        return None
    diffs = [y - x for x, y in zip(a["nll"], b["nll"], strict=True)]
    return value_b * statistics.stdev(diffs) / math.sqrt(len(diffs))


def compare_runs(store: Store, run_ids: list[str], metrics: str | None = None) -> Comparison:
    """Compare stored runs (ids or unique prefixes); ``metrics`` is a shell pattern of names to keep.

    Raises:
        ReportError: Fewer than two runs, an id that matches no single run, or a pattern no metric matches
            (close names listed).

    """
    if len(run_ids) < 2:
        raise ReportError("compare needs at least two run ids")
    records = []
    for rid in run_ids:
        rec = store.get(rid)
        if rec is None:
            raise ReportError(f"no single stored run has id {rid!r} (ptqlab ls lists them)")
        records.append(rec)
    views = load_views(store, records)
    windows = [r.windows for r in records]
    names = sorted({n for v in views for n in v.metrics})
    if metrics is not None:
        kept = [n for n in names if fnmatch.fnmatchcase(n, metrics)]
        if not kept:
            close = difflib.get_close_matches(metrics, names, n=5)
            raise ReportError(f"no metric of these runs matches {metrics!r}"
                              + (f"; close: {', '.join(close)}" if close else f"; they have: {', '.join(names[:12])}"))
        names = kept
    rows = [_row(name, views, windows) for name in names]
    return Comparison(views, rows)


def _row(name: str, views: list[RunView], windows: list[dict[str, dict[str, Any]]]) -> Row:
    values = [v.metrics.get(name) for v in views]
    errs = [v.stderr.get(name) for v in views]
    row = Row(name, values, errs, [None], [None], [False])
    base = values[0]
    for i in range(1, len(views)):
        value = values[i]
        if base is None or value is None:
            row.diffs.append(None)
            row.diff_se.append(None)
            row.paired.append(False)
            continue
        se = _paired_se(windows[0].get(name), windows[i].get(name), value)
        paired = se is not None
        err_a, err_b = errs[0], errs[i]
        if se is None and err_a is not None and err_b is not None:
            se = math.hypot(err_a, err_b)
        row.diffs.append(value - base)
        row.diff_se.append(se)
        row.paired.append(paired)
    return row
