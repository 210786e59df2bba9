"""ptqlab's GPTQ against the IST-DASLab reference (and llm-compressor) on identical calibration tokens.

Protocol of the peers' table in REFERENCE.md: SmolLM2-135M fp32, calibration 128 x 512 from c4local documents
1100-1999 (seed 0), wikitext2 first 40 windows of 2048; asymmetric min-max grid with integer zero point,
damp 0.01, block 128, no act-order, true-sequential; W3 and W4 per channel, W4 g64. One token file feeds
all three tools, each in its own process (and venv for the peers):

- ptqlab: ``plan_quantization`` + ``run_quantization`` (recipe ``gptq``), perplexity through ptqlab's eval;
- the reference: ``bench/peers/gptqref_gptq.py`` in ``.venv-gptqref`` (``bench/peers/setup_gptqref.sh``) on a
  checkout of github.com/IST-DASLab/gptq given with ``--ref-dir`` (not part of this repository), on a
  Hugging Face copy of the same FP weights that transformers 4.47 reads (written here);
- llm-compressor 0.14: ``bench/peers/llmcompressor_gptq.py`` in ``.venv-llmcompressor``, which dequantizes
  the same GGUF file itself (as in bench_foundation).

Then, per scheme, ``--job diagnose`` compares ptqlab and the reference layer by layer (see :func:`job_diagnose`).

    python bench/bench_gptq_reference.py --ref-dir /tmp/gptq-ref --ref-commit SHA   # all, -> gptq-reference.json
    python bench/bench_gptq_reference.py --schemes w3_channel --no-llmc             # a subset
    python bench/bench_gptq_reference.py --reuse ...  # keep finished jobs of an earlier run (same tokens);
                                                      # their rows say "reused" and when they finished

Run it on an idle machine (``uptime``): the timings are wall times on 2 threads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = RESULTS / "tmp" / "gptq-reference"
REF_PY = ROOT / ".venv-gptqref" / "bin" / "python"
LLMC_PY = ROOT / ".venv-llmcompressor" / "bin" / "python"
SCHEMES = {
    "w3_channel": {"bits": 3, "granularity": "channel"},
    "w4_channel": {"bits": 4, "granularity": "channel"},
    "w4_g64": {"bits": 4, "granularity": "group", "group_size": 64},
}
GRID = {"symmetric": False, "zero_point": "int", "clipping": "minmax"}
GROUPS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gateup": "mlp.gate_proj", "down": "mlp.down_proj"}
LAYER0 = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj"]
GROUP_OF = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv", "self_attn.o_proj": "o",
            "mlp.gate_proj": "gateup", "mlp.up_proj": "gateup", "mlp.down_proj": "down"}


def vm_hwm_mb() -> float:
    """This process's own peak RSS (VmHWM; ru_maxrss may carry the forking parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- jobs (each in its own process) -----------------------------------------------------------------


