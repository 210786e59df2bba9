"""AWQ's scale search against its earlier form (H rescaled per alpha, the plain ``sum((D @ H) * D)``).

The search evaluates ``tr(D H D^T)`` per alpha on every weight of a linear group. ptqlab's form sums each block
of the symmetric H once (diagonal) or twice (below it), about half the multiply-adds, and divides the weight
error by the scales instead of rescaling the in x in Hessian for each alpha. Timed on the linear
groups of Qwen2.5-Coder-1.5B's decoder layer (random weights and inputs of its shapes: q/k/v 2048 x 1536,
gate/up 2 x 8960 x 1536, down 1536 x 8960; 2048 calibration tokens with a few large channels), 4-bit
asymmetric groups of 64, AWQ's 20 alphas, at one torch thread, the two forms interleaved. Also checks that both
pick the same scales. Writes ``bench/results/awq_search.json``.

    python bench/bench_awq_search.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from benchlib import open_results

from ptqlab.methods.awq import AWQScale
from ptqlab.methods.base import scaled_hessian
from ptqlab.quant.core import fake_quantize
from ptqlab.quant.spec import QuantSpec

GROUPS = {"q/k/v": ([1536, 256, 256], 1536), "gate/up": ([8960, 8960], 1536), "down": ([1536], 8960)}


def earlier(act_mean: torch.Tensor, weights: list[torch.Tensor], specs: list[QuantSpec], H: torch.Tensor,
            slot: torch.Tensor, grid: int = 20) -> torch.Tensor:
    """The search as ``AWQScale.search`` computed it before (the same alphas, scales and choice)."""
    n = int(slot.max()) + 1
    best, best_err = torch.ones(n), float("inf")
    base = act_mean.float().clamp_min(1e-8)
    for k in range(grid):
        s_slot = base.pow(k / grid)
        s_slot = s_slot / (s_slot.max() * s_slot.min()).sqrt()
        s = s_slot[slot]
        Hs = scaled_hessian(H, s)
        err = 0.0
        for W, spec in zip(weights, specs, strict=True):
            Ws = W.float() * s[None, :]
            D = fake_quantize(Ws, spec) - Ws
            err += float(torch.sum((D @ Hs) * D))
        if err < best_err:
            best, best_err = s_slot, err
    return best


def group_inputs(outs: list[int], cols: int, tokens: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                              torch.Tensor]:
    """Mean |x| per channel, the weights and the Hessian of one group (random, with 1 % large channels)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g)
    X[:, torch.randperm(cols, generator=g)[: cols // 100]] *= 20.0
    weights = [torch.randn(o, cols, generator=g) * 0.02 for o in outs]
    return X.abs().mean(0), weights, X.T @ X / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out, meta, _ = open_results("awq_search.json", "python bench/bench_awq_search.py", repeats=args.repeats,
                                tokens=args.tokens)
    meta["model"] = "Qwen2.5-Coder-1.5B shapes, random weights"
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64)
    forms = {"earlier": earlier, "now": AWQScale().search}
    rows = []
    for seed, (name, (outs, cols)) in enumerate(GROUPS.items()):
        act, weights, H = group_inputs(outs, cols, args.tokens, seed)
        slot = torch.arange(cols)
        times: dict[str, list[float]] = {k: [] for k in forms}
        scales: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for form, fn in forms.items():
                t0 = time.perf_counter()
                scales[form] = fn(act, weights, [spec] * len(weights), H, slot)
                times[form].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"group": name, "shape": f"{sum(outs)} x {cols}", "earlier_s": times["earlier"],
                     "now_s": times["now"], "speedup": med["earlier"] / med["now"],
                     "same_scales": bool(torch.equal(scales["earlier"], scales["now"]))})
    total = sum(statistics.median(r["earlier_s"]) for r in rows) / sum(statistics.median(r["now_s"]) for r in rows)
    print(f"AWQ scale search, 20 alphas, int4 asym g64, {args.tokens} tokens, 1 thread; medians of {args.repeats}")
    print("| group | rows x columns | earlier s | now s | speedup | same scales |\n|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['group']} | {r['shape']} | {statistics.median(r['earlier_s']):.1f} | "
              f"{statistics.median(r['now_s']):.1f} | {r['speedup']:.2f}x | {r['same_scales']} |")
    print(f"one decoder layer's groups: {total:.2f}x")
    out.write_text(json.dumps({"meta": meta, "rows": rows, "layer_speedup": total}, indent=2) + "\n")


if __name__ == "__main__":
    main()
