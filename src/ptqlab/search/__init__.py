"""ptqlab.search: mixed precision to a budget (``ptqlab search FILE``).

A search file is a run configuration plus a ``search:`` section (:mod:`.config`). Its units
(:mod:`.units`: each decoder linear, or each decoder layer) take one point of a menu of weight specs each;
a signal (:mod:`.signal`: measured KL, Hessian- or Fisher-weighted error, stored relative error) says what
each unit adds to the loss at each point, measured once and cached; the knapsack is solved per budget
(:mod:`.solver`: exactly, or greedily); each allocation becomes an ordinary run whose per-module choices
are ``scheme.overrides`` (:mod:`.allocate`), run beside the uniform menu points, a Q4_K_M-like rule
(:mod:`.rule`) and random validation allocations as one resumable sweep (:mod:`.run`). The front and the
check of the signal's additivity are read back from the store by :mod:`ptqlab.report.search`.
"""

from .config import SearchFile, load_search, parse_search
from .run import Allocation, SearchPlan, plan_search, run_search

__all__ = ["Allocation", "SearchFile", "SearchPlan", "load_search", "parse_search", "plan_search", "run_search"]
