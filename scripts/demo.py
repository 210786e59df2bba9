"""`make demo`: a small real study on SmolLM2-135M: FP, RTN and GPTQ at W4 per-channel and W3 g64.

Calibration 32 x 512 tokens from c4local, wikitext2 perplexity on the first 8 windows of 2048 tokens.
Results go to the store (./ptqlab.db or $PTQLAB_STORE); a finished run is not recomputed.
"""

from __future__ import annotations

import logging
import os
import time

from ptqlab.study.config import parse_config
from ptqlab.study.runner import execute
from ptqlab.study.store import Store

SCHEMES = {
    "FP": None,
    "W4 per-channel": {"bits": 4, "granularity": "channel"},
    "W3 g64": {"bits": 3, "granularity": "group", "group_size": 64},
}


def configs() -> list[tuple[str, str, dict]]:
    """The demo's configurations: (scheme label, method, config mapping)."""
    out = []
    for label, weight in SCHEMES.items():
        for method in (["-"] if weight is None else ["rtn", "gptq"]):
            cfg = {
                "model": "smollm2-135m",
                "scheme": {"weight": weight} if weight else {},
                "recipe": [] if weight is None else [{method: {}}],
                "calibration": {"dataset": "c4local", "samples": 32, "seqlen": 512, "seed": 0},
                "evaluate": {"perplexity": ["wikitext2"], "seqlen": 2048, "max_windows": 8},
            }
            out.append((label, method, cfg))
    return out


def main() -> None:
    """Run the study and print its table."""
    logging.basicConfig(level=logging.WARNING)
    store = Store(os.environ.get("PTQLAB_STORE", "ptqlab.db"))
    rows = []
    t0 = time.perf_counter()
    for label, method, raw in configs():
        print(f"== {label} {method}", flush=True)
        outcome = execute(parse_config(raw), store, progress=True)
        rec = outcome.record
        ppl = next(m.value for m in rec.metrics if m.name.startswith("ppl.wikitext2"))
        rows.append((label, method, ppl, rec.timings.get("quantize_s", 0.0), rec.id, outcome.reused))
    print(f"\nSmolLM2-135M, wikitext2 ppl (8 windows of 2048), calibration 32 x 512 c4local; "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(f"| {'scheme':<15} | {'method':<6} | {'ppl':>8} | {'quantize s':>10} | run id |")
    print(f"|{'-' * 17}|{'-' * 8}|{'-' * 10}|{'-' * 12}|{'-' * 18}|")
    for label, method, ppl, qs, rid, reused in rows:
        print(f"| {label:<15} | {method:<6} | {ppl:8.3f} | {qs:10.1f} | {rid}{' (stored)' if reused else ''} |")
    print("\n`.venv/bin/ptqlab ls` lists the stored runs; `.venv/bin/ptqlab show ID` shows one.")


if __name__ == "__main__":
    main()
