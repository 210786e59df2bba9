"""The report's layout (issue 30): split by protocol, sample sizes in captions, paper-like labels and LaTeX,
error bars on every point, heatmaps on one scale, citation and provenance."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from report_testutil import RUNS, act, build_store, make_run, module_errors, weight

import ptqlab
from ptqlab.metrics import Metric
from ptqlab.report import load_views, write_report
from ptqlab.report import plots as plots_mod
from ptqlab.report.render import fmt, fmt_estimate, shown, to_latex, to_markdown
from ptqlab.report.tables import build_tables, protocol_sections, recipe_steps, run_label, series_label
from ptqlab.store import RunRecord, Store

ROOT = Path(__file__).resolve().parents[2]
METRIC_KEY = re.compile(r"\b(ppl|kl|top1|top5|lm_eval|retrieval|bits|size)\.\w")
E_NOTATION = re.compile(r"\d\.?\d*[eE][+-]?\d")


def _second_protocol(record: RunRecord, d_shift: float = 0.0) -> RunRecord:
    """The same run measured under another protocol: 8 windows per corpus instead of 4 (names say so)."""
    config = json.loads(json.dumps(record.config))
    config["evaluate"]["max_windows"] = 8
    rename = {m.name: m.name.replace(".w4", ".w8") for m in record.metrics if m.name.startswith("ppl.")}
    metrics = [Metric(rename.get(m.name, m.name), m.value * math.exp(d_shift), m.stderr) for m in record.metrics]
    windows = {rename[k]: {"nll": [x + d_shift for x in w["nll"]] * 2, "fp_nll": list(w["fp_nll"]) * 2}
               for k, w in record.windows.items()}
    later = record.created_at.replace("00:00:", "00:01:")
    return dataclasses.replace(record, id=record.id + "-p2", qmodel_key=record.id + "-p2", config=config,
                               metrics=metrics, windows=windows, created_at=later)


@pytest.fixture
def two_protocols(tmp_path: Path) -> Store:
    store = build_store(tmp_path / "two.db")
    for n, spec in enumerate(RUNS):
        if spec["rid"] in ("fp", "w8row", "w4row", "w3row", "w4g64", "a4", "w4a4", "kv4"):
            store.save(_second_protocol(make_run(n=n, **spec), d_shift=0.0 if spec["rid"] == "fp" else 0.3))
    return store


def _protocol_of(rid: str) -> int:
    return 2 if rid.endswith("-p2") else 1


def test_tables_and_figures_split_by_protocol(two_protocols: Store, tmp_path: Path) -> None:
    views = load_views(two_protocols)
    sections = protocol_sections(views)
    assert [len(s.views) for s in sections] == [len(RUNS), 8] and not sections[0].only
    tables = build_tables(views)
    keys = {t.key for t in tables}
    assert {"zq-weight-p1", "zq-weight-p2", "qllm-perplexity-p1", "qllm-perplexity-p2"} <= keys
    for t in tables:
        protocols = {_protocol_of(r) for runs in t.runs for r in runs}
        assert protocols == {t.section}, (t.key, protocols)  # no table, hence no row, mixes protocols
        assert t.title.endswith(f"protocol {t.section}")
    # the same scheme under the two protocols: two rows in two tables, each with its own number
    p1 = next(t for t in tables if t.key == "zq-weight-p1")
    p2 = next(t for t in tables if t.key == "zq-weight-p2")
    w4_1 = p1.rows[[r[0] for r in p1.runs].index("w4row")][p1.columns.index("Δ ppl")]
    w4_2 = p2.rows[[r[0] for r in p2.runs].index("w4row-p2")][p2.columns.index("Δ ppl")]
    assert isinstance(w4_1, float) and isinstance(w4_2, float) and w4_2 > w4_1 + 1
    report = write_report(two_protocols.path, tmp_path / "rep")
    for f in report.figures:
        assert len({_protocol_of(r) for r in f.runs}) == 1, (f.key, f.runs)
        assert "Protocol:" in f.caption or f.key.startswith("sensitivity-")
    figure_keys = {f.key for f in report.figures}
    assert {"pareto-p1", "pareto-p2", "loss-by-bits-p1", "loss-by-bits-p2"} <= figure_keys
    html = report.index.read_text()
    assert 'id="tables-p1"' in html and 'id="tables-p2"' in html and 'id="protocol-2"' in html


def test_captions_carry_the_sample_sizes(store: Store) -> None:
    tables = {t.key: t for t in build_tables(load_views(store))}
    assert "windows" in tables["zq-weight"].caption and "wikitext2 (512 tokens) 4" in tables["zq-weight"].caption
    assert "items: piqa 400" in tables["qllm-tasks"].caption
    assert "samples: retrieval len2048 10" in tables["qllm-long-context"].caption
    assert "Protocol: " in tables["zq-weight"].caption
    assert "divergence windows: wikitext2 16 of 512 tokens" in tables["qllm-divergence"].caption


def test_labels_say_symmetry_and_rtn(tmp_path: Path) -> None:
    specs = [dict(rid="fp"), dict(rid="sym", w=weight(4, sym=True), recipe=("rtn",), d=0.3),
             dict(rid="asym", w=weight(4), recipe=("rtn",), d=0.1), dict(rid="bare", w=weight(4), d=0.1),
             dict(rid="sq", w=weight(8), a=act(8), recipe=("smoothquant",), d=0.01),
             dict(rid="awq", w=weight(4, "group", group=64), recipe=("awq",), d=0.05),
             dict(rid="zql", w=weight(4), recipe=("zeroquant_local",), d=0.09)]
    views = {v.id: v for v in load_views(build_store(tmp_path / "l.db", specs))}
    assert run_label(views["sym"]) == "W4 row sym [rtn]" and run_label(views["asym"]) == "W4 row asym [rtn]"
    assert run_label(views["bare"]) == "W4 row asym [rtn]"  # RTN always tagged, named or not
    assert run_label(views["sq"]) == "W8 row asym + A8 token asym [smoothquant+rtn]"
    assert run_label(views["awq"]) == "W4 g64 asym [awq]"  # AWQ brings its own clipping quantizer
    assert run_label(views["zql"]) == "W4 row asym [rtn+zeroquant_local]"
    assert run_label(views["fp"]) == "FP"
    assert series_label(views["sym"]) == "Wb row sym [rtn]"
    text = "\n".join(to_markdown(t) for t in build_tables(list(views.values())))
    assert "Wb row sym [rtn]" in text and "Wb row asym [rtn]" in text


@pytest.mark.parametrize("recipe", [[], [{"rtn": {}}], [{"gptq": {}}], [{"smoothquant": {}}], [{"awq": {}}],
                                    [{"zeroquant_local": {}}], [{"zeroquant_global": {}}], [{"lorc": {}}],
                                    [{"smoothquant": {}}, {"gptq": {}}], [{"rotation": {}}],
                                    [{"rotation": {}}, {"zeroquant_local": {}}, {"lorc": {}}]])
def test_recipe_steps_agree_with_the_pipeline(recipe: list[dict[str, Any]]) -> None:
    from ptqlab.methods.recipe import build_recipe

    assert recipe_steps([next(iter(s)) for s in recipe], True) == build_recipe(recipe).steps


def test_headers_are_words_not_metric_keys(store: Store) -> None:
    for t in build_tables(load_views(store)):
        for header in [*t.columns, *shown(t).headers]:
            assert not METRIC_KEY.search(header), (t.key, header)
        for row in t.rows:
            assert not any(isinstance(c, str) and METRIC_KEY.search(c) for c in row), (t.key, row)


def test_latex_right_aligned_merged_and_without_e_notation(tmp_path: Path) -> None:
    specs = [*RUNS, dict(rid="w2row", w=weight(2), recipe=("rtn",), d=9.0, bits_weight=2.03)]
    tables = {t.key: t for t in build_tables(load_views(build_store(tmp_path / "big.db", specs)))}
    t = tables["zq-weight"]
    tex = to_latex(t)
    assert not E_NOTATION.search(tex), tex
    spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", tex)
    assert spec is not None
    headers = shown(t).headers
    aligned = dict(zip(headers, spec.group(1), strict=True))
    assert aligned["Δ ppl"] == "r" and aligned["mean ppl"] == "r" and aligned["W bits"] == "r"
    assert aligned["granularity"] == "l" and aligned["symmetry"] == "l"
    assert "± (se)" not in headers and "class" not in headers  # merged into "Δ ppl ± se (class)"
    row = next(line for line in tex.splitlines() if line.startswith("$2$"))
    assert re.search(r"\$\+\d+ \\pm \d+\$ \(3\)", row), row  # e.g. $+162754 \pm 912$ (3), not 1.628e+05
    md = to_markdown(t)
    assert not E_NOTATION.search(md) and "|---:|" in md


def test_number_formatting() -> None:
    assert fmt(12934.2) == "12934" and fmt(0.0002672) == "0.0002672" and fmt(-0.0) == "0"
    assert fmt_estimate(13.93, 0.6105, signed=True) == "+13.93 ± 0.61"
    assert fmt_estimate(0.02955, 0.03247, signed=True) == "+0.030 ± 0.032"
    assert fmt_estimate(-0.0001, 0.03, signed=True) == "0.000 ± 0.030"  # never -0 nor +0
    assert fmt_estimate(1.293e4, 896.5) == "12930 ± 900"


class _Capture:
    """Every matplotlib figure the report saves, by key, before it is closed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.figs: dict[str, Any] = {}
        original = plots_mod._save

        def save(plt: Any, fig: Any, out: Path, key: str) -> tuple[Path, Path]:
            self.figs[key] = fig
            return original(plt, fig, out, key)

        monkeypatch.setattr(plots_mod, "_save", save)


