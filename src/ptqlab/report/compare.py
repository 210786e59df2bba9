"""``ptqlab compare``: stored runs side by side, metric by metric, with differences from the first run.

A difference is *paired* when both runs stored the same windows of a perplexity metric (its standard
error comes from the per-window NLL differences, which cancel the windows' own spread); otherwise its
standard error combines the two runs' standard errors against FP, where both have one (see
:func:`ptqlab.report.runs.difference`). Runs of another cohort than the first (another model or
evaluation protocol) are shown side by side but marked not comparable: they get no difference.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any

from ..errors import ReportError
from ..store import Store
from .runs import RunView, difference, json_ready, load_views, paired_windows, same_cohort

__all__ = ["Comparison", "Row", "compare_runs"]


@dataclass
class Row:
    """One metric across the runs and each run's difference from the first (None across cohorts)."""

    metric: str
    values: list[float | None]
    stderr: list[float | None]
    diffs: list[float | None]
    diff_se: list[float | None]
    paired: list[bool]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping (strict JSON)."""
        return json_ready({"metric": self.metric, "values": self.values, "stderr": self.stderr,
                           "diffs": self.diffs, "diff_se": self.diff_se, "paired": self.paired})


@dataclass
class Comparison:
    """The runs compared, whether each is comparable with the first, and one row per metric any of them has."""

    runs: list[RunView]
    rows: list[Row]

    @property
    def comparable(self) -> list[bool]:
        """Per run: of the first run's cohort (same model and protocol), so that differences exist."""
        return [same_cohort(self.runs[0], v) for v in self.runs]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping (strict JSON)."""
        runs = [{"id": v.id, "label": v.label, "model": v.record.model, "cohort": v.cohort_id,
                 "protocol": v.protocol.describe(), "comparable": ok}
                for v, ok in zip(self.runs, self.comparable, strict=True)]
        return json_ready({"runs": runs, "rows": [r.to_json() for r in self.rows]})


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
    names = sorted({n for v in views for n in v.metrics})
    if metrics is not None:
        kept = [n for n in names if fnmatch.fnmatchcase(n, metrics)]
        if not kept:
            close = difflib.get_close_matches(metrics, names, n=5)
            raise ReportError(f"no metric of these runs matches {metrics!r}"
                              + (f"; close: {', '.join(close)}" if close else f"; they have: {', '.join(names[:12])}"))
        names = kept
    return Comparison(views, [_row(name, views) for name in names])


def _row(name: str, views: list[RunView]) -> Row:
    base = views[0]
    row = Row(name, [v.metrics.get(name) for v in views], [v.stderr.get(name) for v in views], [None], [None], [False])
    for v in views[1:]:
        d = difference(base, v, name)
        row.diffs.append(None if d is None else d.delta)
        row.diff_se.append(None if d is None else d.stderr)
        row.paired.append(d is not None and paired_windows(base, v, name))
    return row
