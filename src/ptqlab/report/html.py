"""The report as one self-contained HTML page.

Figures are inline SVG; no script, style or font comes from anywhere else. It has a table of contents,
sortable tables (click a column head), and the run ids behind every number linked to the list of runs at
the end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from html import escape

from .findings import Finding
from .plots import Figure
from .render import fmt
from .runs import RunView, quality
from .tables import Cell, Table

__all__ = ["page"]

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.86em}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:right}
th{cursor:pointer;border-bottom:2px solid #444;background:#f6f6f6}
td:first-child,th:first-child{text-align:left}
td.s{text-align:left}
td.runs{text-align:left;font-family:monospace;font-size:.9em}
figure{margin:1em 0 2em}figure svg{max-width:100%;height:auto}
.verdict{font-weight:600;padding:0 .4em;border-radius:3px}
.holds{background:#d9f2d9}.does-not-hold{background:#f9d6d5}.not-enough-data{background:#eee}
nav li{margin:.1em 0}code{font-size:.95em}
"""

SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-dir') !== 'asc';
      th.setAttribute('data-dir', asc ? 'asc' : 'desc');
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _run_links(ids: Sequence[str]) -> str:
    return " ".join(f'<a href="#run-{escape(i)}">{escape(i)}</a>' for i in ids)


def _cell(c: Cell) -> str:
    """A sortable cell: the raw value in ``data-v``; text left-aligned, numbers right-aligned."""
    cls = ' class="s"' if isinstance(c, str) else ""
    return f'<td{cls} data-v="{escape("" if c is None else str(c))}">{escape(fmt(c))}</td>'


def _table(t: Table) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in [*t.columns, "runs"])
    body = []
    for cells, runs in zip(t.rows, t.runs, strict=True):
        tds = "".join(_cell(c) for c in cells)
        body.append(f'<tr>{tds}<td class="runs" data-v="{escape(" ".join(runs))}">{_run_links(runs)}</td></tr>')
    note = f"<p>{escape(t.note)}</p>" if t.note else ""
    return (f'<section id="{t.key}"><h3>{escape(t.title)}</h3>{note}<table class="sortable"><thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table></section>')


def _svg(figure: Figure) -> str:
    """The figure's SVG element without its XML prolog and metadata block."""
    text = figure.svg.read_text()
    return re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)


def _figure(f: Figure) -> str:
    return (f'<figure id="{f.key}">{_svg(f)}<figcaption><b>{escape(f.title)}.</b> {escape(f.caption)} '
            f'Files: <code>{escape(f.png.name)}</code>, <code>{escape(f.svg.name)}</code>. Runs: '
            f'{_run_links(f.runs)}</figcaption></figure>')


def _finding(f: Finding) -> str:
    items = "".join(f"<li>{escape(e)}</li>" for e in f.evidence)
    runs = f"<p>Runs: {_run_links(sorted(set(f.runs)))}</p>" if f.runs else ""
    return (f'<section id="finding-{f.key}"><h3>{escape(f.claim)}</h3><p><span class="verdict {_slug(f.verdict)}">'
            f'{escape(f.verdict)}</span> ({escape(f.source)})</p><ul>{items}</ul>{runs}</section>')


def _runs(views: Sequence[RunView]) -> str:
    rows = []
    for v in views:
        q = quality(v)
        cells = [_cell(x) for x in (v.record.model, v.label, ", ".join(v.sweeps) or None, v.weight_bits,
                                    None if q is None else q.value)]
        rows.append(f'<tr id="run-{escape(v.id)}"><td data-v="{escape(v.id)}"><code>{escape(v.id)}</code></td>'
                    f'{"".join(cells)}</tr>')
    head = "".join(f"<th>{h}</th>" for h in ("run", "model", "scheme [recipe]", "sweeps", "bits/weight", "mean ppl"))
    return (f'<section id="runs"><h2>Runs</h2><table class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></section>')


def page(title: str, intro: str, findings: Sequence[Finding], tables: Sequence[Table], figures: Sequence[Figure],
         views: Sequence[RunView]) -> str:
    """The whole report page."""
    toc = ['<li><a href="#findings">Findings</a></li>', '<li><a href="#tables">Tables</a><ul>']
    toc += [f'<li><a href="#{t.key}">{escape(t.title)}</a></li>' for t in tables]
    toc += ['</ul></li><li><a href="#figures">Figures</a><ul>']
    toc += [f'<li><a href="#{f.key}">{escape(f.title)}</a></li>' for f in figures]
    toc += ['</ul></li><li><a href="#runs">Runs</a></li>']
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1><p>{escape(intro)}</p>",
        f'<nav><h2>Contents</h2><ul>{"".join(toc)}</ul></nav>',
        '<section id="findings"><h2>Findings of the seeds, checked on these runs</h2>',
        *(_finding(f) for f in findings), "</section>",
        '<section id="tables"><h2>Tables</h2>', *(_table(t) for t in tables), "</section>",
        '<section id="figures"><h2>Figures</h2>', *(_figure(f) for f in figures), "</section>",
        _runs(views), f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)
