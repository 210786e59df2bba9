"""How an evaluation reaches the model: resident in memory, or read layer by layer from checkpoints on disk.

:func:`ptqlab.eval.suite.evaluate` runs its measures (:mod:`ptqlab.eval.measures`) through a
:class:`ModelAccess`. :class:`ResidentModel` runs a model in memory against an FP :class:`Reference`
measured before it was quantized; :class:`ptqlab.eval.streamed.LayerMajorModel` reads the FP and the
quantized checkpoints one decoder layer at a time and fills the reference in the same pass. The measures
that need the whole model at once (generation, sensitivity, adaptive stopping) say so and are refused on a
layer-major model before any work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from ..errors import ConfigError
from . import divergence as dv
from .adaptive import check_reference
from .lm import scoring_path
from .perplexity import perplexity
from .plan import EvalPlan
from .reference import Reference
from .tasks import ShotResults, run_shots


@dataclass(frozen=True)
class WindowRun:
    """One corpus's perplexity windows on the evaluated model.

    Attributes:
        ppl: ``exp`` of the mean window NLL.
        nll: Each window's mean token NLL, in window order.
        seconds: Wall time of this corpus alone (None when it ran together with others, layer-major).
        tokens_per_second: Its throughput (None likewise).

    """

    ppl: float
    nll: list[float]
    seconds: float | None = None
    tokens_per_second: float | None = None


@dataclass(frozen=True)
class TaskRun:
    """lm-eval answers of the evaluated model, of the FP model (None when unknown), and how they were scored."""

    own: ShotResults
    fp: ShotResults | None
    scoring: dict[str, Any]


class ModelAccess(Protocol):
    """What the measures of an evaluation need from the model, whatever its residency.

    Attributes:
        layer_major: The decoder layers are read from disk one at a time (a measure that needs the whole model
            in memory is refused).
        timings: Seconds of work the access did for several measures at once (merged into the evaluation).

    """

    layer_major: bool
    timings: dict[str, float]

    @property
    def model(self) -> nn.Module:
        """The model (on a layer-major access, its skeleton: parameters on the meta device)."""
        ...

    def check(self, plan: EvalPlan, ref: Reference) -> None:
        """Raise ConfigError, before any work, when ``plan`` needs an FP side neither ``ref`` nor the access gives."""
        ...

    def window_nll(self, plan: EvalPlan, ref: Reference, progress: bool) -> dict[str, WindowRun]:
        """Every corpus's windows of ``plan`` on the evaluated model (a layer-major access fills ``ref.nll``)."""
        ...

    def divergence(self, plan: EvalPlan, ref: Reference) -> dv.Divergence:
        """KL and top-k agreement against FP on ``plan.divergence`` (a layer-major access fills ``ref.topk``)."""
        ...

    def tasks(self, tokenizer: Any, plan: EvalPlan, ref: Reference) -> TaskRun:
        """The lm-eval answers at each few-shot count of ``plan`` (a layer-major access fills ``ref.tasks``)."""
        ...


@dataclass
class ResidentModel:
    """A model in memory, evaluated against an FP reference measured before it was quantized."""

    resident: nn.Module
    layer_major: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        """The model in memory."""
        return self.resident

    def check(self, plan: EvalPlan, ref: Reference) -> None:
        """The divergence, the sensitivity and adaptive perplexity need the FP reference.

        Raises:
            ConfigError: One of them is asked for without it.

        """
        if plan.config.adaptive is not None:
            if ref.same_model and plan.windows:
                raise ConfigError("evaluate.adaptive compares against the FP reference, but the model is evaluated "
                                  "as its own FP model: pass the FP reference measured before quantizing")
            check_reference(plan.windows, ref.nll)
        if plan.divergence is not None and ref.topk is None:
            raise ConfigError("evaluate.divergence compares against the FP model, but no FP reference was given")
        if plan.sensitivity is not None and ref.outputs is None:
            raise ConfigError("evaluate.sensitivity compares against the FP model, but no FP reference was given")

    def window_nll(self, plan: EvalPlan, ref: Reference, progress: bool) -> dict[str, WindowRun]:
        """Each corpus's perplexity, one after another."""
        out = {}
        for corpus, ids in plan.windows.items():
            t0 = time.perf_counter()
            res = perplexity(self.resident, ids, batch_size=plan.config.batch_size, progress=progress,
                             desc=f"ppl {corpus}")
            out[corpus] = WindowRun(res.ppl, res.nll, time.perf_counter() - t0, res.tokens_per_second)
        return out

    def divergence(self, plan: EvalPlan, ref: Reference) -> dv.Divergence:
        """Against the reference's top-k log-probabilities."""
        assert ref.topk is not None  # check() refused a plan without them
        return dv.divergence(self.resident, ref.topk)

    def tasks(self, tokenizer: Any, plan: EvalPlan, ref: Reference) -> TaskRun:
        """lm-eval through ptqlab's model wrapper; the FP answers are the reference's (or its own on FP)."""
        own = run_shots(self.resident, tokenizer, plan.config.tasks, plan.shots, **plan.task_settings)
        return TaskRun(own, own if ref.same_model else ref.tasks, scoring_path(self.resident))