def _data_axes(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes
            if ax.get_visible() and ax.get_label() != "<colorbar>" and (ax.lines or ax.collections)]


EXTRA = [dict(rid="w4a8", w=weight(4), a=act(8), recipe=("rtn",), d=0.2, bits_weight=4.03),  # beside RUNS' w4a4
         dict(rid="w8better", w=weight(8, sym=True), recipe=("rtn",), d=-0.04, bits_weight=8.03)]  # below FP


def _fewshot_runs() -> list[dict[str, Any]]:
    def curve(accs: list[float], eces: list[float]) -> list[Metric]:
        out = []
        for k, a, e in zip((0, 5, 10), accs, eces, strict=True):
            out += [Metric(f"lm_eval.piqa.acc.fewshot{k}", a, math.sqrt(a * (1 - a) / 99)),
                    Metric(f"lm_eval.piqa.ece.fewshot{k}", e)]
        return out
    return [dict(rid="fp-fs", extra=curve([0.6, 0.64, 0.66], [0.05, 0.04, 0.04])),
            dict(rid="w4row-fs", w=weight(4), recipe=("rtn",), d=0.1, bits_weight=4.03,
                 extra=curve([0.55, 0.6, 0.61], [0.08, 0.06, 0.05]))]


def test_every_point_has_an_error_bar_and_the_fewshot_curve_is_drawn(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.container import ErrorbarContainer

    cap = _Capture(monkeypatch)
    store = build_store(tmp_path / "s.db", [*RUNS, *EXTRA])
    for n, spec in enumerate(_fewshot_runs()):
        record = make_run(n=40 + n, **spec)
        record.config["evaluate"]["num_fewshot"] = [0, 5, 10]
        record.texts = {"lm_eval.piqa.reliability.fewshot5": json.dumps(
            {"ece": 0.06, "n": 100, "bins": [{"count": 50, "accuracy": 0.5, "confidence": 0.55},
                                            {"count": 50, "accuracy": 0.7, "confidence": 0.65}]})}
        store.save(record)
    report = write_report(store.path, tmp_path / "rep")
    keys = {f.key for f in report.figures}
    fewshot = next(f for f in report.figures if f.key.startswith("fewshot"))
    assert "accuracy and calibration error against shots" in fewshot.title
    assert set(fewshot.runs) == {"fp-fs", "w4row-fs"}
    assert {"accuracy-by-bits-p1", "kl-vs-accuracy-p1", "long-context-p1"} <= keys
    for key, fig in cap.figs.items():
        if key.startswith("sensitivity-"):
            continue
        for ax in _data_axes(fig):
            bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
            in_bars = {id(ln) for c in bars for ln in [c.lines[0], *c.lines[1]] if ln is not None}
            points = [ln for ln in ax.lines if ln.get_marker() not in (None, "None", "") and len(ln.get_xdata())]
            assert bars and all(id(ln) in in_bars for ln in points), (key, ax.get_title())  # no point without a bar
    # the few-shot curve: accuracy and ECE panels, each line with its bars (ECE's from the reliability curve)
    fs = cap.figs[fewshot.key]
    acc_ax, ece_ax = fs.axes[0], fs.axes[1]
    assert len([c for c in acc_ax.containers if isinstance(c, ErrorbarContainer)]) == 2
    assert len([c for c in ece_ax.containers if isinstance(c, ErrorbarContainer)]) == 2


def test_w4a8_and_w4a4_apart_and_negative_deltas_not_clipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cap = _Capture(monkeypatch)
    store = build_store(tmp_path / "s.db", [*RUNS, *EXTRA])
    report = write_report(store.path, tmp_path / "rep")
    fig = cap.figs["loss-by-bits"]
    wa = next(ax for ax in fig.axes if ax.get_title() == "target W+A")
    labels = set(wa.get_legend_handles_labels()[1])
    assert {"Wb row asym + A8 token asym [rtn]", "Wb row asym + Ab token asym [rtn]"} <= labels
    w = next(ax for ax in fig.axes if ax.get_title() == "target W")
    assert w.get_yscale() == "symlog"
    lowest = min(y for ln in w.lines for y in ln.get_ydata() if not math.isnan(y))
    assert lowest < 0 and w.get_ylim()[0] <= lowest  # the run better than FP is drawn below 0, inside the axes
    caption = next(f for f in report.figures if f.key == "loss-by-bits").caption
    assert "not clipped" in caption and "Sample sizes" in caption


def test_heatmaps_share_one_colour_scale_in_layer_order(store: Store, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cap = _Capture(monkeypatch)
    report = write_report(store.path, tmp_path / "rep")
    heat = {k: f for k, f in cap.figs.items() if k.startswith("sensitivity-")}
    assert set(heat) == {"sensitivity-w3row", "sensitivity-w4row"}
    clims = {f.axes[0].images[0].get_clim() for f in heat.values()}
    errors = [e["rel_error"] for scale in (0.01, 0.1) for e in module_errors(scale)]
    assert len(clims) == 1 and next(iter(clims)) == pytest.approx((min(errors), max(errors)))
    ax = heat["sensitivity-w4row"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q_proj", "o_proj", "down_proj"]
    caption = next(f for f in report.figures if f.key == "sensitivity-w4row").caption
    assert "shared by every heatmap of this report of the same kind" in caption and "evaluate.sensitivity" in caption


def _layer_errors(scale: float) -> list[dict[str, Any]]:
    """Layer records of a 2-layer run: each linear's error on its calibration inputs."""
    return [{"layer": e["layer"], "module": e["module"], "bits": 3, "rel_error": e["rel_error"], "seconds": 0.1}
            for e in module_errors(scale)]


def test_heatmaps_put_rtn_beside_gptq_on_one_scheme_from_their_calibration_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RTN with calibration.layer_errors has per-layer errors as GPTQ has: the default heatmaps pair them."""
    store = Store(tmp_path / "h.db")
    specs = [("fp", {}, (), 0.0, None), ("w3rtn", weight(3), ("rtn",), 0.5, 0.05),
             ("w3gptq", weight(3), ("gptq",), 0.3, 0.03), ("w3lorc", weight(3), ("rtn", "lorc"), 0.2, 0.02),
             ("w4gptq", weight(4), ("gptq",), 0.1, 0.01)]
    for n, (rid, w, recipe, d, scale) in enumerate(specs):
        run = make_run(rid, w=w or None, recipe=recipe, d=d, bits_weight=3.03 if w else 16.0, n=n)
        if scale is not None:
            run.layers = _layer_errors(scale)
        store.save(run)
    cap = _Capture(monkeypatch)
    report = write_report(store.path, tmp_path / "rep")
    heat = {k: f for k, f in cap.figs.items() if k.startswith("sensitivity-")}
    assert set(heat) == {"sensitivity-w3rtn", "sensitivity-w3gptq"}
    errors = [e["rel_error"] for scale in (0.05, 0.03) for e in module_errors(scale)]
    clims = {f.axes[0].images[0].get_clim() for f in heat.values()}
    assert len(clims) == 1 and next(iter(clims)) == pytest.approx((min(errors), max(errors)))
    caption = next(f for f in report.figures if f.key == "sensitivity-w3rtn").caption
    assert "calibration.layer_errors" in caption and "on its own inputs" in caption


def test_two_models_get_model_columns_with_parameter_counts(tmp_path: Path) -> None:
    store = build_store(tmp_path / "m.db")
    for n, spec in enumerate(RUNS[:6]):
        r = make_run(n=30 + n, **{**spec, "rid": spec["rid"] + "-big"})
        r.model, r.model_fingerprint = "big", "fp-big"
        r.metrics = [Metric(m.name, m.value * (2 if m.name == "size.model_bytes" else 1), m.stderr) for m in r.metrics]
        store.save(r)
    tables = {t.key: t for t in build_tables(load_views(store))}
    zq = tables["zq-weight"]
    heads = shown(zq).headers
    assert any(h.startswith("Δ ppl · tiny (48M parameters)") for h in heads)
    assert any(h.startswith("Δ ppl · big (96M parameters)") for h in heads)
    row = zq.runs[[set(r) for r in zq.runs].index({"w4row", "w4row-big"})]
    assert row  # one scheme, one row, one column set per model
    qllm = tables["qllm-perplexity"]
    assert "model" in qllm.columns
    for runs in qllm.runs:
        assert len({r.endswith("-big") for r in runs}) == 1  # a row holds one model's runs


def test_citation_and_provenance(store: Store, tmp_path: Path) -> None:
    report = write_report(store.path, tmp_path / "rep")
    bib = (report.out / "references.bib").read_text()
    assert "eprint        = {2303.08302}" in bib and "eprint        = {2402.18158}" in bib
    assert "Yao, Zhewei" in bib and "Li, Shiyao" in bib and "doi" not in bib.lower()
    assert f"version = {{{ptqlab.__version__}}}" in bib
    prov = (report.out / "provenance.md").read_text()
    assert "git revision" in prov and "config evaluate.max_windows: 4" in prov and "`w4row`" in prov
    tex = (report.out / "provenance.tex").read_text()
    assert r"\begin{longtable}" in tex and r"\texttt{w4row}" in tex
    html = report.index.read_text()
    assert 'id="provenance"' in html and 'id="citing"' in html and "2402.18158" in html
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"].startswith("ptqlab") and cff["authors"]
    assert str(cff["version"]) == ptqlab.__version__ and cff["license"] == "Apache-2.0"
    refs = {r["title"]: r for r in cff["references"]}
    assert "Evaluating Quantized Large Language Models" in refs
    assert not any("doi" in r for r in cff["references"])


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no pdflatex here")
def test_latex_outputs_compile(store: Store, tmp_path: Path) -> None:
    report = write_report(store.path, tmp_path / "rep")
    inputs = "".join(rf"\input{{{p}}}\clearpage" for p in sorted((report.out / "tables").glob("*.tex")))
    doc = (r"\documentclass{article}\usepackage[T1]{fontenc}\usepackage[utf8]{inputenc}"
           r"\usepackage{booktabs,longtable,graphicx}\begin{document}" + inputs +
           rf"\input{{{report.out / 'provenance.tex'}}}\end{{document}}")
    (tmp_path / "doc.tex").write_text(doc)
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
