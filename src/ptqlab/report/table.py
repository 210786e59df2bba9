"""A report table: titled columns, rows of raw cells, the runs behind each row, and how columns merge.

Cells hold raw values (numbers stay numbers for CSV and sorting); a :class:`Merge` tells :mod:`.render` which
columns it shows as one ``x ± se (class)`` cell. Built by :mod:`.tables` and :mod:`.fidelity`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Cell", "Merge", "Table"]

Cell = str | float | int | None


@dataclass(frozen=True)
class Merge:
    """Columns shown as one cell, ``value ± se (tag)``; CSV keeps them apart.

    Attributes:
        value: The column of the value (its name heads the merged column).
        se: The column of its standard error, if any.
        tag: A column shown in parentheses after it (ZeroQuant-V2's class), if any.
        signed: Whether the value is a change, written with its sign.

    """

    value: str
    se: str | None = None
    tag: str | None = None
    signed: bool = False


@dataclass
class Table:
    """A titled table: columns, rows of raw cells and, per row, the run ids behind it."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    runs: list[list[str]] = field(default_factory=list)
    note: str = ""
    merges: list[Merge] = field(default_factory=list)
    section: int = 1
    protocol: str = ""
    sizes: str = ""

    def add(self, cells: list[Cell], runs: Iterable[str]) -> None:
        """Append a row and the runs it comes from."""
        self.rows.append(cells)
        self.runs.append(list(runs))

    @property
    def caption(self) -> str:
        """The note, the protocol and the sample sizes, as one caption."""
        parts = [self.note, f"Protocol: {self.protocol}." if self.protocol else "",
                 f"Sample sizes: {self.sizes}." if self.sizes else ""]
        return " ".join(p for p in parts if p)
