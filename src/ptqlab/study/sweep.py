"""Sweep files: one run configuration plus ``grid``, ``zip``, ``exclude`` and ``include``, expanded to runs.

A sweep file is a run configuration (every key as in ``ptqlab run``) with, besides::

    name: zq-weights                         # names the sweep (default: the file's stem)
    include: [base.yaml]                     # files whose keys are merged in first (the file's own win)
    grid:                                    # dotted config paths -> lists; their product is expanded
      scheme.weight.bits: [8, 4, 3]
      recipe: [[{rtn: {}}], [{gptq: {}}]]
    zip:                                     # paths whose equal-length lists vary together
      scheme.weight.granularity: [channel, group]
      scheme.weight.group_size: [null, 64]
                                             # (a list of such mappings: groups crossed with each other)
    exclude:                                 # partial configs: a run matching one is dropped
      - {scheme.weight.bits: 8, recipe: [{gptq: {}}]}

Expansion is deterministic (the order of the file: grid keys first, then the zip), duplicates (runs whose
normalized configurations are equal) are kept once, and every run is validated and compiled before any
work, so a bad value is one error naming the run and the values that made it.
"""

from __future__ import annotations

import copy
import itertools
import json
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ..errors import ConfigError
from ..schema import RunConfig, read_yaml
from .config import parse_config

SWEEP_KEYS = ("name", "grid", "zip", "exclude", "include")


@dataclass(frozen=True)
class SweepRun:
    """One expanded run: its validated configuration and the values the sweep gave it."""

    config: RunConfig
    values: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    """An expanded sweep.

    Attributes:
        name: The sweep's name.
        runs: The runs, in expansion order, without duplicates.
        varied: The dotted paths the grid and the zip vary (the columns of a table of the runs).
        excluded: How many expanded runs an ``exclude`` entry dropped.

    """

    name: str
    runs: list[SweepRun]
    varied: list[str]
    excluded: int = 0


def load_sweep(path: str | Path, sets: Sequence[str] = ()) -> Sweep:
    """Read, expand and validate a sweep file.

    Args:
        path: The YAML file.
        sets: ``PATH=VALUE`` overrides of keys of the file (the value is read as YAML: ``bits=4``,
            ``recipe=[{gptq: {}}]``); a path the grid varies is pinned to the value.

    Returns:
        The sweep.

    Raises:
        ConfigError: Unknown key, a path that names no config field, an empty grid, lists of unequal
            length in ``zip``, a missing include, or a run whose configuration is invalid.

    """
    p = Path(path)
    data = _with_includes(read_yaml(p), p.parent, [p.resolve()])
    for item in sets:
        _apply_set(data, item)
    return expand(data, default_name=p.stem)


def expand(data: Mapping[str, Any], default_name: str = "sweep") -> Sweep:
    """Expand a sweep mapping (includes already merged) into validated runs.

    Raises:
        ConfigError: As :func:`load_sweep`.

    """
    doc = dict(data)
    name = doc.pop("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name: expected a non-empty string, got {name!r}")
    grid = _axes(doc.pop("grid", None), "grid")
    zips = _zips(doc.pop("zip", None))
    excludes = _excludes(doc.pop("exclude", None))
    if "grid" in data and not grid:
        raise ConfigError("grid: empty (give at least one path with a list of values, or leave grid out)")
    base = doc
    parse_config_keys(base)
    points = _points(grid, zips)
    runs: list[SweepRun] = []
    seen: set[str] = set()
    excluded = 0
    for k, values in enumerate(points):
        raw = copy.deepcopy(base)
        for key, value in values.items():
            set_path(raw, key, copy.deepcopy(value))
        cfg = _validated(raw, k, values)
        dump = cfg.model_dump(mode="json")
        if any(_matches(dump, raw, ex) for ex in excludes):
            excluded += 1
            continue
        digest = json.dumps(dump, sort_keys=True)
        if digest not in seen:
            seen.add(digest)
            runs.append(SweepRun(cfg, values))
    if not runs:
        raise ConfigError(f"sweep {name!r}: every run is excluded ({excluded} expanded)")
    return Sweep(name, runs, list(grid) + [p for z in zips for p in z], excluded)


def parse_config_keys(base: Mapping[str, Any]) -> None:
    """Reject a top-level key that is neither a run-config key nor a sweep key, naming it."""
    known = set(RunConfig.model_fields) | set(SWEEP_KEYS)
    for key in base:
        if key not in known:
            raise ConfigError(f"{key}: unknown key (a sweep file has the keys of a run config plus "
                              f"{', '.join(SWEEP_KEYS)})")


