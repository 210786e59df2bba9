"""``ptqlab report``: the store's runs as tables, figures, checked findings and one HTML page.

Tables and figures are split by evaluation protocol (and figures by model too); the page and
``report.md`` group them so. Beside them: ``references.bib`` (ptqlab and the seed papers) and the runs'
provenance as an appendix (``provenance.md``, ``provenance.tex``).

Everything is built in a temporary folder beside ``out`` and moved into place at the end, so a failure
leaves no half-written report (and an earlier report in ``out`` stays until the new one is complete).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReportError
from ..metrics import parse_name
from ..store import RunRecord, Store
from .cite import bibtex, provenance_latex, provenance_markdown
from .findings import Finding, check_findings
from .html import page
from .plots import Figure, draw_figures
from .render import to_csv, to_latex, to_markdown
from .runs import RunView, json_ready, load_views
from .search import search_texts
from .select import apply_filter, parse_filter
from .sizes import reference_notes, size_figures
from .table import Table
from .tables import Section, build_tables, protocol_sections

__all__ = ["Report", "open_store", "select_views", "write_report"]

log = logging.getLogger(__name__)
HEATMAPS = 2  # runs per cohort drawn as sensitivity heatmaps when none are named: methods side by side, RTN first


@dataclass
class Report:
    """What a report wrote: the page, the tables, the figures and the checked findings."""

    out: Path
    index: Path
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    runs: int = 0


def open_store(path: str | Path) -> Store:
    """An existing store (a report never creates one).

    Raises:
        ReportError: No file at ``path``.

    """
    if not Path(path).is_file():
        raise ReportError(f"no results store at {path} (--store PATH, or $PTQLAB_STORE)")
    return Store(path)


def select_views(store: Store, where: str | None) -> list[RunView]:
    """The store's finished runs that pass ``where``, with FP baselines attached.

    Raises:
        ReportError: The store has no finished run, or the filter matches none.

    """
    clauses = parse_filter(where)
    views = load_views(store)
    if not views:
        raise ReportError(f"the store {store.path} has no finished run")
    chosen = apply_filter(views, clauses)
    if not chosen:
        raise ReportError(f"no stored run matches --where {where!r} ({len(views)} finished runs in {store.path})")
    return chosen


def _heatmap_records(store: Store, views: list[RunView], names: Sequence[str] | None) -> list[RunRecord]:
    if names is not None:
        records = [store.get(n) for n in names]
        missing = [n for n, r in zip(names, records, strict=True) if r is None]
        if missing:
            raise ReportError(f"--heatmap: no single stored run has id {', '.join(missing)}")
        return [r for r in records if r is not None]
    with_errors: dict[tuple[str, str], list[tuple[RunView, RunRecord]]] = {}
    for v in sorted((v for v in views if v.w_bits is not None), key=lambda v: v.id):
        record = store.get(v.id)
        if record is not None and any(r.get("rel_error") is not None for r in [*record.sensitivity, *record.layers]):
            with_errors.setdefault(v.cohort, []).append((v, record))
    return [record for runs in with_errors.values() for record in _heatmap_pick(runs)]


_METHOD_ORDER = ("rtn", "gptq")


def _heatmap_pick(runs: list[tuple[RunView, RunRecord]]) -> list[RunRecord]:
    """Up to :data:`HEATMAPS` runs of one cohort: methods side by side on one weight scheme, RTN first.

    The scheme is the one with the fewest weight bits among those most methods measured (so RTN and GPTQ
    on W3 per row, not two W3 runs of one method); within it, RTN, GPTQ, then the others by name; slots
    left are filled by the other runs, fewest weight bits first.
    """
    def scheme(v: RunView) -> tuple[Any, ...]:
        return (v.w_bits, v.granularity, v.symmetric, v.a_bits, v.kv_bits)

    def recipe(v: RunView) -> str:
        return "+".join(v.steps) or "rtn"

    def method_rank(v: RunView) -> tuple[int, str]:
        return (_METHOD_ORDER.index(recipe(v)) if recipe(v) in _METHOD_ORDER else len(_METHOD_ORDER), recipe(v))

    methods: dict[tuple[Any, ...], set[str]] = {}
    for v, _ in runs:
        methods.setdefault(scheme(v), set()).add(recipe(v))
    best = min(methods, key=lambda k: (k[0] or 16, -len(methods[k]), str(k)))
    order = sorted(runs, key=lambda p: (scheme(p[0]) != best, p[0].w_bits or 16, method_rank(p[0]), p[0].id))
    picked: list[RunRecord] = []
    seen: set[tuple[Any, ...]] = set()
    for v, record in order:
        if (scheme(v), recipe(v)) not in seen and len(picked) < HEATMAPS:
            picked.append(record)
            seen.add((scheme(v), recipe(v)))
    return picked


def _fewshot_texts(store: Store, views: list[RunView]) -> dict[str, dict[str, str]]:
    """The stored texts (reliability curves) of the runs with a few-shot curve."""
    out = {}
    for v in views:
        if any(parse_name(n).shots is not None for n in v.metrics):
            record = store.get(v.id)
            if record is not None:
                out[v.id] = record.texts
    return out


def _prepare(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").is_file())):
        raise ReportError(f"--out {out} exists and is not a ptqlab report folder: name a new or empty folder")


def _markdown(title: str, intro: str, findings: list[Finding], tables: list[Table], figures: list[Figure],
              sections: list[Section]) -> str:
    lines = [f"# {title}", "", intro, "", "## Protocols", "",
             "Runs of different evaluation protocols are never compared: every table, figure and finding holds runs "
             "of one protocol.", ""]
    lines += [f"- Protocol {s.index} ({len(s.views)} runs): {s.protocol.describe()}" for s in sections]
    lines += ["", "## Findings", ""]
    for f in findings:
        lines += [f"- **{f.claim}** {f.verdict} ({f.source})", *[f"  - {e}" for e in f.evidence]]
    lines += ["", "## Tables", ""]
    for sec in sections:
        if not sec.only:
            lines += [f"## Tables of protocol {sec.index}", ""]
        lines += [to_markdown(t) for t in tables if t.section == sec.index]
    lines += ["## Figures", ""]
    for sec in sections:
        mine = [f for f in figures if f.section == sec.index]
        if mine and not sec.only:
            lines += [f"## Figures of protocol {sec.index}", ""]
        lines += [f"![{f.title}](figures/{f.png.name})\n\n{f.title}. {f.caption}\n" for f in mine]
    lines += ["## Provenance and citing", "",
              "Each run's software, environment and configuration: [provenance.md](provenance.md) (as a LaTeX "
              "appendix: `provenance.tex`). BibTeX of ptqlab and the seed papers: "
              "[references.bib](references.bib).", ""]
    return "\n".join(lines)


def write_report(store_path: str | Path, out: str | Path, where: str | None = None,
                 heatmaps: Sequence[str] | None = None, title: str = "ptqlab report") -> Report:
    """Write the report of the stored runs under ``out``.

    Args:
        store_path: The results store.
        out: The report folder (created; an earlier report there is replaced).
        where: A ``--where`` filter (see :mod:`ptqlab.report.select`).
        heatmaps: Run ids to draw per-module sensitivity heatmaps for (default: per cohort, the two runs with
            the fewest weight bits that stored per-module errors: sensitivity, or the layer records of methods
            that calibrate; RTN quantizes without calibration data and records none).
        title: The page title.

    Returns:
        What was written.

    Raises:
        ReportError: A missing or empty store, a filter that matches nothing, an ``out`` that is not a report.

    """
    out = Path(out)
    _prepare(out)
    store = open_store(store_path)
    views = select_views(store, where)
    records = _heatmap_records(store, views, heatmaps)
    texts = search_texts(store, views, _fewshot_texts(store, views))
    models = sorted({v.record.model for v in views})
    intro = (f"{len(views)} finished runs of {', '.join(models)} from {store.path}"
             f"{f' where {where}' if where else ''}; written {dt.date.today().isoformat()}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        report = _write(tmp, title, intro, views, records, texts)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out, report.index = out, out / "index.html"
    report.figures = [_moved(f, tmp, out) for f in report.figures]
    log.info("report of %d runs written to %s", len(views), report.index)
    return report


def _moved(f: Figure, old: Path, new: Path) -> Figure:
    f.png, f.svg = new / f.png.relative_to(old), new / f.svg.relative_to(old)
    return f


def _findings_json(findings: list[Finding]) -> str:
    rows = [f.to_json() if hasattr(f, "to_json") else
            {"key": f.key, "claim": f.claim, "source": f.source, "verdict": f.verdict, "evidence": f.evidence,
             "runs": f.runs} for f in findings]
    return json.dumps(json_ready(rows), indent=2, allow_nan=False)


def _write(folder: Path, title: str, intro: str, views: list[RunView], records: list[RunRecord],
           texts: dict[str, dict[str, str]]) -> Report:
    tables, findings = build_tables(views), check_findings(views)
    reference_notes(tables, views)  # a model read from a GGUF: its FP is the dequantized file, at its bits per weight
    sections = protocol_sections(views)
    figures = draw_figures(views, records, folder / "figures", texts) + size_figures(views, folder / "figures")
    (folder / "tables").mkdir()
    for t in tables:
        (folder / "tables" / f"{t.key}.md").write_text(to_markdown(t))
        (folder / "tables" / f"{t.key}.csv").write_text(to_csv(t))
        (folder / "tables" / f"{t.key}.tex").write_text(to_latex(t))
    (folder / "findings.json").write_text(_findings_json(findings))
    bib = bibtex()
    (folder / "references.bib").write_text(bib)
    (folder / "provenance.md").write_text(provenance_markdown(sections))
    (folder / "provenance.tex").write_text(provenance_latex(sections))
    (folder / "report.md").write_text(_markdown(title, intro, findings, tables, figures, sections))
    (folder / "index.html").write_text(page(title, intro, findings, tables, figures, sections, bib))
    return Report(folder, folder / "index.html", tables, figures, findings, len(views))
