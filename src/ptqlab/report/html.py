"""The report as one self-contained HTML page.

Figures are inline SVG; no script, style or font comes from anywhere else. It has a table of contents,
tables and figures grouped by evaluation protocol (each with its description and sample sizes), sortable
tables (click a column head), the run ids behind every number linked to the list of runs, the provenance
of the runs and the BibTeX to cite ptqlab and the seed papers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from .cite import shared_and_own
from .cost import generation_speed, measured_size, run_size
from .findings import Finding
from .plots import Figure
from .render import fmt, shown
from .runs import RunView, quality
from .table import Cell, Table
from .tables import Section, run_label

__all__ = ["page"]

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.86em}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:right}
th{cursor:pointer;border-bottom:2px solid #444;background:#f6f6f6}
td:first-child,th:first-child{text-align:left}
td.s,th.s{text-align:left}td.n{white-space:nowrap}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
details{margin:.2em 0}summary{cursor:pointer}p.protocol{color:#444}
td.runs{text-align:left;font-family:monospace;font-size:.9em}
figure{margin:1em 0 2em}figure svg{max-width:100%;height:auto}
.verdict{font-weight:600;padding:0 .4em;border-radius:3px}
.holds{background:#d9f2d9}.does-not-hold{background:#f9d6d5}.not-enough-data{background:#eee}
.mixed{background:#fbeccb}
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
    s = shown(t)
    head = "".join(f'<th class="{"n" if n else "s"}">{escape(c)}</th>'
                   for c, n in zip(s.headers, s.numeric, strict=True))
    head += '<th class="s">runs</th>'
    body = []
    for texts, values, runs in zip(s.texts, s.values, t.runs, strict=True):
        tds = "".join(_shown_cell(x, v, n) for x, v, n in zip(texts, values, s.numeric, strict=True))
        body.append(f'<tr>{tds}<td class="runs" data-v="{escape(" ".join(runs))}">{_run_links(runs)}</td></tr>')
    note = f"<p>{escape(t.caption)}</p>" if t.caption else ""
    return (f'<section id="{t.key}"><h4>{escape(t.title)}</h4>{note}<table class="sortable"><thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table></section>')


def _shown_cell(text: str, value: Cell, numeric: bool) -> str:
    """A displayed cell: sorted by its raw value (``data-v``), numbers right-aligned, text left."""
    cls = ' class="n"' if numeric else ' class="s"'
    return f'<td{cls} data-v="{escape("" if value is None else str(value))}">{escape(text)}</td>'


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


def _cost_cells(v: RunView, file: bool, tg: bool) -> list[Cell]:
    """The run's measured file MiB and generation speed, for the columns the report has (None: not measured)."""
    size, speed = run_size(v, measured_only=True), generation_speed(v)
    return ([None if size is None else size.mib] if file else []) + \
        ([None if speed is None else f"{speed.value:.4g} ({speed.metric.words})"] if tg else [])


def _runs(sections: Sequence[Section]) -> str:
    views = [v for sec in sections for v in sec.views]
    file = any(measured_size(v) is not None for v in views)
    tg = any(generation_speed(v) is not None for v in views)
    rows = []
    for sec in sections:
        for v in sec.views:
            q = quality(v)
            cells = [_cell(x) for x in (v.record.model, sec.index, run_label(v), ", ".join(v.sweeps) or None,
                                        v.weight_bits, None if q is None else q.value, *_cost_cells(v, file, tg))]
            rows.append(f'<tr id="run-{escape(v.id)}"><td data-v="{escape(v.id)}"><code>{escape(v.id)}</code></td>'
                        f'{"".join(cells)}</tr>')
    names = ("run", "model", "protocol", "scheme [recipe]", "sweeps", "bits/weight", "quality (ppl)",
             *(["file MiB"] if file else []), *(["generation t/s"] if tg else []))
    head = "".join(f"<th>{h}</th>" for h in names)
    cost = (" File MiB: the measured GGUF file; generation t/s: tokens per second generated (the median of "
            "repeats; llama.cpp's where several runtimes timed the run).") if file or tg else ""
    return (f'<section id="runs"><h2>Runs</h2><p>Quality: the mean perplexity over the run\'s own protocol\'s '
            f'corpora (comparable only within a protocol).{cost}</p><table class="sortable"><thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table></section>')


