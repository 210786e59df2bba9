"""What a paper needs to cite a report: BibTeX of ptqlab and of the seed papers, and each run's provenance.

The provenance of a run is what reproduces it: ptqlab's version and git revision, the package versions,
the seed, device and threads, and the whole configuration. Per protocol section it is written once for
what the section's runs share and per run for what differs, as Markdown and as a LaTeX appendix
(``provenance.md``, ``provenance.tex``) that a paper can take as is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..store import package_versions
from .render import latex_escape
from .runs import RunView
from .tables import Section, run_label

__version__ = package_versions().get("ptqlab") or "unknown"

__all__ = ["BIBTEX", "bibtex", "provenance_latex", "provenance_markdown", "provenance_rows", "shared_and_own"]

# The seed papers, as their arXiv records give them (no DOI is given: arXiv's own DataCite DOIs are
# not listed by the papers; add one only from the record itself).
SEEDS = r"""@misc{yao2023zeroquantv2,
  title         = {{ZeroQuant-V2}: Exploring Post-training Quantization in {LLMs} from Comprehensive Study to
                   Low Rank Compensation},
  author        = {Yao, Zhewei and Wu, Xiaoxia and Li, Cheng and Youn, Stephen and He, Yuxiong},
  year          = {2023},
  eprint        = {2303.08302},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2303.08302}
}

@misc{li2024evaluating,
  title         = {Evaluating Quantized Large Language Models},
  author        = {Li, Shiyao and Ning, Xuefei and Wang, Luning and Liu, Tengxuan and Shi, Xiangsheng and
                   Yan, Shengen and Dai, Guohao and Yang, Huazhong and Wang, Yu},
  year          = {2024},
  eprint        = {2402.18158},
  archivePrefix = {arXiv},
  note          = {ICML 2024},
  url           = {https://arxiv.org/abs/2402.18158}
}
"""


def bibtex() -> str:
    """BibTeX of ptqlab (this version; see ``CITATION.cff``) and of the two seed papers."""
    own = (f"@software{{ptqlab,\n  title   = {{ptqlab: post-training quantization studies of large language "
           f"models}},\n  author  = {{{{The ptqlab authors}}}},\n  version = {{{__version__}}},\n"
           f"  year    = {{2026}}\n}}\n")
    return own + "\n" + SEEDS


BIBTEX = bibtex()


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping) and value:
        for k in sorted(value):
            _flat(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True, separators=(", ", ": "))


def provenance_rows(v: RunView) -> dict[str, str]:
    """A run's provenance as ``{key: value}``: software, machine, environment, seed and the flattened config."""
    r = v.record
    out = {"ptqlab version": r.code_version or "unknown", "git revision": r.git_rev or "unknown",
           "model fingerprint": r.model_fingerprint, "seed": json.dumps(r.seed), "device": str(r.device),
           "threads": json.dumps(r.threads)}
    for name, version in sorted((r.versions or {}).items()):
        out[f"package {name}"] = str(version)
    for key, value in sorted((r.machine or {}).items()):
        out[f"machine {key}"] = value if isinstance(value, str) else json.dumps(value)
    config: dict[str, str] = {}
    _flat("", r.config, config)
    out.update({f"config {k}": val for k, val in config.items()})
    return out


def shared_and_own(views: Sequence[RunView]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """What every run of ``views`` shares (key and value alike) and, per run id, the rest of its provenance."""
    rows = {v.id: provenance_rows(v) for v in views}
    keys = sorted({k for r in rows.values() for k in r})
    shared = {k: next(iter(rows.values()))[k] for k in keys
              if all(k in r for r in rows.values()) and len({r[k] for r in rows.values()}) == 1}
    own = {i: {k: val for k, val in r.items() if k not in shared} for i, r in rows.items()}
    return shared, own


def provenance_markdown(sections: Sequence[Section]) -> str:
    """The provenance of every run, per protocol section: what the runs share, then each run's own."""
    lines = ["# Provenance", "", f"Report written by ptqlab {__version__}. Cite ptqlab and the seed papers with "
             "`references.bib`.", ""]
    for sec in sections:
        shared, own = shared_and_own(sec.views)
        lines += [f"## Protocol {sec.index}: {sec.protocol.describe()}", "",
                  f"Shared by its {len(sec.views)} runs:", "", "```"]
        lines += [f"{k}: {val}" for k, val in shared.items()]
        lines += ["```", ""]
        for v in sec.views:
            lines += [f"- `{v.id}` {run_label(v)}: " + "; ".join(f"{k} = {val}" for k, val in own[v.id].items())]
        lines.append("")
    return "\n".join(lines)


def _tex(text: str) -> str:
    """``text`` escaped for LaTeX, long unbroken tokens (hashes, paths) allowed to break every 24 characters."""
    marked = re.sub(r"(\S{24})(?=\S)", "\\1\x00", text)
    return latex_escape(marked).replace("\x00", r"\allowbreak{}")


def provenance_latex(sections: Sequence[Section]) -> str:
    r"""A LaTeX appendix (``\input{provenance}``; needs ``booktabs`` and ``longtable``)."""
    lines = [r"% ptqlab provenance appendix; \usepackage{booktabs,longtable}", r"\section*{Provenance of the runs}",
             _tex(f"Report written by ptqlab {__version__}."), ""]
    for sec in sections:
        shared, own = shared_and_own(sec.views)
        lines += [rf"\subsection*{{{_tex(f'Protocol {sec.index}: {sec.protocol.describe()}')}}}",
                  _tex(f"Settings shared by its {len(sec.views)} runs:"),
                  r"\begin{small}\begin{longtable}{p{0.3\linewidth}p{0.6\linewidth}}", r"\toprule",
                  r"setting & value \\", r"\midrule"]
        lines += [rf"{_tex(k)} & \texttt{{{_tex(val)}}} \\" for k, val in shared.items()]
        lines += [r"\bottomrule", r"\end{longtable}\end{small}", "", _tex("Per run, the settings that differ:"),
                  r"\begin{small}\begin{longtable}{p{0.24\linewidth}p{0.66\linewidth}}", r"\toprule",
                  r"run & settings \\", r"\midrule"]
        for v in sec.views:
            text = "; ".join(f"{k} = {val}" for k, val in own[v.id].items())
            lines.append(rf"\texttt{{{_tex(v.id)}}} & {_tex(run_label(v))}: \texttt{{{_tex(text)}}} \\")
        lines += [r"\bottomrule", r"\end{longtable}\end{small}", ""]
    return "\n".join(lines) + "\n"
