"""What an evaluation measured, and the one place each kind of measure becomes named metrics.

Whether the model was resident or read layer by layer from disk, perplexity, divergence and task results
become metrics here (names through :mod:`ptqlab.metrics`), so both residencies name them alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..metrics import Metric, divergence_name, perplexity_name, task_name
from .adaptive import AdaptiveOutcome
from .calibration_error import task_reliability
from .divergence import Divergence
from .fewshot import shot_measure
from .plan import EvalPlan
from .sensitivity import Sensitivity
from .tasks import ShotResults, TaskResults, paired


@dataclass
class WindowNLL:
    """Each perplexity window's mean token NLL, of the evaluated model and of the FP model (when known).

    ``nll`` is in window order; under adaptive evaluation a window that was not evaluated is None.
    """

    nll: list[float | None]
    fp_nll: list[float] | None = None


@dataclass
class Evaluation:
    """What one evaluation measured.

    Attributes:
        metrics: Named by protocol and size (``ppl.wikitext2.s2048.w40``), with standard errors where they exist.
        timings: Seconds of each part.
        texts: Texts for a person to read (the sample, the retrieval answers) and JSON records (the reliability
            curves of multiple-choice tasks).
        windows: Per-window NLLs by perplexity metric name (what paired statistics need).
        sensitivity: Each decoder linear's and layer's deviation from FP.
        adaptive: What adaptive perplexity settled (``evaluate.adaptive``), else None.

    """

    metrics: list[Metric] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    windows: dict[str, WindowNLL] = field(default_factory=dict)
    sensitivity: list[Sensitivity] = field(default_factory=list)
    adaptive: AdaptiveOutcome | None = None

    def add_perplexity(self, corpus: str, windows: int, seqlen: int, ppl: float, nll: list[float | None],
                       fp_nll: list[float] | None) -> str:
        """Add one corpus's perplexity (``ppl.<corpus>.s<seqlen>.w<windows>``) and its window NLLs; its name."""
        name = perplexity_name(corpus, seqlen, windows)
        self.metrics.append(Metric(name, ppl))
        self.windows[name] = WindowNLL(nll, fp_nll)
        return name

    def add_divergence(self, d: Divergence, corpus: str, windows: int, seqlen: int) -> None:
        """Add KL and top-k agreement against FP, one metric per kind of :data:`ptqlab.metrics.DIVERGENCE_KINDS`.

        The mean KL carries its standard error (``kl_se``, tokens treated as independent, as llama.cpp does).
        """
        values = d.by_kind()
        self.metrics += [Metric(divergence_name(kind, corpus, seqlen, windows), value,
                                values.get("kl_se") if kind == "kl" else None)
                         for kind, value in values.items()]


def record_tasks(result: Evaluation, plan: EvalPlan, shots: ShotResults, fp: ShotResults | None) -> None:
    """Add the task measures of each few-shot count to ``result``, and each reliability curve to its texts.

    On a few-shot curve (``evaluate.num_fewshot`` a list) every name says its count
    (``lm_eval.piqa.acc.fewshot5``); otherwise names are lm-eval's (``lm_eval.piqa.acc``). A multiple-choice
    task also gets its expected calibration error (``lm_eval.<task>.ece``) and its reliability curve, stored
    as JSON in the texts under ``lm_eval.<task>.reliability`` (both with the same count suffix).
    """
    for k, res in shots.items():
        label = plan.shot_label(k)
        result.metrics += task_metrics(res, None if fp is None else fp.get(k), label)
        for task, rel in task_reliability(res.loglik, res.correct).items():
            result.metrics.append(Metric(task_name(task, shot_measure("ece", label)), rel.ece))
            result.texts[task_name(task, shot_measure("reliability", label))] = json.dumps(rel.to_json())


def task_metrics(res: TaskResults, fp: TaskResults | None, shots: int | None = None) -> list[Metric]:
    """lm-eval's metrics (names kept, with stderr) and, given the FP answers, the paired measures.

    With ``shots``, each name says the few-shot count (``lm_eval.piqa.acc.fewshot5``).
    """
    out = []
    for task, metrics in res.metrics.items():
        out += [Metric(task_name(task, shot_measure(name, shots)), value, err)
                for name, (value, err) in metrics.items()]
        if fp is not None:
            out += [Metric(task_name(task, shot_measure(name, shots)), value)
                    for name, value in paired(fp, res, task).items()]
    return out
