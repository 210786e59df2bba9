"""`make demo`: a small real study on SmolLM2-135M, run as a sweep, ending with its report.

configs/studies/demo.yaml: FP, RTN and GPTQ at W4 per row and W3 in groups of 64; calibration 32 x 512
tokens from c4local, wikitext2 perplexity on the first 4 windows of 2048 tokens. Results go to the store
(./ptqlab.db or $PTQLAB_STORE; a finished run is not recomputed), the report to ./demo-report/.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ptqlab
from ptqlab.report import load_views, open_store, write_report
from ptqlab.report.runs import quality

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "configs" / "studies" / "demo.yaml"


def main() -> None:
    """Run the sweep, print its table, write the report and print where its page is."""
    logging.basicConfig(level=logging.WARNING)
    store_path = os.environ.get("PTQLAB_STORE", "ptqlab.db")
    t0 = time.perf_counter()
    summary = ptqlab.sweep(str(STUDY), store=store_path)
    if summary.failed:
        raise SystemExit(f"{summary.failed} demo runs failed: ptqlab ls --status failed")
    views = [v for v in load_views(open_store(store_path)) if "demo" in v.sweeps]
    print(f"\nSmolLM2-135M, wikitext2 ppl (4 windows of 2048), calibration 32 x 512 c4local; "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(f"| {'scheme [recipe]':<26} | {'ppl':>8} | {'Δ ppl':>8} | {'bits/w':>6} | {'quantize s':>10} | run id |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 12}|{'-' * 18}|")
    for v in views:
        q = quality(v)
        ppl, delta = (q.value, q.delta) if q else (float("nan"), float("nan"))
        delta = 0.0 if abs(delta) < 5e-4 else delta  # FP against itself: no "-0.000"
        print(f"| {v.label:<26} | {ppl:8.3f} | {delta:8.3f} | {v.weight_bits or 16:6.2f} | "
              f"{v.record.timings.get('quantize_s', 0.0):10.1f} | {v.id} |")
    report = write_report(store_path, "demo-report", where="sweep=demo", title="ptqlab demo: SmolLM2-135M")
    print(f"\nThe report ({len(report.tables)} tables, {len(report.figures)} figures, checked findings):")
    print(report.index.resolve())


if __name__ == "__main__":
    main()
