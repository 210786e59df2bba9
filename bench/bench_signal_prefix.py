"""The kl signal's evaluations started at the moved unit's layer, against whole forwards, on SmolLM2-135M.

One process: the FP model's top-k reference on ``--windows`` windows of ``--seqlen`` token ids (random ids:
this times the forwards, the numbers are not read), the base model's layer inputs captured once, then per
repetition one whole :func:`ptqlab.eval.divergence.divergence` and one evaluation starting at each of five
layers (0, a quarter, half, three quarters, the last), both kinds timed side by side. The KL of each started
evaluation is checked equal to the whole one's (here the model is the base, so both are 0; the test suite
checks it with moved weights). Writes ``bench/results/signal_prefix.json``.

    python bench/bench_signal_prefix.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from benchlib import open_results

from ptqlab.eval import divergence as div
from ptqlab.models.loading import load_model
from ptqlab.models.registry import get_adapter
from ptqlab.search.signal import _BaseInputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out, meta, _ = open_results("signal_prefix.json", "python bench/bench_signal_prefix.py", windows=args.windows,
                                seqlen=args.seqlen)
    lm = load_model("smollm2-135m", "float32", "cpu", False)
    model, layers = lm.model, get_adapter(lm.model).layers(lm.model)
    ids = torch.randint(0, model.config.vocab_size, (args.windows, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    ref = div.TopKReference.stack(ids, [div.window_reference(div.logprob_chunks(model, ids[w : w + 1]), ids[w], 32)
                                        for w in range(args.windows)])
    t0 = time.perf_counter()
    prefix = _BaseInputs(model, layers, ref.ids)
    capture_s = time.perf_counter() - t0
    n = len(layers)
    starts = [0, n // 4, n // 2, 3 * n // 4, n - 1]
    whole: list[float] = []
    started: dict[int, list[float]] = {s: [] for s in starts}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        full = div.divergence(model, ref).kl
        whole.append(time.perf_counter() - t0)
        for s in starts:
            t0 = time.perf_counter()
            kl = prefix.divergence(model, s, ref).kl
            started[s].append(time.perf_counter() - t0)
            assert kl == full, (s, kl, full)
    base = statistics.median(whole)
    rows = [{"start_layer": s, "median_s": statistics.median(v), "ratio": statistics.median(v) / base}
            for s, v in started.items()]
    mean_ratio = statistics.mean(r["ratio"] for r in rows)
    print(f"SmolLM2-135M, {args.windows} x {args.seqlen} tokens, {n} layers; capture {capture_s:.1f} s once")
    print(f"whole evaluation: median {base:.2f} s over {args.repeats}")
    print("| start layer | median s | of a whole evaluation |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['start_layer']} | {r['median_s']:.2f} | {r['ratio']:.2f} |")
    print(f"mean over the five starts: {mean_ratio:.2f}")
    out.write_text(json.dumps({"meta": meta, "layers": n, "capture_s": capture_s, "whole_s": whole,
                               "started_s": {str(k): v for k, v in started.items()}, "rows": rows,
                               "mean_ratio": mean_ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
