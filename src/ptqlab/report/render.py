"""Tables as Markdown, CSV and LaTeX (booktabs), and the cell formatting every output shares.

Numbers are written in plain decimal notation (``12934``, ``0.0002672``; never ``1.293e+04``) with four
significant digits; a value with a standard error is written ``x ± se`` with the error to two significant
digits and the value to the same decimal place, and a change carries its sign (``+13.93 ± 0.61 (3)``).
CSV keeps the raw numbers, each in its own column; Markdown, HTML and LaTeX show a table's :class:`Merge`
columns as one cell, right-aligned like every numeric column.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from .table import Cell, Merge, Table

__all__ = ["Shown", "fmt", "fmt_estimate", "shown", "to_csv", "to_latex", "to_markdown"]

_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$", "±": r"$\pm$",
          "×": r"$\times$", "·": r"$\cdot$", "–": "--", "<": r"$<$", ">": r"$>$", "≤": r"$\le$", "≥": r"$\ge$",
          "≈": r"$\approx$", "≠": r"$\neq$", "→": r"$\to$", "←": r"$\leftarrow$", "−": "-", "μ": r"$\mu$"}
MAX_DECIMALS = 12


def _decimal(x: float, decimals: int) -> str:
    """``x`` with ``decimals`` places, never ``-0``."""
    text = f"{x:.{max(0, min(decimals, MAX_DECIMALS))}f}"
    if text.startswith("-") and not any(ch in "123456789" for ch in text):
        text = text[1:]
    return text


def _places(x: float, significant: int) -> int:
    """Decimal places that show ``significant`` digits of ``x``."""
    return significant - 1 - math.floor(math.log10(abs(x))) if x else 0


def _signed(text: str, signed: bool) -> str:
    zero = not any(ch in "123456789" for ch in text)
    return "+" + text if signed and not zero and not text.startswith(("-", "+")) else text


def fmt_float(x: float, signed: bool = False, significant: int = 4) -> str:
    """``x`` to ``significant`` digits in plain decimal notation (trailing zeros dropped)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return ("+inf" if signed else "inf") if x > 0 else "-inf"
    text = _decimal(x, _places(x, significant))
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return _signed(text, signed)


def fmt(cell: Cell) -> str:
    """A cell as text: 4 significant digits for floats (no exponent), ``–`` for a missing value."""
    if cell is None:
        return "–"
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, float):
        return fmt_float(cell)
    return str(cell)


def fmt_estimate(value: float, se: float | None, signed: bool = False) -> str:
    """``value ± se``: the error to two significant digits, the value to the same decimal place."""
    if se is None or not math.isfinite(se) or not math.isfinite(value):
        return fmt_float(value, signed)
    if se == 0:
        return f"{fmt_float(value, signed)} ± 0"
    places = _places(se, 2)
    if places < 0:  # the error's second digit is left of the point: round both there (12930 ± 900)
        value, se = round(value, places), round(se, places)
    return f"{_signed(_decimal(value, places), signed)} ± {_decimal(se, places)}"


@dataclass
class Shown:
    """A table as displayed: headers, per row the texts and the raw values, and which columns are numeric."""

    headers: list[str]
    texts: list[list[str]]
    values: list[list[Cell]]
    numeric: list[bool]


def _merged_text(row: dict[str, Cell], m: Merge) -> str:
    value = row.get(m.value)
    if value is None:
        return "–"
    if not isinstance(value, int | float) or isinstance(value, bool):
        return fmt(value)
    se = row.get(m.se) if m.se else None
    text = fmt_estimate(float(value), float(se) if isinstance(se, int | float) else None, m.signed)
    tag = row.get(m.tag) if m.tag else None
    return text if tag is None else f"{text} ({fmt(tag)})"


def shown(table: Table) -> Shown:
    """The table's columns as displayed: each :class:`Merge` as one column headed by its value column."""
    merged = {m.value: m for m in table.merges}
    hidden = {c for m in table.merges for c in (m.se, m.tag) if c}
    keep = [c for c in table.columns if c not in hidden]
    texts, values = [], []
    for cells in table.rows:
        row = dict(zip(table.columns, cells, strict=True))
        texts.append([_merged_text(row, merged[c]) if c in merged else fmt(row[c]) for c in keep])
        values.append([row[c] for c in keep])
    numeric = [c in merged or all(not isinstance(v[i], str) for v in values) for i, c in enumerate(keep)]
    return Shown(keep, texts, values, numeric)


def to_markdown(table: Table) -> str:
    """A Markdown table with a ``runs`` column, under the table's title and caption."""
    s = shown(table)
    lines = [f"### {table.title}", ""]
    if table.caption:
        lines += [table.caption, ""]
    lines += ["| " + " | ".join([*s.headers, "runs"]) + " |",
              "|" + "".join("---:|" if n else "---|" for n in s.numeric) + "---|"]
    for texts, runs in zip(s.texts, table.runs, strict=True):
        lines.append("| " + " | ".join([*texts, " ".join(runs)]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """CSV with raw values (empty for missing), every column apart, the run ids space-separated last."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*table.columns, "runs"])
    for cells, runs in zip(table.rows, table.runs, strict=True):
        writer.writerow([*("" if c is None else c for c in cells), " ".join(runs)])
    return buf.getvalue()


def latex_escape(text: str) -> str:
    r"""Text safe inside a LaTeX table (``<=`` and ``>=`` become ``\le`` and ``\ge``)."""
    text = text.replace("<=", "≤").replace(">=", "≥")
    return "".join(_LATEX.get(ch, ch) for ch in text)


def _latex_cell(text: str, numeric: bool) -> str:
    r"""A numeric cell in math mode (a true minus sign, ``\pm``); text escaped."""
    if not numeric or text == "–":
        return latex_escape(text)
    head, sep, tag = text.partition(" (")
    number = head.replace("±", r"\pm")
    return f"${number}$" + (f" ({latex_escape(tag[:-1])})" if sep else "")


def to_latex(table: Table) -> str:
    r"""A booktabs ``table`` (needs ``\usepackage{booktabs,graphicx}``): text left, numbers right-aligned.

    A table wider than the text is scaled down to its width (never up). Run ids stay in the CSV; the
    caption carries the protocol and sample sizes.
    """
    s = shown(table)
    cols = "".join("r" if n else "l" for n in s.numeric)
    caption = " ".join(x for x in (table.title + ".", table.caption) if x)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\label{{tab:{table.key}}}", r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in s.headers) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_cell(t, n) for t, n in zip(texts, s.numeric, strict=True)) + r" \\"
              for texts in s.texts]
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"
