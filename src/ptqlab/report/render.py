"""Tables as Markdown, CSV and LaTeX (booktabs), and cell formatting shared by every output."""

from __future__ import annotations

import csv
import io

from .tables import Cell, Table

__all__ = ["fmt", "to_csv", "to_latex", "to_markdown"]

_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$", "±": r"$\pm$"}


def fmt(cell: Cell) -> str:
    """A cell as text: 4 significant digits for floats, ``–`` for a missing value."""
    if cell is None:
        return "–"
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, float):
        return f"{cell:.4g}"
    return str(cell)


def to_markdown(table: Table) -> str:
    """A Markdown table with a ``runs`` column, under the table's title."""
    head = [*table.columns, "runs"]
    lines = [f"### {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells, runs in zip(table.rows, table.runs, strict=True):
        lines.append("| " + " | ".join([*(fmt(c) for c in cells), " ".join(runs)]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """CSV with raw values (empty for missing) and the run ids space-separated in the last column."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*table.columns, "runs"])
    for cells, runs in zip(table.rows, table.runs, strict=True):
        writer.writerow([*("" if c is None else c for c in cells), " ".join(runs)])
    return buf.getvalue()


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX table."""
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    r"""A booktabs ``table`` environment (needs ``\usepackage{booktabs}``); run ids stay in the CSV."""
    cols = "l" * len(table.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
             rf"\label{{tab:{table.key}}}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(fmt(c)) for c in cells) + r" \\" for cells in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