def job_tokens(out: Path, samples: int, windows: int) -> dict:
    """The token file: bench_foundation's (ptqlab's c4local calibration windows and wikitext2 windows)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_foundation import prepare_tokens

    prepare_tokens(out, samples, 512, windows)
    return {"tokens": str(out), "sha256": sha256_file(out)}


def job_export(out_dir: Path) -> dict:
    """A Hugging Face directory transformers 4.47 reads, holding ptqlab's dequantized FP32 SmolLM2 weights.

    ptqlab's GGUF cache stores the tied embedding as ``lm_head.weight`` and a transformers-5 config
    (``rope_parameters``); transformers 4.47 wants ``model.embed_tokens.weight`` and ``rope_theta``, else it
    would silently use RoPE base 10000 and a random embedding.
    """
    from safetensors.torch import load_file, save_file

    from ptqlab.models.loading import model_directory

    src = model_directory("smollm2-135m")
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    if "model.embed_tokens.weight" not in state:
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    state.pop("lm_head.weight", None)  # tied: the embedding
    rope = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" not in cfg:
        cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"unexpected rope parameters {rope}")
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "float32"
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["transformers_version"] = "4.47.1"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"source": str(src), "source_sha256": sha256_file(src / "model.safetensors"), "dir": str(out_dir),
            "config": cfg}


def job_ptqlab(tokens: Path, scheme: str, diagnose: Path | None) -> dict:
    """ptqlab's GPTQ on the file's calibration windows (as bench_foundation's ptqlab job), + diagnostics dump."""
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(ROOT / "bench"))
    from benchlib import perplexity_on

    import ptqlab
    from ptqlab.api import plan_quantization, run_quantization
    from ptqlab.pipeline import driver

    torch.set_num_threads(2)
    data = load_file(str(tokens))
    lm = ptqlab.load_model("smollm2-135m")
    rss_load = vm_hwm_mb()
    out: dict = {"tool": "ptqlab", "scheme": scheme, "version": ptqlab.__version__ if hasattr(ptqlab, "__version__")
                 else "?"}
    diag: dict[str, torch.Tensor] = {}
    if scheme != "fp":
        calls: list[tuple[torch.Tensor | None, object]] = []
        orig = driver.quantize_decomposed

        def capture(quantizer, W, spec, H, keep):  # noqa: ANN001, ANN202 - the driver's call
            res = orig(quantizer, W, spec, H, keep)
            if len(calls) < len(LAYER0):  # layer 0 is quantized first
                calls.append((None if H is None else H.clone(), res))
            return res

        if diagnose is not None:
            driver.quantize_decomposed = capture
        plan = plan_quantization(lm.model, {"weight": {**SCHEMES[scheme], **GRID}}, [{"gptq": {}}],
                                 data["calibration"])
        t0 = time.perf_counter()
        report = run_quantization(lm.model, plan, progress=False)
        out["quant_seconds"] = time.perf_counter() - t0
        driver.quantize_decomposed = orig
        out["timings"] = report.timings
        out["records"] = [{"module": r.module, "rel_error": r.rel_error, "seconds": r.seconds, "tokens": r.tokens}
                          for r in report.records]
        out["batch_size"] = plan.batch_size
        if diagnose is not None:
            for rec, (H, res) in zip(report.records[: len(calls)], calls, strict=True):
                rel = rec.module.removeprefix("model.layers.0.")
                assert rel in GROUP_OF, rec.module
                diag.setdefault(f"H.{GROUP_OF[rel]}", H)
                diag[f"codes.{rel}"] = res.codes.to(torch.uint8).contiguous()
                diag[f"scale.{rel}"] = res.qparams.scale.float().contiguous()
                diag[f"zero.{rel}"] = res.qparams.zero.float().contiguous()
    out["peak_rss_quant_mb"] = vm_hwm_mb()
    out["peak_rss_load_mb"] = rss_load
    ppl, timings = perplexity_on(lm.model, lm.tokenizer, "wikitext2", data["eval"])
    out.update(ppl=ppl, eval_seconds=timings["eval.wikitext2_s"], peak_rss_mb=vm_hwm_mb(),
               n_calibration=int(data["calibration"].shape[0]), n_eval=int(data["eval"].shape[0]),
               threads=torch.get_num_threads(), model=lm.info.fingerprint)
    if diagnose is not None and scheme != "fp":
        for name, mod in lm.model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                diag[f"w.{name}"] = mod.weight.detach().contiguous()
        diagnose.parent.mkdir(parents=True, exist_ok=True)
        save_file(diag, str(diagnose), metadata={"hessian_scale": "2/n_tokens", "tool": "ptqlab"})
    return out


def _ref_groups_gptq(config):  # noqa: ANN001, ANN202
    """ptqlab's GPTQ with the reference's rule for dynamic group ranges (a diagnostic variant).

    The reference takes a group's min/max from ``W[:, j:j+g]`` -- the weight as updated up to the start of
    the current 128-column block -- while ptqlab takes it from the block's working copy, which already holds
    the error feedback of the block's earlier columns. The two agree for a group that starts a block (g64:
    groups 0, 2, 4, ...) and differ for one that starts inside a block (groups 1, 3, 5, ...).
    """
    from ptqlab.methods.gptq import GPTQ, _as_channel, _span
    from ptqlab.quant.core import choose_qparams

    class RefGroupsGPTQ(GPTQ):
        def _quantize_columns(self, W, Hinv, spec, static, perm):  # noqa: ANN001, ANN202
            self._stale = W  # updated only at block ends, like the reference's W
            return super()._quantize_columns(W, Hinv, spec, static, perm)

        def _column_params(self, W1, i, j, natural, spec, static, held):  # noqa: ANN001, ANN202
            if static is not None:
                return GPTQ._column_params(W1, i, j, natural, spec, static, held)
            gs = spec.group_size or 1
            span = _span(spec)
            if j % span == 0 or held is None:
                held = choose_qparams(self._stale[:, j : j + span], _as_channel(spec))
            return held, (j % span) // gs, j // gs

    return RefGroupsGPTQ(config)


