"""GPTQ against RTN on llama.cpp's block grids (GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q4_K) and on INT g32 / g64.

Question (an issue): GPTQ exported as GGUF Q4_0 loses to RTN in perplexity on SmolLM2-135M. Is GPTQ's
block-grid path defective, or is RTN hard to beat there? Three parts, every row RTN and GPTQ (damp 0.01,
no act-order) on the same model, calibration from c4local (seed 0):

- ``stories``: the tiny real stories260K Llama (FP32 trained weights, no block structure; widths 64 and 172,
  so ``down_proj`` (172 inputs) stays FP and Q4_K (256-wide super-blocks) does not apply). Also
  ``stories-q41``: the same model with its quantized linears first replaced by their Q4_1 dequantization,
  a block-structured source like SmolLM2's. Calibration 64 x 256; wikitext2 and c4local_new perplexity
  (32 windows of 256); KL(FP || Q) on wikitext2 (16 windows of 256).
- ``smollm2``: SmolLM2-135M (its weights are dequantized from a Q4_1 GGUF). Calibration ``--samples`` x 512
  (32); wikitext2 perplexity (first ``--windows`` windows of 2048, 4) and KL on wikitext2 (8 windows of 512);
  ``smollm2-w40``: Q4_0 only, perplexity on the foundation's 40 windows of 2048 with the paired per-window
  NLL difference (no FP reference: about ten minutes per model here).
- ``layer``: GPTQ's objective per linear of one SmolLM2 decoder layer (``--layer``, 15): FP-model Hessians from
  the calibration tokens and from the wikitext2 evaluation windows; ``tr(E H E^T) / tr(W H W^T)`` of RTN's and
  of GPTQ's error (GPTQ solved with the calibration Hessian), each format (Q4_K on ``down_proj`` only, the one
  linear with whole super-blocks), plus GPTQ with ``static_groups`` (block parameters from the unmodified
  weight, RTN's, fixed before the column loop).

In every GPTQ run of ``stories`` and ``smollm2`` each linear is also rounded to nearest on the very weight and
Hessian GPTQ gets (the sequential pass's inputs), so ``layer err`` compares the two on GPTQ's own objective:
the mean over linears of ``sqrt(tr(E H E^T) / tr(W H W^T))`` and the number of linears where GPTQ's is larger.

    python bench/bench_gguf_gptq.py                       # everything, table + bench/results/gguf-gptq.json
    python bench/bench_gguf_gptq.py --parts stories       # seconds
    python bench/bench_gguf_gptq.py --table               # print the table of the saved results

A finished row is saved at once; a killed run resumes with the rows it has (same protocol).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import torch
from benchlib import open_results

G32 = {"granularity": "group", "group_size": 32}
SCHEMES: dict[str, dict[str, Any]] = {
    "INT4 asym g32 float zero": {"bits": 4, "symmetric": False, "zero_point": "float", **G32},
    "INT4 asym g32": {"bits": 4, "symmetric": False, **G32},
    "INT4 sym g32": {"bits": 4, "symmetric": True, **G32},
    "GGUF Q4_0": {"format": "gguf_q4_0"},
    "GGUF Q4_1": {"format": "gguf_q4_1"},
    "GGUF Q5_0": {"format": "gguf_q5_0"},
    "GGUF Q5_1": {"format": "gguf_q5_1"},
}
SMOLLM2_SCHEMES = ["INT4 asym g32 float zero", "INT4 asym g32", "INT4 sym g32", "GGUF Q4_0", "GGUF Q4_1"]
LAYER_FORMATS = ["INT4 asym g32 float zero", "INT4 asym g32", "INT4 sym g32", "GGUF Q4_0", "GGUF Q4_1", "GGUF Q5_0",
                 "GGUF Q4_K"]
STORIES = {"calibration": {"dataset": "c4local", "samples": 64, "seqlen": 256, "seed": 0},
           "evaluate": {"perplexity": ["wikitext2", "c4local_new"], "seqlen": 256, "max_windows": 32,
                        "divergence": {"corpus": "wikitext2", "seqlen": 256, "windows": 16}}}
PARTS = ("stories", "stories-q41", "layer", "smollm2", "smollm2-w40")


@contextlib.contextmanager
def objective_probe(errors: list[tuple[float, float]]) -> Iterator[None]:
    """While open, each GPTQ quantization also rounds to nearest; records (RTN, GPTQ) relative output errors."""
    from ptqlab.methods import gptq
    from ptqlab.methods.base import relative_output_error
    from ptqlab.methods.rtn import RTN

    original = gptq.GPTQ.quantize

    def probed(self: Any, W: torch.Tensor, spec: Any, H: torch.Tensor | None = None) -> Any:
        res = original(self, W, spec, H)
        if H is not None:
            rtn = RTN().quantize(W, spec).weight
            errors.append((relative_output_error(W.float(), rtn, H), relative_output_error(W.float(), res.weight, H)))
        return res

    gptq.GPTQ.quantize = probed  # type: ignore[method-assign]
    try:
        yield
    finally:
        gptq.GPTQ.quantize = original  # type: ignore[method-assign]


def _worse(gptq: float, rtn: float) -> bool:
    """GPTQ's error above RTN's beyond float noise (both are ~1e-15 where the grid holds the weight)."""
    return gptq > rtn * (1 + 1e-6) + 1e-9


def _metrics(result: Any) -> dict[str, float]:
    return {m.name: float(m.value) for m in result.metrics}


def model_rows(part: str, model_name: str, schemes: list[str], calibration: dict[str, Any], evaluate: dict[str, Any],
               overrides: list[dict[str, Any]], done: set[tuple[str, str, str]], save: Any,
               q41_source: bool = False, with_fp: bool = True) -> None:
    """RTN and GPTQ rows of one model: metrics, per-window NLLs and the per-linear objective comparison.

    ``with_fp=False`` measures no FP reference (no FP row, no divergence): the long perplexity-only part.
    """
    import ptqlab
    from ptqlab.quant import QuantSpec
    from ptqlab.quant.core import fake_quantize

    todo = [(s, m) for s in schemes for m in ("RTN", "GPTQ") if (part, s, m) not in done]
    if not todo and ((part, "FP", "FP") in done or not with_fp):
        return
    lm = ptqlab.load_model(model_name)
    if q41_source:
        with torch.no_grad():
            for name, module in lm.model.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in name and "down_proj" not in name:
                    module.weight.copy_(fake_quantize(module.weight, QuantSpec(format="gguf_q4_1")))
    fp = ptqlab.reference(lm.model, lm.tokenizer, evaluate, progress=False) if with_fp else None
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    if with_fp and (part, "FP", "FP") not in done:
        save({"part": part, "scheme": "FP", "method": "FP",
              **_metrics(ptqlab.evaluate(lm.model, lm.tokenizer, evaluate, reference=fp, progress=False))})
    for scheme, method in todo:
        lm.model.load_state_dict(state)
        errors: list[tuple[float, float]] = []
        t0 = time.perf_counter()
        with objective_probe(errors):
            ptqlab.quantize(lm.model, {"weight": SCHEMES[scheme], "overrides": overrides}, [{method.lower(): {}}],
                            calibration, tokenizer=lm.tokenizer, progress=False)
        seconds = time.perf_counter() - t0
        result = ptqlab.evaluate(lm.model, lm.tokenizer, evaluate, reference=fp, progress=False)
        row: dict[str, Any] = {"part": part, "scheme": scheme, "method": method, "quantize_s": round(seconds, 1),
                               **_metrics(result),
                               "window_nll": {k: list(w.nll) for k, w in result.windows.items()}}
        if errors:
            row["layer_err_rtn"] = sum(r for r, _ in errors) / len(errors)
            row["layer_err_gptq"] = sum(g for _, g in errors) / len(errors)
            row["gptq_worse_linears"] = sum(_worse(g, r) for r, g in errors)
            row["linears"] = len(errors)
        save(row)


class _StopError(Exception):
    """Raised after the studied layer: the rest of the forward pass is not needed."""


def layer_rows(layer: int, samples: int, windows: int, done: set[tuple[str, str, str]], save: Any) -> None:
    """GPTQ's objective on one SmolLM2 layer with FP-model Hessians of calibration and evaluation tokens."""
    import ptqlab
    from ptqlab.data.calibration import calibration_windows
    from ptqlab.eval import plan_evaluation
    from ptqlab.methods.gptq import GPTQ, GPTQConfig
    from ptqlab.methods.rtn import RTN
    from ptqlab.quant import QuantSpec
    from ptqlab.schema import Evaluate

    if all(("layer", f, "objective") in done for f in LAYER_FORMATS):
        return
    lm = ptqlab.load_model("smollm2-135m")
    model = lm.model.eval()
    cal = calibration_windows(lm.tokenizer, "c4local", samples, 512, 0)
    plan = plan_evaluation(Evaluate(perplexity=["wikitext2"], seqlen=2048, max_windows=windows, sample=None,
                                    sensitivity=None), lm.tokenizer)
    sites = {"self_attn.q_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "self_attn.o_proj": ["self_attn.o_proj"], "mlp.gate_proj": ["mlp.gate_proj", "mlp.up_proj"],
             "mlp.down_proj": ["mlp.down_proj"]}
    block = model.model.layers[layer]
    sums: dict[tuple[str, str], list[Any]] = {}
    current = {"set": ""}

    def hook(site: str) -> Any:
        def add(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc = sums.setdefault((site, current["set"]), [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), 0])
            acc[0] += x.T @ x
            acc[1] += x.shape[0]
        return add

    handles = [block.get_submodule(s).register_forward_pre_hook(hook(s)) for s in sites]

    def halt(*_: Any) -> None:
        raise _StopError

    handles.append(block.register_forward_hook(halt))  # nothing after the layer is needed
    with torch.inference_mode():
        for name, ids in (("cal", cal), ("eval", plan.windows["wikitext2"])):
            current["set"] = name
            for i in range(0, ids.shape[0], 4):
                with contextlib.suppress(_StopError):
                    model(ids[i : i + 4])
    for h in handles:
        h.remove()

    def rel(D: torch.Tensor, W: torch.Tensor, S: torch.Tensor) -> float:
        return float(torch.einsum("ij,jk,ik->", D, S, D) / torch.einsum("ij,jk,ik->", W, S, W))

    for fmt in LAYER_FORMATS:
        if ("layer", fmt, "objective") in done:
            continue
        spec = QuantSpec(**SCHEMES[fmt]) if fmt != "GGUF Q4_K" else QuantSpec(format="gguf_q4_k")
        acc: dict[str, float] = {}
        per_linear: dict[str, list[float]] = {}
        for site, linears in sites.items():
            for rel_name in linears:
                if fmt == "GGUF Q4_K" and rel_name != "mlp.down_proj":
                    continue  # 576 inputs: not whole super-blocks of 256
                S_cal, n_cal = sums[(site, "cal")]
                S_eval, n_eval = sums[(site, "eval")]
                H = (2.0 / n_cal * S_cal).float()
                W = block.get_submodule(rel_name).weight.detach().float()
                quantized = {"RTN": RTN().quantize(W, spec).weight,
                             "GPTQ": GPTQ().quantize(W, spec, H).weight,
                             "GPTQ static groups": GPTQ(GPTQConfig(static_groups=True)).quantize(W, spec, H).weight}
                Wd = W.double()
                per_linear[rel_name] = []
                for method, Q in quantized.items():
                    D = Q.double() - Wd
                    for hname, S in (("cal", S_cal / n_cal), ("eval", S_eval / n_eval)):
                        e = rel(D, Wd, S)
                        acc[f"{method}|{hname}"] = acc.get(f"{method}|{hname}", 0.0) + e
                        per_linear[rel_name].append(e)
        n = len(per_linear)
        save({"part": "layer", "scheme": fmt, "method": "objective", "layer": layer, "linears": n,
              **{k: v / n for k, v in acc.items()},
              "gptq_worse_linears_cal": sum(_worse(v[2], v[0]) for v in per_linear.values()),
              "gptq_worse_linears_eval": sum(_worse(v[3], v[1]) for v in per_linear.values())})


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown tables of the saved rows."""
    out = []
    for part in ("stories", "stories-q41", "smollm2", "smollm2-w40"):
        sel = [r for r in rows if r["part"] == part]
        if not sel:
            continue
        ppl = sorted({k for r in sel for k in r if k.startswith("ppl.")})
        kl = sorted(k for k in {k for r in sel for k in r} if k.startswith("kl."))
        fp = next((r for r in sel if r["scheme"] == "FP"), {})
        out.append(f"\n{part} (FP: " + (", ".join(f"{k} {fp[k]:.2f}" for k in ppl if k in fp) or "not measured")
                   + ")\n")
        windows = any("window_nll" in r for r in sel)
        out.append("| scheme | " + " | ".join(f"{k} RTN / GPTQ" for k in ppl + kl) +
                   (" | GPTQ's window NLL - RTN's: mean (windows GPTQ worse)" if windows else "") +
                   " | layer err RTN / GPTQ (GPTQ worse) |")
        out.append("|---" * (2 + windows + len(ppl) + len(kl)) + "|")
        for scheme in dict.fromkeys(r["scheme"] for r in sel if r["scheme"] != "FP"):
            pair = {r["method"]: r for r in sel if r["scheme"] == scheme}
            if set(pair) != {"RTN", "GPTQ"}:
                continue
            cells = []
            for k in ppl + kl:
                a, b = pair["RTN"].get(k), pair["GPTQ"].get(k)
                digits = 3 if k.startswith("kl.") else 2
                ra, rb = f"{a:.{digits}f}", f"{b:.{digits}f}"
                same = ra == rb  # equal as printed: float noise of a lossless grid is no winner
                cells.append(f"{ra} / {rb}" if same else f"{ra} / **{rb}**" if b < a else f"**{ra}** / {rb}")
            g = pair["GPTQ"]
            paired = []
            for k, nll in g.get("window_nll", {}).items():
                d = [b - a for a, b in zip(pair["RTN"]["window_nll"][k], nll, strict=True)]
                paired.append(f"{sum(d) / len(d):+.4f} ({sum(x > 0 for x in d)}/{len(d)})")
            if windows:
                cells.append("; ".join(paired))
            err = "" if "linears" not in g else f"{g['layer_err_rtn']:.4f} / {g['layer_err_gptq']:.4f} " + (
                f"({g['gptq_worse_linears']}/{g['linears']})" if g["layer_err_rtn"] > 1e-6 else "(lossless)")
            out.append(f"| {scheme} | " + " | ".join(cells) + f" | {err} |")
    sel = [r for r in rows if r["part"] == "layer"]
    if sel:
        out.append(f"\nlayer {sel[0]['layer']} of SmolLM2: mean tr(E H E^T) / tr(W H W^T) over its linears "
                   "(GPTQ solved with H_cal)\n")
        out.append("| format | linears | RTN H_cal / H_eval | GPTQ H_cal / H_eval | GPTQ static groups H_cal / H_eval "
                   "| GPTQ worse than RTN (cal / eval) |")
        out.append("|---|---|---|---|---|---|")
        for r in sel:
            cells = [f"{r[f'{m}|cal']:.5f} / {r[f'{m}|eval']:.5f}" for m in ("RTN", "GPTQ", "GPTQ static groups")]
            worse = (f"{r['gptq_worse_linears_cal']} / {r['gptq_worse_linears_eval']}" if r["RTN|cal"] > 1e-9
                     else "- (lossless)")
            out.append(f"| {r['scheme']} | {r['linears']} | " + " | ".join(cells) + f" | {worse} |")
    return f"{meta['date']}, {meta['machine']}\n" + "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, among {', '.join(PARTS)}")
    p.add_argument("--samples", type=int, default=32, help="SmolLM2 calibration windows of 512")
    p.add_argument("--windows", type=int, default=4, help="SmolLM2 wikitext2 windows of 2048")
    p.add_argument("--layer", type=int, default=15, help="SmolLM2 layer of the objective part")
    p.add_argument("--out", default="gguf-gptq.json")
    p.add_argument("--table", action="store_true", help="only print the table of the saved results")
    args = p.parse_args()
    out, meta, saved = open_results(args.out, "python bench/bench_gguf_gptq.py", samples=args.samples,
                                    windows=args.windows, layer=args.layer, stories=STORIES)
    meta["model"] = "stories260k fp32; smollm2-135m fp32 (dequantized from its Q4_1 GGUF)"
    rows: list[dict[str, Any]] = saved.get("rows", [])
    if not args.table:
        torch.manual_seed(0)
        done = {(r["part"], r["scheme"], r["method"]) for r in rows}

        def save(row: dict[str, Any]) -> None:
            rows.append(row)
            done.add((row["part"], row["scheme"], row["method"]))
            out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
            print(json.dumps(row), flush=True)

        parts = args.parts.split(",")
        fp_down = [{"match": r".*down_proj", "weight": None}]
        if "stories" in parts:
            model_rows("stories", "stories260k", list(SCHEMES), STORIES["calibration"], STORIES["evaluate"],
                       fp_down, done, save)
        if "stories-q41" in parts:
            model_rows("stories-q41", "stories260k", ["INT4 asym g32", "INT4 sym g32", "GGUF Q4_0", "GGUF Q4_1"],
                       STORIES["calibration"], STORIES["evaluate"], fp_down, done, save, q41_source=True)
        if "layer" in parts:
            layer_rows(args.layer, args.samples, args.windows, done, save)
        if "smollm2" in parts:
            model_rows("smollm2", "smollm2-135m", SMOLLM2_SCHEMES,
                       {"dataset": "c4local", "samples": args.samples, "seqlen": 512, "seed": 0},
                       {"perplexity": ["wikitext2"], "seqlen": 2048, "max_windows": args.windows,
                        "divergence": {"corpus": "wikitext2", "seqlen": 512, "windows": 8}}, [], done, save)
        if "smollm2-w40" in parts:  # the foundation's 40 windows of 2048, perplexity only (minutes per model)
            model_rows("smollm2-w40", "smollm2-135m", ["GGUF Q4_0"],
                       {"dataset": "c4local", "samples": args.samples, "seqlen": 512, "seed": 0},
                       {"perplexity": ["wikitext2"], "seqlen": 2048, "max_windows": 40}, [], done, save,
                       with_fp=False)
    print(table(rows, meta))


if __name__ == "__main__":
    main()
