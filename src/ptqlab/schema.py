"""The configuration schema: strict (unknown keys and wrong types rejected with the field's path).

This is the shape of a configuration, nothing more: :mod:`ptqlab.compile` turns a validated
configuration into the objects a run uses (specs, recipe, windows), once.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .quant.spec import QuantSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_T = TypeVar("_T", bound=_Strict)


def _range_fields() -> dict[str, Any]:
    """QuantSpec's fields (types and defaults) as pydantic fields: their one definition is QuantSpec."""
    hints = typing.get_type_hints(QuantSpec)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(QuantSpec) if f.name != "where"}


_RangeFields: type[_Strict] = create_model(
    "_RangeFields", __base__=_Strict, __doc__="Fields shared by weights and activations (see QuantSpec).",
    **_range_fields(),
)


class WeightScheme(_RangeFields):  # type: ignore[misc,valid-type]
    """Weight quantization (see QuantSpec); granularity defaults to channel (group of 32 for MX)."""


class ActivationScheme(_RangeFields):  # type: ignore[misc,valid-type]
    """Activation quantization at the input of each linear of the decoder layers.

    ``granularity``: ``token`` (default; one range per token), ``group`` (per token and group of
    channels) or ``tensor`` (one range per sequence, padding excluded); with ``dynamic: false`` the range
    is one per tensor, fixed from the calibration data. ``attention: true`` also quantizes the inputs of
    the attention matmuls (query, key, value) through a registered attention function.
    """

    dynamic: bool = True
    attention: bool = False


class KVSide(_Strict):
    """Settings of K or V alone (unset fields come from the kv_cache section)."""

    bits: int | None = None
    granularity: str | None = None
    symmetric: bool | None = None
    group_size: int | None = None
    zero_point: Literal["int", "float"] | None = None


class KVCacheScheme(_Strict):
    """KV cache quantization: ``granularity`` head (default), group (along head_dim), token or channel."""

    bits: int | None = None
    granularity: str = "head"
    symmetric: bool = False
    group_size: int | None = None
    zero_point: Literal["int", "float"] = "int"
    where: Literal["post_rope", "pre_rope"] = "post_rope"
    mode: Literal["all", "decode"] = "all"
    key: KVSide | None = None
    value: KVSide | None = None


class OverrideEntry(_Strict):
    """``{match: REGEX, weight: {...} | null, activation: {...} | null}``: later entries win.

    A key left out changes nothing; ``null`` keeps the matched modules in full precision.
    """

    match: str
    weight: dict[str, Any] | None = None
    activation: dict[str, Any] | None = None

    def sets(self, key: str) -> bool:
        """Whether the entry gives ``key`` (``weight`` or ``activation``), null included."""
        return key in self.model_fields_set


class OutlierScheme(_Strict):
    """LLM.int8-style decomposition of the quantized linears' input columns.

    Columns whose calibration magnitude exceeds ``threshold`` (or the top ``fraction`` of columns) stay in
    FP16 in the weights and activations; the rest follow the scheme.
    """

    threshold: float = 6.0
    fraction: float | None = None


class Scheme(_Strict):
    """What is quantized and how."""

    weight: WeightScheme | None = None
    activation: ActivationScheme | None = None
    kv_cache: KVCacheScheme | None = None
    overrides: list[OverrideEntry] = Field(default_factory=list)
    outliers: OutlierScheme | None = None
    embedding: WeightScheme | None = None
    """The input embedding matrix (and an output head tied to it) rounded to nearest onto this grid after the
    layer loop, e.g. ``{format: gguf_q8_0}`` as llama.cpp stores it; None keeps it in full precision."""


class Calibration(_Strict):
    """Calibration data: ``c4local`` (documents 1100-1999) or ``file`` with ``path``.

    ``layer_errors``: also measure each linear's relative output error on this data when the recipe needs
    none (RTN, LoRC after RTN): one calibration pass through the layers, the weights unchanged. Calibrated
    recipes (GPTQ, AWQ, ...) always measure it; the report's heatmaps draw it.
    """

    dataset: str = "c4local"
    samples: int = Field(default=128, ge=1)
    seqlen: int = Field(default=512, ge=8)
    seed: int = 0
    path: str | None = None
    batch_size: int = Field(default=8, ge=1)
    layer_errors: bool = False