def job_diagnose(tokens: Path, scheme: str, ours: Path, ref: Path, eval_windows: int) -> dict:
    """Compare ptqlab's and the reference's quantization of one scheme.

    1. Layer 0 Hessians (inputs of q/k/v, o, gate/up, down): relative Frobenius difference
       ||H_ptqlab - H_ref / seqlen||_F / ||H_ptqlab||_F (the reference scales by 2/n_windows, ptqlab by
       2/n_tokens; n_tokens = seqlen * n_windows).
    2. Layer 0 codes: how many of each linear's integer codes differ, and how many (row, group) ranges.
    3. Same Hessian: ptqlab's GPTQ run on the reference's own layer-0 Hessians and FP weights; codes against
       the reference's (an algorithm difference shows here, a Hessian difference cannot). For groups also
       with the reference's group-range rule (:func:`_ref_groups_gptq`).
    4. Every layer: share of quantized weights that differ between the tools, mean per-linear relative
       output error (on each tool's own calibration Hessians), and on the first ``eval_windows`` wikitext2
       windows the relative MSE of the layer's output hidden states against FP, cumulative (each model run
       end to end) and local (the quantized layer fed the FP model's input; error relative to the FP layer's
       residual update ||out - in||^2).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    import ptqlab
    from ptqlab.api import plan_quantization
    from ptqlab.methods.gptq import GPTQ, GPTQConfig
    from ptqlab.nn.capture import capture_inputs, layer_output

    torch.set_num_threads(2)
    data = load_file(str(tokens))
    seqlen = int(data["calibration"].shape[1])
    lm = ptqlab.load_model("smollm2-135m")
    model = lm.model
    layers = model.model.layers
    A, B = safe_open(str(ours), "pt"), safe_open(str(ref), "pt")
    out: dict = {"scheme": scheme, "eval_windows": eval_windows}

    # 1. Hessians of layer 0
    hess = {}
    for g in GROUPS:
        Hp, Hr = A.get_tensor(f"H.{g}").double(), B.get_tensor(f"H.{g}").double()
        Hr_scaled = Hr / seqlen
        hess[g] = {
            "rel_fro_diff": float((Hp - Hr_scaled).norm() / Hp.norm()),
            "rel_fro_diff_trace_normalised": float((Hp / Hp.trace() - Hr / Hr.trace()).norm()
                                                   / (Hp / Hp.trace()).norm()),
            "scale_ratio_ref_over_ptqlab": float(Hr.trace() / Hp.trace()),
            "width": int(Hp.shape[0]),
        }
    out["layer0_hessian"] = hess

    # 2. codes of layer 0, and 3. ptqlab's GPTQ on the reference's Hessians
    plan = plan_quantization(model, {"weight": {**SCHEMES[scheme], **GRID}}, [{"gptq": {}}], data["calibration"][:1])
    specs = {t.name: t.spec for t in plan.targets}
    cfg = GPTQConfig(damp=0.01, block_size=128)
    codes0 = {}
    torch.set_num_threads(1)  # as ptqlab's driver runs the solves
    for rel in LAYER0:
        name = f"model.layers.0.{rel}"
        cp, cr = A.get_tensor(f"codes.{rel}").long(), B.get_tensor(f"codes.{rel}").long()
        sp, sr = A.get_tensor(f"scale.{rel}"), B.get_tensor(f"scale.{rel}")
        zp, zr = A.get_tensor(f"zero.{rel}"), B.get_tensor(f"zero.{rel}")
        W = model.get_submodule(name).weight.detach().float()
        Hr = B.get_tensor(f"H.{GROUP_OF[rel]}")
        same_h = GPTQ(cfg).quantize(W, specs[name], Hr)
        entry = {
            "codes": int(cp.numel()),
            "codes_differ": int((cp != cr).sum()),
            "ranges": int(sp.numel()),
            "ranges_differ": int(((sp != sr) | (zp != zr)).sum()),
            "same_H_codes_differ": int((same_h.codes.long() != cr).sum()),
        }
        if SCHEMES[scheme]["granularity"] == "group":
            ref_rule = _ref_groups_gptq(cfg).quantize(W, specs[name], Hr)
            entry["same_H_ref_group_rule_codes_differ"] = int((ref_rule.codes.long() != cr).sum())
            gs = SCHEMES[scheme]["group_size"]
            first_half = (torch.arange(W.shape[1]) // gs) % (128 // gs) == 0  # groups that start a block
            entry["codes_differ_in_block_starting_groups"] = int((cp != cr)[:, first_half].sum())
            entry["same_H_codes_differ_in_block_starting_groups"] = int(
                (same_h.codes.long() != cr)[:, first_half].sum())
        codes0[rel] = entry
    torch.set_num_threads(2)
    out["layer0_codes"] = codes0

    # 4. every layer: weights that differ, per-linear errors, hidden-state errors on eval windows
    fp_weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head"}

    def load_layer(li: int, f) -> None:  # noqa: ANN001
        with torch.no_grad():
            for n in fp_weights:
                if n.startswith(f"model.layers.{li}."):
                    model.get_submodule(n).weight.copy_(f.get_tensor(f"w.{n}"))

    def restore_layer(li: int) -> None:
        with torch.no_grad():
            for n, w in fp_weights.items():
                if n.startswith(f"model.layers.{li}."):
                    model.get_submodule(n).weight.copy_(w)

    ev = data["eval"][:eval_windows]
    with torch.inference_mode():
        captured = capture_inputs(model, layers, [ev[i : i + 1] for i in range(ev.shape[0])])
    h_fp = list(captured.hidden)
    h_tool = {"ptqlab": list(h_fp), "reference": list(h_fp)}
    files = {"ptqlab": A, "reference": B}
    per_layer = []
    for li, layer in enumerate(layers):
        calls = captured.calls[li]
        row: dict = {"layer": li}
        # weights that differ (beyond float noise of one grid step)
        diff, total = 0, 0
        for n in fp_weights:
            if n.startswith(f"model.layers.{li}."):
                wa, wb = A.get_tensor(f"w.{n}"), B.get_tensor(f"w.{n}")
                step = (wa.amax(1, keepdim=True) - wa.amin(1, keepdim=True)).clamp_min(1e-12) / (
                    2 ** SCHEMES[scheme]["bits"] - 1)
                diff += int(((wa - wb).abs() > 1e-3 * step).sum())
                total += wa.numel()
        row["weights_differ"] = diff / total
        with torch.inference_mode():
            out_fp = [layer_output(layer(h, *c.args, **c.kwargs)) for h, c in zip(h_fp, calls, strict=True)]
            upd = sum(float((o - h).double().pow(2).sum()) for o, h in zip(out_fp, h_fp, strict=True))
            norm = sum(float(o.double().pow(2).sum()) for o in out_fp)
            for tool, f in files.items():
                load_layer(li, f)
                cum = [layer_output(layer(h, *c.args, **c.kwargs)) for h, c in zip(h_tool[tool], calls, strict=True)]
                loc = [layer_output(layer(h, *c.args, **c.kwargs)) for h, c in zip(h_fp, calls, strict=True)]
                restore_layer(li)
                row[f"{tool}_cum_rel_mse"] = sum(float((a - b).double().pow(2).sum())
                                                 for a, b in zip(cum, out_fp, strict=True)) / norm
                row[f"{tool}_local_rel_mse"] = sum(float((a - b).double().pow(2).sum())
                                                   for a, b in zip(loc, out_fp, strict=True)) / upd
                h_tool[tool] = cum
        h_fp = out_fp
        per_layer.append(row)
    out["per_layer"] = per_layer
    return out


# --- orchestration ----------------------------------------------------------------------------------


def run_job(key: str, cmd: list[str], reuse: bool) -> dict:
    path = WORK / f"{key}.json"
    if reuse and path.exists():
        print(f"# reusing {path.relative_to(ROOT)}", flush=True)
        return {**json.loads(path.read_text()), "reused": True}
    tmp = path.with_suffix(".partial.json")
    full = [*cmd, "--out", str(tmp)]
    print("$", " ".join(full), flush=True)
    t0 = time.perf_counter()
    subprocess.run(full, check=True, cwd=ROOT)
    res = json.loads(tmp.read_text())
    res["job_wall_seconds"] = time.perf_counter() - t0
    res["load_average_after"] = os.getloadavg()  # 1, 5, 15 min: the machine is shared
    res["finished_at"] = dt.datetime.now().isoformat(timespec="seconds")
    tmp.unlink()
    path.write_text(json.dumps(res, indent=2))
    return res


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict], fp: dict) -> str:
    tools = ["ptqlab", "gptq-reference", "llm-compressor"]
    schemes = [s for s in SCHEMES if any(r["scheme"] == s for r in rows)]
    by = {(r["tool"], r["scheme"]): r for r in rows}
    lines = ["| tool | " + " | ".join(f"{s}: s / peak MB / ppl" for s in schemes) + " | FP ppl |",
             "|---|" + "---|" * (len(schemes) + 1)]
    for t in tools:
        if not any((t, s) in by for s in schemes):
            continue
        cells = []
        for s in schemes:
            r = by.get((t, s))
            cells.append("-" if r is None else f"{fmt(r.get('quant_seconds'), '.0f')} / "
                         f"{fmt(r.get('peak_rss_quant_mb'), '.0f')} / {r['ppl']:.2f}")
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {fmt(fp.get(t), '.3f')} |")
    return "\n".join(lines)


def diag_summary(d: dict) -> str:
    lines = [f"## {d['scheme']}", "layer-0 Hessian rel. Frobenius difference (ptqlab vs reference / seqlen): "
             + ", ".join(f"{g} {v['rel_fro_diff']:.2e}" for g, v in d["layer0_hessian"].items())]
    lines.append("| layer-0 linear | codes differ | ranges differ | same-H codes differ | same-H, ref group rule |")
    lines.append("|---|---|---|---|---|")
    for rel, e in d["layer0_codes"].items():
        lines.append(f"| {rel} | {e['codes_differ']} / {e['codes']} | {e['ranges_differ']} / {e['ranges']} | "
                     f"{e['same_H_codes_differ']} | {e.get('same_H_ref_group_rule_codes_differ', '-')} |")
    lines.append("| layer | weights differ | cum rel MSE ptqlab / ref | local rel MSE ptqlab / ref |")
    lines.append("|---|---|---|---|")
    for r in d["per_layer"]:
        if r["layer"] in (0, 1, 2, 5, 10, 15, 20, 25, 29):
            lines.append(f"| {r['layer']} | {r['weights_differ']:.4f} | {r['ptqlab_cum_rel_mse']:.3e} / "
                         f"{r['reference_cum_rel_mse']:.3e} | {r['ptqlab_local_rel_mse']:.3e} / "
                         f"{r['reference_local_rel_mse']:.3e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=["tokens", "export", "ptqlab", "diagnose"])
    p.add_argument("--scheme", default="w3_channel")
    p.add_argument("--tokens", type=Path, default=WORK / "tokens.safetensors")
    p.add_argument("--out", type=Path)
    p.add_argument("--diagnose", type=Path, help="--job ptqlab: write the layer-0 Hessians/codes and weights here")
    p.add_argument("--export-dir", type=Path, help="--job export: the Hugging Face directory to write")
    p.add_argument("--ours", type=Path)
    p.add_argument("--ref", type=Path)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--diag-windows", type=int, default=4, help="eval windows for the per-layer hidden-state errors")
    p.add_argument("--ref-dir", type=Path, default=Path("/tmp/gptq-ref"))
    p.add_argument("--ref-commit", default=None, help="commit of the reference checkout (recorded)")
    p.add_argument("--no-llmc", action="store_true", help="without llm-compressor")
    p.add_argument("--reuse", action="store_true", help="reuse finished jobs of an earlier run on the same tokens")
    p.add_argument("--result", type=Path, default=RESULTS / "gptq-reference.json")
    args = p.parse_args()

    if args.job:
        if args.job == "tokens":
            res = job_tokens(args.tokens, args.samples, args.windows)
        elif args.job == "export":
            res = job_export(args.export_dir)
        elif args.job == "ptqlab":
            res = job_ptqlab(args.tokens, args.scheme, args.diagnose)
        else:
            res = job_diagnose(args.tokens, args.scheme, args.ours, args.ref, args.diag_windows)
        args.out.write_text(json.dumps(res, indent=2))
        return

    if not (args.ref_dir / "gptq.py").is_file():
        raise SystemExit(f"no reference checkout in {args.ref_dir}: git clone https://github.com/IST-DASLab/gptq "
                         f"{args.ref_dir} (or extract an archive of it there)")
    ref_commit = args.ref_commit
    if ref_commit is None and (args.ref_dir / ".git").exists():
        ref_commit = subprocess.run(["git", "-C", str(args.ref_dir), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
    if not REF_PY.exists():
        subprocess.run(["bash", str(ROOT / "bench/peers/setup_gptqref.sh")], check=True, cwd=ROOT)
    if not args.no_llmc and not LLMC_PY.exists():
        subprocess.run(["bash", str(ROOT / "bench/peers/setup_llmcompressor.sh")], check=True, cwd=ROOT)
    WORK.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__))]

    if not (args.reuse and args.tokens.exists()):
        run_job("tokens", [*me, "--job", "tokens", "--tokens", str(args.tokens), "--samples", str(args.samples),
                           "--windows", str(args.windows)], reuse=False)
    tok_sha = sha256_file(args.tokens)[:12]
    hf_dir = WORK / "smollm2-135m-hf"
    export = run_job("export", [*me, "--job", "export", "--export-dir", str(hf_dir)],
                     reuse=args.reuse and (hf_dir / "model.safetensors").exists())
    ref_base = [str(REF_PY), str(ROOT / "bench/peers/gptqref_gptq.py"), "--ref-dir", str(args.ref_dir),
                "--model-dir", str(hf_dir), "--tokens", str(args.tokens)]
    if ref_commit:
        ref_base += ["--ref-commit", ref_commit]

    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}",
        "command": "python bench/bench_gptq_reference.py " + " ".join(sys.argv[1:]),
        "tokens_sha256": sha256_file(args.tokens),
        "samples": args.samples, "calibration_seqlen": 512, "windows": args.windows, "eval_seqlen": 2048,
        "reference": {"repo": "github.com/IST-DASLab/gptq", "commit": ref_commit},
        "model_export": {k: export[k] for k in ("source_sha256",)},
        "protocol": "asymmetric min-max grid, integer zero point, damp 0.01, block 128, no act-order, "
                    "true-sequential; peak MB = VmHWM after load + quantization",
    }
    rows: list[dict] = []
    diags: dict[str, dict] = {}
    fp: dict[str, float] = {}

    def save(complete: bool) -> None:
        """Write the results file (after every scheme too, with complete=false, so a stopped run leaves its part)."""
        slim = [{k: v for k, v in r.items() if k not in ("records", "window_nlls", "timings")} for r in rows]
        per_linear = {f"{r['tool']}:{r['scheme']}": r.get("records") for r in rows if r.get("records")}
        result = {"meta": {**meta, "complete": complete}, "fp_ppl": fp, "rows": slim, "diagnostics": diags,
                  "per_linear": per_linear}
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(result, indent=2))

    fp["ptqlab"] = run_job(f"ptqlab-fp-{tok_sha}", [*me, "--job", "ptqlab", "--scheme", "fp", "--tokens",
                                                   str(args.tokens)], args.reuse)["ppl"]
    fp["gptq-reference"] = run_job(f"reference-fp-{tok_sha}", [*ref_base, "--scheme", "fp"], args.reuse)["ppl"]
    schemes = [s for s in args.schemes.split(",") if s]
    for s in schemes:  # ptqlab and the reference first (the comparison), llm-compressor after
        ours_dump, ref_dump = WORK / f"diag-ptqlab-{s}.safetensors", WORK / f"diag-reference-{s}.safetensors"
        ours = run_job(f"ptqlab-{s}-{tok_sha}", [*me, "--job", "ptqlab", "--scheme", s, "--tokens", str(args.tokens),
                                                 "--diagnose", str(ours_dump)], args.reuse and ours_dump.exists())
        ref = run_job(f"reference-{s}-{tok_sha}", [*ref_base, "--scheme", s, "--diagnose", str(ref_dump)],
                      args.reuse and ref_dump.exists())
        rows += [ours, ref]
        diags[s] = run_job(f"diagnose-{s}-{tok_sha}", [*me, "--job", "diagnose", "--scheme", s, "--tokens",
                                                        str(args.tokens), "--ours", str(ours_dump), "--ref",
                                                        str(ref_dump), "--diag-windows", str(args.diag_windows)],
                           args.reuse)
        print(table(rows, fp), flush=True)
        print(diag_summary(diags[s]), flush=True)
        save(complete=False)
    for s in schemes if not args.no_llmc else []:
        rows.append(run_job(f"llmc-{s}-{tok_sha}", [str(LLMC_PY), str(ROOT / "bench/peers/llmcompressor_gptq.py"),
                                                    "--tokens", str(args.tokens), "--scheme", s], args.reuse))
        save(complete=False)
    save(complete=True)
    print(table(rows, fp))
    for d in diags.values():
        print(diag_summary(d))
    print(f"wrote {args.result.relative_to(ROOT) if args.result.is_relative_to(ROOT) else args.result}")


if __name__ == "__main__":
    main()
