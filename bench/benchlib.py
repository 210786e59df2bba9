"""Shared by the bench scripts: results files that resume a killed run of the same protocol."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def open_results(name: str, command: str, **protocol: Any) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The results file ``bench/results/<name>``, this run's meta, and what an earlier run saved there.

    Earlier results are kept only when they were measured with the same ``protocol`` settings; a change
    of protocol starts over.
    """
    out = RESULTS / name
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "model": "smollm2-135m fp32", "command": command, **protocol}
    saved = json.loads(out.read_text()) if out.exists() else {}
    if {k: saved.get("meta", {}).get(k) for k in protocol} != protocol:
        saved = {}
    return out, meta, saved