class DivergenceConfig(_Strict):
    """Divergence from the FP model: KL(FP || Q) and top-k agreement on the first windows of a corpus."""

    corpus: str = "wikitext2"
    seqlen: int = Field(default=512, ge=8)
    windows: int = Field(default=16, ge=1)
    top_k: int = Field(default=32, ge=5)


class LongContextConfig(_Strict):
    """Long-context retrieval: accuracy by prompt length (see :mod:`ptqlab.eval.retrieval`)."""

    lengths: list[int] = Field(default_factory=lambda: [512, 1024, 2048])
    samples: int = Field(default=10, ge=1)
    pairs: int = Field(default=4, ge=1, le=500)
    seed: int = 0

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 32 for n in v):
            raise ValueError("lengths must be a non-empty list of token counts of at least 32")
        return v


class SensitivityConfig(_Strict):
    """Per-module deviation from FP (relative error, SQNR) on the first windows of a corpus."""

    corpus: str = "wikitext2"
    seqlen: int = Field(default=256, ge=8)
    windows: int = Field(default=1, ge=1)


class SpeedConfig(_Strict):
    """Speed and size in a runtime: prompt and generation tokens/s, the file's bytes, the peak memory.

    ``runtime``: ``llama.cpp`` (the run written as GGUF and timed through llama-cpp-python, the extra
    ``[llamacpp]``; a KV-cache scheme llama.cpp holds is passed as its cache types), ``torch`` (ptqlab's own
    fake-quantized model, timed the same way: what fake quantization costs) or ``vllm`` (a
    compressed-tensors export on a CUDA device). ``prompt`` tokens are processed in one batch and
    ``generate`` tokens generated one at a time, each ``repeats`` times after one warm-up; ``threads``: the
    runtime's threads (None: ptqlab's own thread count). ``float_type``: the GGUF type of the tensors a run
    keeps in full precision (``auto``: as the model holds them; an FP run written as ``f16`` is llama.cpp's
    F16 row).
    """

    runtime: Literal["llama.cpp", "torch", "vllm"] = "llama.cpp"
    prompt: int = Field(default=512, ge=1)
    generate: int = Field(default=128, ge=1)
    repeats: int = Field(default=5, ge=1)
    threads: int | None = Field(default=None, ge=1)
    float_type: Literal["auto", "f32", "f16", "bf16"] = "auto"


class SampleConfig(_Strict):
    """A fixed greedy generation sample stored with the run (``sample: null`` to skip it)."""

    prompt: str = "Once upon a time"
    max_new_tokens: int = Field(default=32, ge=1, le=1024)


class AdaptiveConfig(_Strict):
    """Adaptive perplexity: windows in a fixed random order until the degradation from FP is settled.

    The paired per-window differences from the FP reference give an interval of the degradation
    ``mean(ppl_q) - mean(ppl_fp)`` over the corpora; evaluation stops once the interval lies in one
    ZeroQuant-V2 class (``target: class``) or overlaps no peer's interval (``target: rank``).
    """

    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    target: Literal["class", "rank"] = "class"
    min_windows: int = Field(default=8, ge=2)
    step: int = Field(default=4, ge=1)
    seed: int = 0


EVALUATIONS = ("perplexity", "tasks", "divergence", "long_context", "sample", "sensitivity", "dialogue", "speed")
"""The keys of ``evaluate`` that name an evaluation; the others are settings."""

DEFAULT_EVALUATIONS: dict[str, Any] = {"perplexity": ["wikitext2"], "sample": {}, "sensitivity": {}}
"""What a run evaluates when its ``evaluate`` section names no evaluation (or is left out)."""


class DialogueConfig(_Strict):
    """Multi-turn dialogue, answered greedily turn by turn with the model's chat template.

    Conversations in MT-Bench's question format (``path``, jsonl; left out, the built-in set), the first
    ``limit`` of them, answers of up to ``max_new_tokens`` tokens each.
    """

    path: str | None = None
    limit: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)


