"""Reading lm-eval task YAMLs as lm-eval does, without loading a task: tags, includes, extras.

A task YAML may ``include`` others (a path relative to the including file, or absolute; the including
file's keys win, and a later include wins over an earlier one) and carry lm-eval's custom tags
(``!function``), read here as plain values. Some lm-eval task families need packages or data that
lm-eval does not install (``ifeval``: ``langdetect``, ``immutabledict`` and nltk's ``punkt_tab``, which its
code tries to download when it is imported): :func:`missing_extras` says what is missing before lm-eval
imports that code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

EXTRAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ifeval": (("langdetect", "immutabledict", "nltk"), ("tokenizers/punkt_tab",)),
}
"""lm-eval task families whose code needs what lm-eval does not install: (Python packages, nltk data)."""


class AnyTagLoader(yaml.SafeLoader):
    """A safe loader that accepts lm-eval's custom tags (``!function``) as plain values."""


def _any_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)  # type: ignore[arg-type]


AnyTagLoader.add_multi_constructor("!", _any_tag)


def load_task_yaml(path: Path) -> Any:
    """The parsed content of a task YAML (custom tags as plain values).

    Raises:
        yaml.YAMLError: The file does not parse.

    """
    return yaml.load(path.read_text(), Loader=AnyTagLoader)  # noqa: S506 - a SafeLoader subclass


def _includes(path: Path, doc: Any) -> list[Path]:
    """The files ``doc`` (read from ``path``) includes, in order."""
    value = doc.get("include") if isinstance(doc, dict) else None
    names = value if isinstance(value, list) else [value] if value else []
    return [Path(n) if Path(n).is_absolute() else path.parent / n for n in names]


def included_files(path: Path) -> list[Path]:
    """``path`` and every file it includes, directly or not (each once, resolved; missing files left out)."""
    seen: list[Path] = []
    todo = [path]
    while todo:
        p = todo.pop(0).resolve()
        if p in seen or not p.is_file():
            continue
        seen.append(p)
        todo += _includes(p, load_task_yaml(p))
    return seen


def yaml_value(path: Path, key: str) -> Any:
    """The value of ``key`` in a task YAML as lm-eval merges its includes, or None when it is not set."""
    doc = load_task_yaml(path)
    if isinstance(doc, dict) and key in doc:
        return doc[key]
    for inc in reversed(_includes(path, doc)):
        if inc.is_file():
            value = yaml_value(inc, key)
            if value is not None:
                return value
    return None


def family(task: str, user_file: Path | None) -> str | None:
    """The lm-eval task family of ``task`` that needs extras: by its name, or by a built-in YAML it includes."""
    if task in EXTRAS:
        return task
    if user_file is None:
        return None
    for p in included_files(user_file):
        if p.parent.name in EXTRAS and p.parent.parent.name == "tasks":
            return p.parent.name
    return None


def missing_extras(name: str) -> list[str]:
    """What a task family needs that is not installed here: packages by name, nltk data as ``nltk:<path>``."""
    packages, data = EXTRAS[name]
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if "nltk" in missing:
        return missing + [f"nltk:{d}" for d in data]
    import nltk

    for resource in data:
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(f"nltk:{resource}")
    return missing


def install_hint(missing: list[str]) -> str:
    """The commands that install ``missing`` (as :func:`missing_extras` names them)."""
    packages = [m for m in missing if not m.startswith("nltk:")]
    data = [m.split("/")[-1] for m in missing if m.startswith("nltk:")]
    how = ([f"pip install {' '.join(packages)}"] if packages else []) + (
        [f"python -m nltk.downloader {' '.join(data)}"] if data else [])
    return "; ".join(how)
