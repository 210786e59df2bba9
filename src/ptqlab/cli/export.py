"""``ptqlab export``: write a run's quantized model as a checkpoint other tools load."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..errors import ConfigError
from ..store import Store
from .runs import store_path


def add_commands(sub: Any) -> list[argparse.ArgumentParser]:
    """Add ``export`` to the subcommands."""
    from ..export.run import FORMATS

    export = sub.add_parser("export", help="write a run's quantized model in a format other tools load")
    export.add_argument("run", help="a YAML configuration file, or the id of a stored run (a unique prefix)")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help="hf: fake-quantized safetensors; compressed-tensors: packed codes (vLLM); "
                        "gguf: llama.cpp block types (weights in gguf_* formats)")
    export.add_argument("--out", required=True, help="directory to create")
    export.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    export.set_defaults(func=cmd_export)
    return [export]


def cmd_export(args: argparse.Namespace) -> int:
    """Export a configuration's (or a stored run's) quantized model."""
    from ..export.run import export_config
    from ..study.config import load_config, parse_config

    path = store_path(args)
    store = Store(path) if os.path.isfile(path) else None
    if os.path.isfile(args.run):
        cfg = load_config(args.run)
    else:
        record = store.get(args.run) if store is not None else None
        if record is None:
            raise ConfigError(f"{args.run!r} is neither a configuration file nor a run in the store {path}")
        cfg = parse_config(record.config)
    result = export_config(cfg, args.format, args.out, overwrite=args.overwrite, store=store,
                           progress=not args.quiet)
    sys.stdout.write(f"exported run {result.run_id} ({result.format}) to {result.directory} "
                     f"in {result.seconds:.1f} s\n")
    return 0