class JudgeConfig(_Strict):
    """An OpenAI-compatible judge of the dialogue answers.

    API base ``url``, ``model`` name, the environment variable holding the key (``api_key_env``; the key is
    never stored or logged), the request timeout.
    """

    url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)


class Evaluate(_Strict):
    """Evaluations: perplexity (GPTQ protocol), lm-eval tasks, divergence from FP, sensitivity, long context.

    A section runs exactly the evaluations it names (:data:`EVALUATIONS`): ``{tasks: [piqa], limit: 50}``
    runs the task and nothing else. A section that names none of them (left out, ``{}``, or settings
    only such as ``{max_windows: 8}``) runs the defaults, :data:`DEFAULT_EVALUATIONS`: wikitext2
    perplexity, the generation sample and the per-module sensitivity.
    ``divergence: true`` uses the defaults of :class:`DivergenceConfig` (16 windows of 512 wikitext2 tokens).
    ``num_fewshot``: the in-context examples of the lm-eval tasks: a count (metric names as lm-eval's, e.g.
    ``lm_eval.piqa.acc``), or a list of counts (``[0, 1, 5]``), each evaluated and named with its count
    (``lm_eval.piqa.acc.fewshot5``): the in-context learning curve. Left out, each task's own default.
    """

    perplexity: list[str] = Field(default_factory=list)
    seqlen: int = Field(default=2048, ge=8)
    max_windows: int | None = Field(default=40, ge=1)
    batch_size: int = Field(default=1, ge=1)
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | list[int] | None = None
    tasks_dir: str | None = None
    seed: int = 0
    divergence: bool | DivergenceConfig = False
    sample: SampleConfig | None = None
    long_context: LongContextConfig | None = None
    sensitivity: SensitivityConfig | None = None
    adaptive: AdaptiveConfig | None = None
    dialogue: DialogueConfig | None = None
    judge: JudgeConfig | None = None
    speed: SpeedConfig | None = None

    _defaulted: bool = PrivateAttr(default=False)

    @model_validator(mode="wrap")
    @classmethod
    def _defaults(cls, data: Any, handler: Any) -> Any:
        if not isinstance(data, Mapping) or any(k in data for k in EVALUATIONS):
            return handler(data)
        made = handler({**DEFAULT_EVALUATIONS, **data})
        made._defaulted = True
        return made

    @field_validator("num_fewshot")
    @classmethod
    def _shot_counts(cls, v: int | list[int] | None) -> int | list[int] | None:
        counts = [] if v is None else v if isinstance(v, list) else [v]
        if any(k < 0 for k in counts):
            raise ValueError("few-shot counts must be at least 0")
        if isinstance(v, list):
            if not v or len(set(v)) != len(v):
                raise ValueError("a list of few-shot counts must be non-empty, without repeats")
            return sorted(v)
        return v

    @model_validator(mode="after")
    def _judge_needs_dialogue(self) -> Evaluate:
        if self.judge is not None and self.dialogue is None:
            raise ValueError("judge scores the dialogue answers: add evaluate.dialogue")
        return self

    @model_validator(mode="after")
    def _adaptive_needs_perplexity(self) -> Evaluate:
        if self.adaptive is not None and not self.perplexity:
            raise ValueError("adaptive sets how perplexity is measured: name the corpora in evaluate.perplexity")
        return self

    @property
    def defaulted(self) -> bool:
        """Whether the evaluations are the defaults because the section named none."""
        return self._defaulted

    def names(self) -> list[str]:
        """The evaluations this section runs, in the order of :data:`EVALUATIONS`."""
        on = {"perplexity": bool(self.perplexity), "tasks": bool(self.tasks),
              "divergence": self.divergence_config() is not None, "long_context": self.long_context is not None,
              "sample": self.sample is not None, "sensitivity": self.sensitivity is not None,
              "dialogue": self.dialogue is not None, "speed": self.speed is not None}
        return [k for k in EVALUATIONS if on[k]]

    @property
    def fewshot_curve(self) -> bool:
        """Whether ``num_fewshot`` is a list: each count is evaluated, and metric names say the count."""
        return isinstance(self.num_fewshot, list)

    def shot_counts(self) -> list[int | None]:
        """The few-shot counts the tasks run at (None: each task's own default), in increasing order."""
        if isinstance(self.num_fewshot, list):
            return list(self.num_fewshot)
        return [self.num_fewshot]

    def divergence_config(self) -> DivergenceConfig | None:
        """The divergence settings, or None when not asked for."""
        if isinstance(self.divergence, DivergenceConfig):
            return self.divergence
        return DivergenceConfig() if self.divergence else None


