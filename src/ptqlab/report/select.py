"""``--where`` filters: which stored runs a report, a recommendation or a comparison reads.

A filter is clauses joined by ``,`` (all must hold), each ``KEY OP VALUE`` with OP one of ``=``, ``!=``,
``<``, ``<=``, ``>``, ``>=``. KEY is a run label (``id``, ``model``, ``sweep``, ``target``, ``method``,
``bits``, ``lorc``, ``granularity``, ``symmetric``), ``cohort`` or ``protocol`` (the short ids that
``recommend`` and ``compare`` print: a cohort is one model under one evaluation protocol), a field of the
run's protocol (``protocol.corpora``, ``protocol.seqlen``, ``protocol.windows``, ``protocol.tasks``,
``protocol.limit``, ``protocol.fewshot``; a list is matched as its items joined by ``+``, e.g.
``protocol.corpora=wikitext2`` or ``protocol.tasks=*piqa*``) or a dotted config path
(``scheme.weight.bits``, ``evaluate.seqlen``). VALUE is read as YAML (``4``, ``true``, ``null``); ``=`` and
``!=`` on text take shell patterns (``model=smollm2*``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import ConfigError
from .runs import Protocol, RunView

__all__ = ["Clause", "apply_filter", "parse_filter"]

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le, ">=": operator.ge, "!=": operator.ne, "=": operator.eq, "<": operator.lt, ">": operator.gt,
}
_CLAUSE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|!=|=|<|>)\s*(.*?)\s*$")
LABELS = ("id", "model", "sweep", "target", "method", "bits", "lorc", "granularity", "symmetric", "cohort", "protocol")
PROTOCOL_FIELDS = tuple(f.name for f in dataclasses.fields(Protocol))


@dataclass(frozen=True)
class Clause:
    """One ``KEY OP VALUE`` condition."""

    key: str
    op: str
    value: Any
    text: str | None = None  # the value as written: what ``=`` matches text against (an id like 12345678)

    def holds(self, view: RunView) -> bool:
        """Whether the run satisfies the clause (a missing key or incomparable values do not)."""
        found, actual = _lookup(view, self.key)
        if not found:
            return False
        if self.key == "sweep":
            return any(self._compare(s) for s in actual)
        return self._compare(actual)

    def _compare(self, actual: Any) -> bool:
        if self.op in ("=", "!=") and isinstance(actual, str) and (isinstance(self.value, str) or self.text):
            pattern = self.value if isinstance(self.value, str) else str(self.text)
            match = fnmatch.fnmatchcase(actual, pattern)
            return match if self.op == "=" else not match
        try:
            return bool(_OPS[self.op](actual, self.value))
        except TypeError:
            return False


def parse_filter(text: str | None) -> list[Clause]:
    """The clauses of a ``--where`` filter (empty for None or blank).

    Raises:
        ConfigError: A clause that is not ``KEY OP VALUE``.

    """
    if not text or not text.strip():
        return []
    clauses = []
    for part in text.split(","):
        m = _CLAUSE.match(part)
        if m is None:
            raise ConfigError(f"--where: cannot read {part.strip()!r}; write KEY OP VALUE, e.g. scheme.weight.bits<=4")
        key, op, raw = m.groups()
        value = yaml.safe_load(raw) if raw else None
        clauses.append(Clause(key, op, value, raw or None))
    return clauses


def apply_filter(views: list[RunView], clauses: list[Clause]) -> list[RunView]:
    """The runs every clause holds for."""
    return [v for v in views if all(c.holds(v) for c in clauses)]


def _lookup(view: RunView, key: str) -> tuple[bool, Any]:
    if key in LABELS:
        if key == "model":
            return True, view.record.model
        if key == "sweep":
            return True, view.sweeps
        if key == "cohort":
            return True, view.cohort_id
        if key == "protocol":
            return True, view.protocol.id
        return True, getattr(view, key)
    head, _, name = key.partition(".")
    if head == "protocol" and name in PROTOCOL_FIELDS:
        value = getattr(view.protocol, name)
        return True, "+".join(str(x) for x in value) if isinstance(value, tuple) else value
    node: Any = view.record.config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node
