"""Read a run configuration: the schema, then the model-free compile step (so every error comes first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..compile import compile_config
from ..schema import RunConfig, read_yaml
from ..schema import parse_config as parse_schema


def parse_config(data: Any) -> RunConfig:
    """Validate a configuration mapping and compile it (no model is loaded).

    Args:
        data: The parsed YAML/JSON mapping.

    Returns:
        The validated configuration, defaults filled in; its compiled form is kept with it.

    Raises:
        ConfigError: Naming the path of the first offending fields, an unknown method, option, corpus or task.

    """
    cfg = parse_schema(data)
    compile_config(cfg)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Read, validate and compile a YAML (or JSON) configuration file.

    Raises:
        ConfigError: Missing file, invalid YAML, or invalid content.

    """
    return parse_config(read_yaml(path))