def check_path(path: str) -> None:
    """Raise ConfigError unless the dotted ``path`` names a field of the run configuration.

    Fields that hold free mappings (a recipe step's options, an override's weight section) accept any key
    below them; their values are checked when the run is validated.
    """
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(f"{path!r}: not a dotted config path")
    annotation: Any = RunConfig
    for depth, part in enumerate(parts):
        model = _model_of(annotation)
        if model is None:
            if _is_free_mapping(annotation):
                return
            where = ".".join(parts[:depth])
            raise ConfigError(f"{path!r} names no config field: {where} has no field {part!r}")
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the configuration"
            fields = ", ".join(model.model_fields)
            raise ConfigError(f"{path!r} names no config field: {where} has no field {part!r} (fields: {fields})")
        annotation = model.model_fields[part].annotation


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set ``doc[a][b][c] = value`` for ``path = "a.b.c"``, creating (or replacing null) sections on the way."""
    parts = path.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def get_path(doc: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """``(True, value)`` at the dotted ``path`` of ``doc``, or ``(False, None)`` when it is not there."""
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def parse_set(item: str) -> tuple[str, Any]:
    """Split a ``PATH=VALUE`` override; the value is read as YAML (``4``, ``null``, ``[{gptq: {}}]``).

    Raises:
        ConfigError: No ``=``, or a value that is not valid YAML.

    """
    path, sep, text = item.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {item!r}: expected PATH=VALUE, e.g. model=./my-model")
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    return path.strip(), value


def _apply_set(data: dict[str, Any], item: str) -> None:
    path, value = parse_set(item)
    if path in SWEEP_KEYS:
        data[path] = value
        return
    check_path(path)
    zips = data.get("zip") or []
    if any(isinstance(z, Mapping) and path in z for z in (zips if isinstance(zips, list) else [zips])):
        raise ConfigError(f"--set {path}: the path varies in the sweep's zip; edit the file to pin it")
    grid = data.get("grid")
    if isinstance(grid, dict) and path in grid:
        data["grid"] = {k: v for k, v in grid.items() if k != path}
        if not data["grid"]:  # the last varied path is pinned: one run
            del data["grid"]
    set_path(data, path, value)


def _with_includes(data: Any, folder: Path, chain: list[Path]) -> dict[str, Any]:
    """The sweep mapping with its ``include`` files merged in first (recursively; cycles are an error)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{chain[-1]}: a sweep file must be a mapping, got {type(data).__name__}")
    includes = data.get("include") or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{chain[-1]}: include: expected a list of file paths")
    merged: dict[str, Any] = {}
    for name in includes:
        path = (folder / name).resolve()
        if path in chain:
            raise ConfigError(f"include: {name} includes itself (through {', '.join(p.name for p in chain)})")
        if not path.is_file():
            raise ConfigError(f"{chain[-1]}: include: file not found: {path}")
        merged = _merge(merged, _with_includes(read_yaml(path), path.parent, [*chain, path]))
    own = {k: v for k, v in data.items() if k != "include"}
    return _merge(merged, own)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merged key by key (``top`` wins); lists and values replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _axes(section: Any, key: str) -> dict[str, list[Any]]:
    """A ``grid`` or ``zip`` section: dotted paths (each naming a config field) -> non-empty lists."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{key}: expected a mapping of dotted config paths to lists")
    out: dict[str, list[Any]] = {}
    for path, values in section.items():
        check_path(str(path))
        if not isinstance(values, list):
            raise ConfigError(f"{key}.{path}: expected a list of values, got {type(values).__name__}")
        if not values:
            raise ConfigError(f"{key}.{path}: empty list (a sweep over no values has no runs)")
        out[str(path)] = values
    return out


def _zips(section: Any) -> list[dict[str, list[Any]]]:
    """The ``zip`` section as groups (a mapping is one group; a list of mappings, several) of equal lengths."""
    groups = section if isinstance(section, list) else [] if section is None else [section]
    out = []
    for k, group in enumerate(groups):
        where = "zip" if not isinstance(section, list) else f"zip[{k}]"
        zipped = _axes(group, where)
        lengths = {path: len(v) for path, v in zipped.items()}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{p}: {n}" for p, n in lengths.items())
            raise ConfigError(f"{where}: the lists must have equal lengths ({listed})")
        out.append(zipped)
    return out


def _points(grid: Mapping[str, list[Any]], zips: list[dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination: the product of the grid's lists and of each zip group's rows."""
    axes = [[dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]]
    for zipped in zips:
        axes.append([dict(zip(zipped, values, strict=True)) for values in zip(*zipped.values(), strict=True)])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def _excludes(section: Any) -> list[dict[str, Any]]:
    """``exclude`` entries as flat ``{dotted path: value}`` mappings (nested or dotted keys both work)."""
    if section is None:
        return []
    if not isinstance(section, list) or not all(isinstance(e, Mapping) and e for e in section):
        raise ConfigError("exclude: expected a list of non-empty partial configs")
    flat = [_flatten(e) for e in section]
    for entry in flat:
        for path in entry:
            check_path(path)
    return flat


def _flatten(entry: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entry.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _matches(dump: Mapping[str, Any], raw: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    """Whether a run (its normalized dump, else its raw keys) has every value of an exclude entry."""
    for path, value in entry.items():
        found, have = get_path(dump, path)
        if not found:
            found, have = get_path(raw, path)
        if not found or have != value:
            return False
    return True


def _validated(raw: dict[str, Any], k: int, values: Mapping[str, Any]) -> RunConfig:
    try:
        return parse_config(raw)
    except ConfigError as exc:
        if not values:
            raise
        given = ", ".join(f"{p}={json.dumps(v)}" for p, v in values.items())
        raise ConfigError(f"run {k} ({given}): {exc}") from None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (through Optional / unions), or None."""
    for candidate in _members(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_free_mapping(annotation: Any) -> bool:
    return any(typing.get_origin(c) in (dict, Mapping) or c is dict for c in _members(annotation))


def _members(annotation: Any) -> Iterable[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(annotation):
            yield from _members(arg)
    else:
        yield annotation