class Runtime(_Strict):
    """How a run uses the machine; not part of a run's identity (the numbers do not depend on it).

    ``stream``: ``on`` keeps one decoder layer resident at a time (quantization and evaluation read each
    layer from the safetensors shards and write the quantized one out); ``off`` loads the whole model;
    ``auto`` streams when the run would not fit ``max_memory``. ``max_memory``: the budget (``8GiB``; default:
    the memory available when the run starts). ``offload_dir``: where a streamed run writes its quantized
    model (default: ``$PTQLAB_CACHE/stream``). ``layer_pass``: how calibration runs a decoder layer: ``one``
    pass holding every calibration chunk at each linear group (fastest), ``per_group`` (a pass per group,
    one chunk's intermediate tensors at a time), or ``auto`` (``per_group`` when the held chunks would not
    fit half the memory left); both give the same floats.
    """

    stream: Literal["auto", "on", "off"] = "auto"
    layer_pass: Literal["auto", "one", "per_group"] = "auto"
    max_memory: str | int | None = None
    offload_dir: str | None = None

    @field_validator("stream", mode="before")
    @classmethod
    def _yaml_bool(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans

    @field_validator("max_memory")
    @classmethod
    def _size(cls, v: str | int | None) -> str | int | None:
        from .memory import parse_size

        if v is not None:
            parse_size(v)
        return v


class ExportSection(_Strict):
    """Export the run's quantized model when the run is done (``ptqlab export`` with these options)."""

    format: Literal["hf", "compressed-tensors", "gguf"]
    out: str
    overwrite: bool = False


class RunConfig(_Strict):
    """One configuration: model, scheme, recipe, calibration, evaluations."""

    model: str
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    scheme: Scheme = Field(default_factory=Scheme)
    recipe: list[dict[str, dict[str, Any] | None]] = Field(default_factory=list)
    calibration: Calibration = Field(default_factory=Calibration)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    runtime: Runtime = Field(default_factory=Runtime)
    export: ExportSection | None = None
    _compiled: Any = PrivateAttr(default=None)  # what ptqlab.compile made of it, made once

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"unknown device {v!r}: use auto, cpu, cuda or cuda:N")
        return v


def format_validation_error(exc: ValidationError) -> str:
    """One line naming the path and problem of the first errors of a pydantic validation."""
    parts = []
    for err in exc.errors()[:3]:
        path = ".".join(str(p) for p in err["loc"]) or "config"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{path}: {msg}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def coerce(cls: type[_T], value: Any, where: str | None = None) -> _T:
    """A schema object from ``value``: the object itself, a mapping validated into it, or the defaults (None).

    Raises:
        ConfigError: Naming the path of the offending fields (prefixed with ``where``).

    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls.model_validate(dict(value))
        except ValidationError as exc:
            message = format_validation_error(exc)
            raise ConfigError(f"{where}.{message}" if where else message) from None
    raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(value).__name__}")


def parse_config(data: Any) -> RunConfig:
    """Validate a configuration mapping against the schema (no model, data or method is touched).

    Args:
        data: The parsed YAML/JSON mapping.

    Returns:
        The validated configuration, defaults filled in.

    Raises:
        ConfigError: Naming the path of the first offending fields.

    """
    if not isinstance(data, dict):
        raise ConfigError(f"a configuration must be a mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def read_yaml(path: str | Path) -> Any:
    """The parsed content of a YAML (or JSON) file.

    Raises:
        ConfigError: Missing file or invalid YAML.

    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
