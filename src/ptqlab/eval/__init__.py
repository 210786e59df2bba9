"""Evaluation of a model in memory against its FP reference: one plan, one reference, one function.

``plan_evaluation`` checks an ``evaluate`` section and tokenizes what it reads; ``build_reference``
measures the FP side once (disk-cached by the model's fingerprint); ``evaluate`` runs every section.
"""

from .adaptive import AdaptiveOutcome
from .plan import EvalPlan, check_evaluate, plan_evaluation
from .reference import Reference, build_reference
from .suite import Evaluation, WindowNLL, evaluate

__all__ = [
    "AdaptiveOutcome",
    "EvalPlan",
    "Evaluation",
    "Reference",
    "WindowNLL",
    "build_reference",
    "check_evaluate",
    "evaluate",
    "plan_evaluation",
]
