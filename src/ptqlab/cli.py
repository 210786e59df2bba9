"""The ``ptqlab`` command line: run a configuration, list and show stored runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .errors import PtqlabError
from .study.store import RunRecord, Store

DEFAULT_STORE = "ptqlab.db"


def _store(args: argparse.Namespace) -> Store:
    return Store(args.store or os.environ.get("PTQLAB_STORE") or DEFAULT_STORE)


def _part(prefix: str, section: dict[str, Any] | None) -> str | None:
    """``W4 group64`` / ``Anf4`` / ``KV4``, or None for a full-precision part."""
    if not section:
        return None
    fmt = section.get("format") or "int"
    bits = section.get("bits")
    if fmt == "int" and (bits is None or bits >= 16):
        return None
    size = fmt if fmt != "int" else str(bits)
    gran = section.get("granularity") or ""
    return f"{prefix}{size} {gran}{section.get('group_size') or ''}".strip()


def describe_scheme(scheme: dict[str, Any]) -> str:
    """A short description of a scheme, e.g. ``W4 group64 + A8 token + KV4 head`` (``FP`` if none)."""
    keys = (("W", "weight"), ("A", "activation"), ("KV", "kv_cache"))
    parts = [_part(prefix, scheme.get(key)) for prefix, key in keys]
    return " + ".join(p for p in parts if p) or "FP"


def _run_table(run: RunRecord, out: TextIO) -> None:
    cfg = run.config
    weight = (cfg.get("scheme") or {}).get("weight") or {}
    recipe = ", ".join(next(iter(s)) for s in cfg.get("recipe") or []) or ("rtn" if weight else "-")
    out.write(f"run {run.id}  status {run.status}  model {run.model} ({run.architecture})\n")
    out.write(f"scheme {describe_scheme(cfg.get('scheme') or {})}  recipe {recipe}\n")
    if run.error:
        out.write(f"error: {run.error}\n")
    if run.metrics:
        width = max(len(m.name) for m in run.metrics)
        out.write(f"{'metric':<{width}}  value\n")
        for m in run.metrics:
            err = f" ± {m.stderr:.4g}" if m.stderr is not None else ""
            out.write(f"{m.name:<{width}}  {m.value:.4f}{err}\n")
    if run.texts.get("sample"):
        out.write(f"sample: {run.texts['sample']!r}\n")
    if run.timings:
        t = run.timings
        threads = f", {run.threads} threads" if run.threads else ""
        out.write(f"time: quantize {t.get('quantize_s', 0):.1f} s, total {t.get('total_s', 0):.1f} s{threads}\n")


def cmd_run(args: argparse.Namespace) -> int:
    """Run one configuration file."""
    from .study.config import load_config
    from .study.runner import execute

    cfg = load_config(args.config)
    outcome = execute(cfg, _store(args), force=args.force, progress=not args.quiet)
    if args.json:
        json.dump(outcome.record.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if outcome.reused:
            sys.stdout.write("(already in the store; --force recomputes)\n")
        _run_table(outcome.record, sys.stdout)
    return 0 if outcome.record.status == "done" else 1


def cmd_ls(args: argparse.Namespace) -> int:
    """List stored runs, one line each."""
    runs = _store(args).list_runs()
    if not runs:
        sys.stdout.write("no runs in the store\n")
        return 0
    for r in runs:
        w = (r.config.get("scheme") or {}).get("weight") or {}
        recipe = ",".join(next(iter(s)) for s in r.config.get("recipe") or []) or "-"
        bits = w.get("bits", 16)
        scheme = f"W{bits}/{w.get('granularity')}{w.get('group_size') or ''}" if bits < 16 else "FP"
        ppl = next((m for m in r.metrics if m.name.startswith("ppl.")), None)
        metric = f"{ppl.name}={ppl.value:.3f}" if ppl else ""
        sys.stdout.write(f"{r.id}  {r.status:<6}  {r.model:<14}  {scheme:<14}  {recipe:<6}  {metric}\n")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Show one stored run."""
    run = _store(args).get(args.run)
    if run is None:
        sys.stderr.write(f"error: no run (or more than one) matches {args.run!r}\n")
        return 2
    if args.json:
        json.dump(run.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _run_table(run, sys.stdout)
        for rec in run.layers:
            err = f"{rec['rel_error']:.5f}" if rec["rel_error"] is not None else "-"
            sys.stdout.write(f"  {rec['module']:<45} W{rec['bits']}  err {err}  {rec['seconds']:.2f} s\n")
    return 0


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
    run.add_argument("--force", action="store_true", help="recompute even if the run is stored")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)
    ls = sub.add_parser("ls", help="list stored runs")
    ls.set_defaults(func=cmd_ls)
    show = sub.add_parser("show", help="show one stored run")
    show.add_argument("run", help="run id (a unique prefix is enough)")
    show.add_argument("--json", action="store_true", help="print as JSON")
    show.set_defaults(func=cmd_show)
    for command in (run, ls, show):
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