def _protocols(sections: Sequence[Section]) -> str:
    items = "".join(f'<li id="protocol-{s.index}"><b>Protocol {s.index}</b> ({len(s.views)} runs): '
                    f'{escape(s.protocol.describe())}</li>' for s in sections)
    return (f'<section id="protocols"><h2>Protocols</h2><p>Runs of different evaluation protocols are never '
            f'compared: every table, figure and finding holds runs of one protocol.</p><ul>{items}</ul></section>')


def _provenance(sections: Sequence[Section]) -> str:
    parts = ['<section id="provenance"><h2>Provenance</h2><p>What reproduces each run: ptqlab\'s version and git '
             'revision, the packages, seed, device, threads and the configuration; per protocol what its runs share, '
             'then each run\'s own settings. The same as an appendix: <code>provenance.md</code>, '
             '<code>provenance.tex</code>.</p>']
    for sec in sections:
        shared, own = shared_and_own(sec.views)
        text = "\n".join(f"{k}: {v}" for k, v in shared.items())
        parts.append(f"<h3>Protocol {sec.index}</h3><details><summary>shared by its {len(sec.views)} runs"
                     f"</summary><pre>{escape(text)}</pre></details>")
        for v in sec.views:
            mine = "\n".join(f"{k}: {x}" for k, x in own[v.id].items())
            parts.append(f'<details><summary><code>{escape(v.id)}</code> {escape(run_label(v))}</summary>'
                         f"<pre>{escape(mine)}</pre></details>")
    parts.append("</section>")
    return "".join(parts)


def _citing(bib: str) -> str:
    return ('<section id="citing"><h2>Citing</h2><p>ptqlab (also <code>CITATION.cff</code> in its repository) and '
            'the seed papers whose findings are checked above; the same in <code>references.bib</code>.</p>'
            f"<pre>{escape(bib)}</pre></section>")


def _grouped(kind: str, sections: Sequence[Section], items: Sequence[Table] | Sequence[Figure],
             render: Callable[[Any], str]) -> list[str]:
    """``items`` under a heading per protocol section (no heading when the report has one protocol)."""
    out = []
    for sec in sections:
        mine = [x for x in items if x.section == sec.index]
        if not mine:
            continue
        if not sec.only:
            out.append(f'<h3 id="{kind}-p{sec.index}">Protocol {sec.index}</h3><p class="protocol">'
                       f'{escape(sec.protocol.describe())}</p>')
        out += [render(x) for x in mine]
    return out


def _toc(kind: str, sections: Sequence[Section], items: Sequence[Table] | Sequence[Figure]) -> str:
    out = []
    for sec in sections:
        mine = "".join(f'<li><a href="#{x.key}">{escape(x.title)}</a></li>' for x in items if x.section == sec.index)
        if mine:
            out.append(mine if sec.only else f'<li><a href="#{kind}-p{sec.index}">Protocol {sec.index}</a>'
                                             f"<ul>{mine}</ul></li>")
    return "".join(out)


def page(title: str, intro: str, findings: Sequence[Finding], tables: Sequence[Table], figures: Sequence[Figure],
         sections: Sequence[Section], bib: str = "") -> str:
    """The whole report page."""
    toc = ['<li><a href="#protocols">Protocols</a></li><li><a href="#findings">Findings</a></li>',
           f'<li><a href="#tables">Tables</a><ul>{_toc("tables", sections, tables)}</ul></li>',
           f'<li><a href="#figures">Figures</a><ul>{_toc("figures", sections, figures)}</ul></li>',
           '<li><a href="#runs">Runs</a></li><li><a href="#provenance">Provenance</a></li>',
           '<li><a href="#citing">Citing</a></li>']
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1><p>{escape(intro)}</p>",
        f'<nav><h2>Contents</h2><ul>{"".join(toc)}</ul></nav>', _protocols(sections),
        '<section id="findings"><h2>Findings of the seeds, checked on these runs</h2>',
        *(_finding(f) for f in findings), "</section>",
        '<section id="tables"><h2>Tables</h2>', *_grouped("tables", sections, tables, _table), "</section>",
        '<section id="figures"><h2>Figures</h2>', *_grouped("figures", sections, figures, _figure), "</section>",
        _runs(sections), _provenance(sections), _citing(bib), f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)
