"""Search files: a run configuration plus a ``search:`` section, validated before any work.

A search file is a run configuration (every key of ``ptqlab run``, without ``scheme.weight`` and
``scheme.overrides``, which the search writes) with, besides::

    name: smollm2-gguf                  # the search's name (default: the file's stem and the signal)
    search:
      menu: [{format: gguf_q4_0}, {format: gguf_q5_0}, {format: gguf_q8_0}]   # weight specs a unit may take
      budget: {bits: [4.75, 5.0, 5.5]}  # average effective bits of the decoder linears (``bits.weight``),
                                        # or {bytes: [...]}: the model's size (``size.model_bytes``)
      unit: module                      # or layer: the linears of a decoder layer move together
      signal: kl                        # kl | hessian | fisher | error
      solver: exact                     # exact (the knapsack solved exactly) | greedy
      validate: 8                       # random allocations per budget, measured, to check additivity
      seed: 0                           # of the validation allocations
      base: auto                        # kl: the menu point units move from (auto, fp, or a menu index)
      rule: 0                           # the menu index of the Q4_K_M-like rule's base type (null: no rule run)
      divergence: null                  # kl: the windows the signal is measured on (default: evaluate.divergence)

Everything that can be checked without the model is checked here (the menu's specs, the base run
configuration compiled, the signal's needs); budgets against the model's feasible range are checked by
:func:`ptqlab.search.run.plan_search` once the model's shapes are known, still before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..pipeline.plan import spec_from
from ..schema import DivergenceConfig, RunConfig, WeightScheme, format_validation_error, read_yaml
from ..study.config import parse_config

SEARCH_KEYS = ("name", "search")
"""The keys a search file has besides those of a run configuration."""

Signal = Literal["kl", "hessian", "fisher", "error"]
SIGNALS: tuple[str, ...] = ("kl", "hessian", "fisher", "error")


class Budget(BaseModel):
    """``{bits: [...]}`` (average effective bits per decoder-linear weight) or ``{bytes: [...]}`` (model size)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: list[float] | None = None
    bytes: list[float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Budget:
        given = [k for k in ("bits", "bytes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of bits or bytes, each a non-empty list of numbers")
        values = self.values
        if not values:
            raise ValueError(f"{given[0]}: an empty list (a search needs at least one budget)")
        if any(v <= 0 for v in values):
            raise ValueError(f"{given[0]}: budgets must be positive, got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"{given[0]}: a budget is listed twice: {values}")
        return self

    @property
    def kind(self) -> Literal["bits", "bytes"]:
        """``bits`` or ``bytes``."""
        return "bits" if self.bits is not None else "bytes"

    @property
    def values(self) -> list[float]:
        """The budgets, in the file's order."""
        return list(self.bits if self.bits is not None else self.bytes or [])


class SearchSection(BaseModel):
    """The ``search:`` section (see the module's docstring); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    menu: list[dict[str, Any]]
    budget: Budget
    unit: Literal["module", "layer"] = "module"
    signal: Signal = "kl"
    solver: Literal["exact", "greedy"] = "exact"
    validate_: int = Field(default=8, ge=0, alias="validate")
    seed: int = 0
    base: int | Literal["auto", "fp"] = "auto"
    rule: int | None = 0
    divergence: DivergenceConfig | None = None

    @field_validator("menu")
    @classmethod
    def _menu(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(v) < 2:
            raise ValueError("a menu needs at least two weight specs to choose between")
        return v


@dataclass(frozen=True)
class SearchFile:
    """A validated search file.

    Attributes:
        name: The search's name: the name of the sweep its runs are stored under.
        base: The base run configuration (what every run shares; its weights are the search's).
        section: The ``search:`` section.
        menu: The menu's weight sections, each normalized to every field (what a run's config holds).
        source: The file it was read from, or None.

    """

    name: str
    base: RunConfig
    section: SearchSection
    menu: tuple[dict[str, Any], ...]
    source: Path | None = None

    @property
    def divergence(self) -> DivergenceConfig:
        """The windows the kl signal is measured on: ``search.divergence``, else the base's ``evaluate.divergence``."""
        found = self.section.divergence or self.base.evaluate.divergence_config()
        assert found is not None  # checked by parse_search
        return found


def load_search(path: str | Path) -> SearchFile:
    """Read and validate a search file (no model is loaded).

    Raises:
        ConfigError: Naming the key: an unknown key, an invalid menu spec or budget, a base configuration that
            is invalid or that the search cannot work from.

    """
    p = Path(path)
    return parse_search(read_yaml(p), default_name=p.stem, source=p)


def parse_search(data: Any, default_name: str = "search", source: Path | None = None) -> SearchFile:
    """Validate a search mapping (see :func:`load_search`).

    Raises:
        ConfigError: As :func:`load_search`.

    """
    if not isinstance(data, dict):
        raise ConfigError(f"a search file must be a mapping, got {type(data).__name__}")
    doc = dict(data)
    known = set(RunConfig.model_fields) | set(SEARCH_KEYS)
    for key in doc:
        if key not in known:
            raise ConfigError(f"{key}: unknown key (a search file has the keys of a run config plus "
                              f"{', '.join(SEARCH_KEYS)})")
    if "search" not in doc:
        raise ConfigError("search: missing (a search file is a run config plus a search: section)")
    raw = doc.pop("search")
    if not isinstance(raw, dict):
        raise ConfigError(f"search: expected a mapping, got {type(raw).__name__}")
    try:
        section = SearchSection.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"search.{format_validation_error(exc)}") from None
    menu = tuple(_menu_item(item, k) for k, item in enumerate(section.menu))
    if len({repr(sorted(m.items())) for m in menu}) != len(menu):
        raise ConfigError("search.menu: a weight spec is listed twice")
    _check_indices(section, len(menu))
    name = doc.pop("name", None)
    if name is None:
        name = f"{default_name}-{section.signal}" + ("-greedy" if section.solver == "greedy" else "")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name: expected a non-empty string, got {name!r}")
    _check_base_keys(doc)
    base = parse_config({**doc, "scheme": {**(doc.get("scheme") or {}), "weight": menu[0]}})
    _check_base(base)
    return SearchFile(name, base, section, menu, source)


def _menu_item(item: Any, k: int) -> dict[str, Any]:
    """A menu entry as a full weight section (every field, as a run's config holds it)."""
    where = f"search.menu[{k}]"
    if not isinstance(item, dict) or not item:
        raise ConfigError(f"{where}: expected a weight spec such as {{format: gguf_q4_0}} or {{bits: 4}}")
    try:
        weight = WeightScheme.model_validate(item)
    except ValidationError as exc:
        raise ConfigError(f"{where}.{format_validation_error(exc)}") from None
    full: dict[str, Any] = weight.model_dump(mode="json")
    spec_from(full, where)  # bits out of range, a format's bits contradicted, ...
    return full


def _check_indices(section: SearchSection, size: int) -> None:
    for key in ("base", "rule"):
        value = getattr(section, key)
        if isinstance(value, int) and not 0 <= value < size:
            raise ConfigError(f"search.{key}={value}: not an index of the menu (0..{size - 1})")
    if section.rule is not None and section.rule == size - 1:
        raise ConfigError(f"search.rule={section.rule}: the rule moves some projections one menu type up, and menu "
                          f"[{section.rule}] is the last; name a menu index below {size - 1} (or rule: null)")


def _check_base_keys(doc: dict[str, Any]) -> None:
    scheme = doc.get("scheme") or {}
    if not isinstance(scheme, dict):
        raise ConfigError(f"scheme: expected a mapping, got {type(scheme).__name__}")
    for key in ("weight", "overrides"):
        if scheme.get(key):
            raise ConfigError(f"scheme.{key}: a search writes every decoder linear's weight spec from search.menu "
                              f"(the per-module choices as scheme.overrides); leave scheme.{key} out")
    for key, what in (("activation", "activation"), ("kv_cache", "KV-cache"), ("outliers", "outlier")):
        if scheme.get(key):
            raise ConfigError(f"scheme.{key}: a search chooses weight formats only; {what} quantization is not "
                              f"searched yet (leave scheme.{key} out)")


def _check_base(base: RunConfig) -> None:
    """The base configuration the search's runs share: what the search and its signal need of it."""
    if base.evaluate.divergence_config() is None:
        raise ConfigError("evaluate.divergence: a search measures each run's quality as its KL divergence from the "
                          "FP model; add evaluate.divergence (e.g. divergence: {seqlen: 512, windows: 16})")
    if base.runtime.stream == "on":
        raise ConfigError("runtime.stream: on: a search measures its signal on a resident model; use stream: off "
                          "or auto")
    recipe = base._compiled.scheme.recipe
    moved = [*recipe.model_transforms, *recipe.layer_transforms]
    if moved:
        raise ConfigError(f"recipe {recipe.name}: a search swaps each linear's quantized weight between menu points, "
                          "and a transform (rotation, smoothquant, awq) changes weights beyond the linears it "
                          "quantizes; search with rtn, gptq, squeezellm, zeroquant or lorc")
