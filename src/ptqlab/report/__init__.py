"""ptqlab.report: tables, figures, checked findings, recommendations and comparisons, from the store only."""

from .build import Report, open_store, select_views, write_report
from .compare import Comparison, compare_runs
from .recommend import Budget, Recommendation, recommend
from .runs import RunView, describe_scheme, load_views

__all__ = ["Budget", "Comparison", "Recommendation", "Report", "RunView", "compare_runs", "describe_scheme",
           "load_views", "open_store", "recommend", "select_views", "write_report"]
