"""`make bench-methods`: the PTQ methods of ZeroQuant-V2 / qllm-eval and beyond on SmolLM2-135M.

FP first; quality is the mean perplexity of wikitext2, ptb_new and c4local_new (first 20 windows of 2048 each);
calibration 128 x 512 from c4local (seed 0); groups of 64 where groups are used. Tables:

1. RTN, GPTQ, ZeroQuant-Local and AWQ, each without and with LoRC (rank 8, INT8 factors, applied to the
   same base quantization), at W4 and W3 per-channel and W4A8 (per-token asymmetric activations);
2. SmoothQuant + RTN against RTN at W8A8 and W6A6;
3. rotation + GPTQ against GPTQ at W4A4 and W4A4KV4.

Every finished row is appended to bench/results/methods.json, so a killed run resumes where it stopped.

    python bench/bench_methods.py                      # everything (hours on 2 CPU cores)
    python bench/bench_methods.py --only base:W4       # one part (parts: fp, base:W4, pair:W8A8, ...)
    python bench/bench_methods.py --windows 2 --samples 16 --out methods-smoke.json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import RESULTS, open_results, perplexities

CORPORA = ("wikitext2", "ptb_new", "c4local_new")

W_CH = {"granularity": "channel"}
A_TOK = {"granularity": "token", "symmetric": False}
BASE_SCHEMES: dict[str, dict[str, Any]] = {
    "W4": {"weight": {"bits": 4, **W_CH}},
    "W3": {"weight": {"bits": 3, **W_CH}},
    "W4A8": {"weight": {"bits": 4, **W_CH}, "activation": {"bits": 8, **A_TOK}},
}
BASE_METHODS: dict[str, list[dict[str, Any]]] = {
    "RTN": [{"rtn": {}}],
    "GPTQ": [{"gptq": {}}],
    "ZeroQuant-Local": [{"gptq": {}}, {"zeroquant_local": {}}],
    "AWQ": [{"awq": {}}],
}
PAIRS: dict[str, tuple[dict[str, Any], list[tuple[str, list[dict[str, Any]]]]]] = {
    "W8A8": ({"weight": {"bits": 8, **W_CH}, "activation": {"bits": 8, **A_TOK}},
             [("RTN", [{"rtn": {}}]), ("SmoothQuant+RTN", [{"smoothquant": {"alpha": 0.5}}, {"rtn": {}}])]),
    "W6A6": ({"weight": {"bits": 6, **W_CH}, "activation": {"bits": 6, **A_TOK}},
             [("RTN", [{"rtn": {}}]), ("SmoothQuant+RTN", [{"smoothquant": {"alpha": 0.5}}, {"rtn": {}}])]),
    "W4A4": ({"weight": {"bits": 4, **W_CH}, "activation": {"bits": 4, **A_TOK}},
             [("GPTQ", [{"gptq": {}}]), ("rotation+GPTQ", [{"rotation": {}}, {"gptq": {}}])]),
    "W4A4KV4": ({"weight": {"bits": 4, **W_CH}, "activation": {"bits": 4, **A_TOK},
                 "kv_cache": {"bits": 4, "granularity": "head"}},
                [("GPTQ", [{"gptq": {}}]), ("rotation+GPTQ", [{"rotation": {"kv": True}}, {"gptq": {}}])]),
}


def _ppl(lm: Any, windows: int) -> dict[str, float]:
    out = perplexities(lm.model, lm.tokenizer, CORPORA, 2048, windows)
    out["mean"] = sum(out[c] for c in CORPORA) / len(CORPORA)
    return out


def _record_inputs(method: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wrap the quantizer's ``quantize`` to keep each call's FP input and quantized output, in call order."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    inner = method.quantize

    def quantize(W: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        res = inner(W, *args, **kwargs)
        calls.append((W.detach().float().clone(), res.weight.detach().float().clone()))
        return res

    method.quantize = quantize
    return calls


def _fp_references(model: torch.nn.Module, names: list[str], calls: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> dict[str, torch.Tensor]:
    """The FP weight each quantized linear now stands for.

    That is the weight the quantizer was given (after the transforms folded into its columns), with the
    output rows divided since by a later group's fold (AWQ and SmoothQuant scale ``v_proj``/``up_proj`` rows
    after they are quantized). The row factors are read off the quantized weight itself, and checked.
    """
    from ptqlab.models.weights import weight_matrix

    refs = {}
    for name, (W, q_then) in zip(names, calls, strict=True):
        q_now = weight_matrix(model.get_submodule(name)).detach().float()
        norm = (q_then * q_then).sum(dim=1)
        d = torch.where(norm > 0, (q_now * q_then).sum(dim=1) / norm.clamp_min(1e-30), torch.ones_like(norm))
        residual = (q_now - d[:, None] * q_then).norm() / q_now.norm().clamp_min(1e-30)
        if residual > 1e-4:
            raise RuntimeError(f"{name}: the quantized weight changed by more than a row scaling ({residual:.2e})")
        refs[name] = d[:, None] * W
    return refs


def _lorc_on_same_base(model: torch.nn.Module, fp: dict[str, torch.Tensor], plan: Any) -> float:
    """Add LoRC (rank 8, INT8 factors) to every quantized linear of an already quantized model."""
    from ptqlab.methods.base import WeightResult
    from ptqlab.methods.lorc import LoRC, LoRCConfig
    from ptqlab.models.weights import set_weight_matrix, weight_matrix

    lorc = LoRC(LoRCConfig(rank=8, factor_bits=8))
    t0 = time.perf_counter()
    for t in plan.targets:
        module = model.get_submodule(t.name)
        Wq = weight_matrix(module).detach().float()
        res = lorc.compensate(fp[t.name], WeightResult(Wq, Wq, None))  # type: ignore[arg-type]
        set_weight_matrix(module, res.weight)
    return time.perf_counter() - t0


def run_base(name: str, scheme_name: str, windows: int, cal: torch.Tensor) -> list[dict]:
    """One base method at one scheme, then LoRC on the same base: two rows."""
    import ptqlab
    from ptqlab.api import plan_quantization, run_quantization
    from ptqlab.models.weights import weight_matrix

    lm = ptqlab.load_model("smollm2-135m")
    plan = plan_quantization(lm.model, BASE_SCHEMES[scheme_name], BASE_METHODS[name], cal)
    # LoRC compensates against the FP weights the quantizer was given: with transforms, read at quantization
    calls = _record_inputs(plan.recipe.quantizer) if plan.recipe.layer_transforms else None
    fp = {} if calls is not None else {
        t.name: weight_matrix(lm.model.get_submodule(t.name)).detach().float().clone() for t in plan.targets
    }
    t0 = time.perf_counter()
    report = run_quantization(lm.model, plan, progress=True)
    quant_s = time.perf_counter() - t0
    if calls is not None:
        fp = _fp_references(lm.model, [r.module for r in report.records], calls)
    sizes = plan.size_metrics(lm.model)
    rows = [{"table": "base", "scheme": scheme_name, "method": name, "quant_s": quant_s,
             **_ppl(lm, windows), **sizes}]
    lorc_s = _lorc_on_same_base(lm.model, fp, plan)
    with_lorc = plan_quantization(lm.model, BASE_SCHEMES[scheme_name], [*BASE_METHODS[name], {"lorc": {}}], cal)
    rows.append({"table": "base", "scheme": scheme_name, "method": f"{name}+LoRC", "quant_s": quant_s + lorc_s,
                 **_ppl(lm, windows), **with_lorc.size_metrics(lm.model)})
    if report.runtime is not None:
        report.runtime.remove()
    return rows


def run_pair(scheme_name: str, label: str, recipe: list[dict[str, Any]], windows: int, cal: torch.Tensor) -> dict:
    """One method of a pairwise comparison."""
    import ptqlab
    from ptqlab.api import plan_quantization, run_quantization

    lm = ptqlab.load_model("smollm2-135m")
    scheme = PAIRS[scheme_name][0]
    plan = plan_quantization(lm.model, scheme, recipe, cal)
    t0 = time.perf_counter()
    report = run_quantization(lm.model, plan, progress=True)
    quant_s = time.perf_counter() - t0
    row = {"table": "pair", "scheme": scheme_name, "method": label, "quant_s": quant_s, **_ppl(lm, windows),
           **plan.size_metrics(lm.model)}
    if report.runtime is not None:
        report.runtime.remove()
    return row


def run_fp(windows: int) -> dict:
    """The unquantized model: the reference row."""
    import ptqlab

    lm = ptqlab.load_model("smollm2-135m")
    return {"table": "fp", "scheme": "FP", "method": "-", "quant_s": 0.0, **_ppl(lm, windows),
            "bits.weight": 16.0}  # counted at 16 bits, as the size accounting does


def fmt(rows: list[dict]) -> str:
    lines = ["| table | scheme | method | wikitext2 | ptb_new | c4local_new | mean | quantize s | bits/weight |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['table']} | {r['scheme']} | {r['method']} | {r['wikitext2']:.2f} | {r['ptb_new']:.2f} | "
                     f"{r['c4local_new']:.2f} | {r['mean']:.2f} | {r['quant_s']:.1f} | {r['bits.weight']:.3f} |")
    return "\n".join(lines)


def pivot(rows: list[dict]) -> str:
    """The ZeroQuant-V2-style table: mean perplexity of each base method without / with LoRC per scheme."""
    by = {(r["scheme"], r["method"]): r for r in rows if r["table"] == "base"}
    schemes = [s for s in BASE_SCHEMES if any(k[0] == s for k in by)]
    head = " | ".join(f"{s} | {s} +LoRC" for s in schemes)
    lines = [f"| method | {head} | quantize s ({', '.join(schemes)}) |", "|---" * (2 * len(schemes) + 2) + "|"]
    for name in BASE_METHODS:
        cells, times = [], []
        for s in schemes:
            base, lorc = by.get((s, name)), by.get((s, f"{name}+LoRC"))
            cells += [f"{base['mean']:.2f}" if base else "-", f"{lorc['mean']:.2f}" if lorc else "-"]
            times.append(f"{base['quant_s']:.0f}" if base else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {' / '.join(times)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma list of base:SCHEME / pair:SCHEME parts")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--out", default="methods.json")
    p.add_argument("--methods", help="comma list of base methods to run (default: all)")
    args = p.parse_args()
    unknown = set(args.methods.split(",") if args.methods else []) - set(BASE_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {', '.join(BASE_METHODS)}")
    torch.set_num_threads(2)

    import ptqlab
    from ptqlab.data.calibration import calibration_windows

    out, meta, saved = open_results(args.out, "python bench/bench_methods.py", windows=args.windows,
                                    samples=args.samples)
    rows: list[dict] = saved.get("rows", [])
    done = {(r["table"], r["scheme"], r["method"]) for r in rows}
    tok = ptqlab.load_model("smollm2-135m").tokenizer
    windows = args.windows
    cal = calibration_windows(tok, "c4local", args.samples, 512, 0)
    parts = (args.only.split(",") if args.only else
             ["fp"] + [f"base:{s}" for s in BASE_SCHEMES] + [f"pair:{s}" for s in PAIRS])
    for part in parts:
        kind, _, scheme = part.partition(":")
        if kind == "fp":
            if ("fp", "FP", "-") not in done:
                rows.insert(0, run_fp(windows))
                out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
                print(fmt(rows[:1]), flush=True)
        elif kind == "base":
            for name in args.methods.split(",") if args.methods else BASE_METHODS:
                if ("base", scheme, name) not in done:
                    rows += run_base(name, scheme, windows, cal)
                    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
                    print(fmt(rows[-2:]), flush=True)
        else:
            for label, recipe in PAIRS[scheme][1]:
                if ("pair", scheme, label) not in done:
                    rows.append(run_pair(scheme, label, recipe, windows, cal))
                    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
                    print(fmt(rows[-1:]), flush=True)
    table = fmt(rows) + "\n\n" + pivot(rows)
    print(table)
    (RESULTS / Path(args.out).with_suffix(".md").name).write_text(table + "\n")


if __name__ == "__main__":
    main()
