"""The ``ptqlab`` command line: run a configuration or a sweep, list, show and summarise stored runs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import PtqlabError
from . import export, report, search, study
from .runs import DEFAULT_STORE, cmd_ls, cmd_run, cmd_show, describe_scheme

__all__ = ["build_parser", "describe_scheme", "main"]


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``--store`` and ``-v``: on the main parser with their defaults, on each subcommand without."""
    keep: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--store", help=f"results store (default: $PTQLAB_STORE or ./{DEFAULT_STORE})", **keep)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages", **keep)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ptqlab`` command (global options go before or after the subcommand)."""
    parser = argparse.ArgumentParser(prog="ptqlab", description="Post-training quantization studies of LLMs.")
    _global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="quantize, evaluate and store one configuration")
    run.add_argument("config", help="YAML configuration file")
    run.add_argument("--json", action="store_true", help="print the stored run as JSON")
    run.add_argument("--force", action="store_true",
                     help="recompute even if the run is stored (quantized weights kept by an earlier run with the "
                          "same weights, such as a streamed run's offload directory, are still reused: add "
                          "--no-reuse to quantize again, e.g. to time it)")
    run.add_argument("--no-reuse", action="store_true",
                     help="recompute, and quantize again even where quantized weights with the same key are kept "
                          "(replacing them); implies --force")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--dry-run", action="store_true", help="show what the run computes and its estimated time")
    run.set_defaults(func=cmd_run)
    ls = sub.add_parser("ls", help="list stored runs (filter by sweep, status, model, metric)")
    ls.add_argument("--sweep", default=None, help="only the runs of this sweep")
    ls.add_argument("--status", choices=("done", "failed"), default=None, help="only runs with this status")
    ls.add_argument("--model", default=None, help="only runs of this model (as configs name it)")
    ls.add_argument("--metric", default=None, help="only runs with a metric matching this pattern (e.g. 'kl.*')")
    ls.set_defaults(func=cmd_ls)
    show = sub.add_parser("show", help="show one stored run")
    show.add_argument("run", help="run id (a unique prefix is enough)")
    show.add_argument("--json", action="store_true", help="print as JSON")
    show.set_defaults(func=cmd_show)
    for command in (run, ls, show, *study.add_commands(sub), *report.add_commands(sub), *export.add_commands(sub),
                    *search.add_commands(sub)):
        _global_options(command, defaults=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ptqlab`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except PtqlabError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
