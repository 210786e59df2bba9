"""Peer runner: the IST-DASLab GPTQ reference (github.com/IST-DASLab/gptq) on SmolLM2-135M, on CPU.

Standalone (does NOT import ptqlab, and vendors none of the reference's code); run it with the venv made
by setup_gptqref.sh, on a checkout of the reference (not part of this repository):

    git --git-dir=<mirror of IST-DASLab/gptq> archive HEAD | tar -x -C /tmp/gptq-ref
    .venv-gptqref/bin/python bench/peers/gptqref_gptq.py --ref-dir /tmp/gptq-ref \\
        --model-dir SMOLLM2_HF_DIR --tokens tokens.safetensors --scheme w3_channel --out result.json

--tokens: safetensors file with int64 tensors `calibration` (n, seqlen) and `eval` (m, seqlen_eval).
--scheme: w4_channel | w3_channel | w4_g64 | fp (fp: no quantization, only the reference's evaluation).
--model-dir: a Hugging Face directory of SmolLM2-135M in float32 that transformers 4.47 reads
             (config.json with `rope_theta`, model.safetensors with `model.embed_tokens.weight`);
             bench/bench_gptq_reference.py writes one from ptqlab's dequantized GGUF.

What runs is the reference's own code: `llama.get_llama` (LlamaForCausalLM.from_pretrained),
`llama.llama_sequential` (Catcher for the layer-0 inputs, then per decoder layer and per true-sequential
group [k,v,q] -> [o] -> [up,gate] -> [down]: a forward over all calibration windows with `GPTQ.add_batch`
hooks, `GPTQ.fasterquant` per linear; then a forward through the quantized layer for the next layer's
inputs) and `llama.llama_eval` (layer-by-layer perplexity, GPTQ protocol). Settings: `--wbits` 3/4,
asymmetric (`sym=False`: min-max grid including 0, integer zero point), `--percdamp` 0.01, block 128,
`--groupsize` -1 or 64, no act-order, no static groups, `--true-sequential`. The calibration windows are
the file's, in file order, batch 1 (the reference's `dataloader` is a list of `(ids, None)` pairs; its own
loaders are not used).

CPU shim (monkeypatching only; the reference's files are not edited): the functions take `dev`, which is
passed as torch.device("cpu"); the only CUDA call that fails on a CPU-only torch is
`torch.cuda.synchronize()` at the end of `fasterquant` (a timing barrier), replaced by a no-op.
`torch.cuda.empty_cache()` is already a no-op without CUDA. The reference reads its options from a module
global `args` (set by its __main__): the runner sets `llama.args` to the values above. Its prints go to
stderr; the perplexity is read from the last line `llama_eval` prints (it returns nothing).

Measured: quant_seconds = wall time of `llama_sequential` (layer-0 capture + all layers; model load and
eval excluded); peak_rss_quant_mb = process peak RSS (VmHWM) after load + quantization; peak_rss_mb =
at the end (eval included: `llama_eval` holds all eval windows' hidden states twice and full logits);
ppl from `llama_eval`; per linear, the relative output error on the calibration inputs
sqrt(tr(D H D^T) / tr(W H W^T)), D = Q - W, H the accumulated Hessian before damping (the same measure as
ptqlab's layer records; computing it is timed and reported as diag_overhead_seconds, inside quant_seconds).

--diagnose FILE: also write a safetensors dump: `H.<group>` the layer-0 Hessians as the reference
accumulated them (groups qkv, o, gateup, down; its scaling is 2/n_windows * sum x x^T, i.e. seqlen times
ptqlab's 2/n_tokens), `codes.<linear>` / `scale.<linear>` / `zero.<linear>` of layer 0 (integer codes
(out, in), params (out, groups)), and `w.<name>` every quantized decoder linear weight.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata as md  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

SCHEMES = {
    # name: (wbits, groupsize)
    "w4_channel": (4, -1),
    "w3_channel": (3, -1),
    "w4_g64": (4, 64),
    "fp": (16, -1),
}
REF_FILES = ("llama.py", "gptq.py", "quant.py", "modelutils.py")
GROUP_OF = {  # layer-0 linear -> true-sequential group name (the input its Hessian comes from)
    "self_attn.q_proj": "qkv",
    "self_attn.k_proj": "qkv",
    "self_attn.v_proj": "qkv",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gateup",
    "mlp.up_proj": "gateup",
    "mlp.down_proj": "down",
}


def log(msg: str) -> None:
    print(f"[gptqref_gptq] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    # VmHWM: this process's own peak (KiB).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Tee(io.TextIOBase):
    """Write to stderr and keep a copy (the reference reports through print)."""

    def __init__(self) -> None:
        self.buf = io.StringIO()

    def write(self, s: str) -> int:
        sys.stderr.write(s)
        self.buf.write(s)
        return len(s)

    def flush(self) -> None:
        sys.stderr.flush()


def import_reference(ref_dir: str):
    missing = [f for f in REF_FILES if not os.path.isfile(os.path.join(ref_dir, f))]
    if missing:
        raise SystemExit(f"--ref-dir {ref_dir} lacks {missing}: extract the IST-DASLab/gptq repository there")
    # CPU shim: fasterquant ends with torch.cuda.synchronize(), which raises on a CPU-only torch.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    sys.path.insert(0, ref_dir)
    with contextlib.redirect_stdout(sys.stderr):  # quant.py prints 'CUDA extension not installed.'
        import gptq as ref_gptq  # noqa: PLC0415
        import llama as ref_llama  # noqa: PLC0415
        import quant as ref_quant  # noqa: PLC0415
    return ref_llama, ref_gptq, ref_quant


def check_loaded(model, model_dir: str) -> dict:
    """The model from_pretrained built holds the file's weights (spot checks) and ties lm_head."""
    from safetensors import safe_open

    out = {"lm_head_tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()}
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        checks = {}
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
            t = f.get_slice(name)[:8]
            checks[name] = bool(torch.equal(t, model.get_parameter(name).data[:8]))
    out["spot_checks"] = checks
    out["file_keys"] = len(keys)
    out["rope_theta"] = getattr(model.config, "rope_theta", None)
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    out["ok"] = out["lm_head_tied"] and all(checks.values()) and out["rope_theta"] == 100000.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--ref-dir", default="/tmp/gptq-ref")
    ap.add_argument("--ref-commit", default=None, help="recorded in the JSON (the checkout has no git metadata)")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--diagnose", default=None, help="write the layer-0 Hessians/codes and all weights here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ref_llama, ref_gptq, ref_quant = import_reference(args.ref_dir)
    dev = torch.device("cpu")

    from safetensors.torch import load_file, save_file

    tokens = load_file(args.tokens)
    calib = tokens["calibration"].to(torch.int64)
    ev = tokens["eval"].to(torch.int64)
    n_cal, cal_len = calib.shape
    n_ev, ev_len = ev.shape
    log(f"calibration {tuple(calib.shape)}, eval {tuple(ev.shape)}, scheme {args.scheme}")

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        model = ref_llama.get_llama(args.model_dir)
    model.eval()
    load_seconds = time.perf_counter() - t0
    load_check = check_loaded(model, args.model_dir)
    rss_load = peak_rss_mb()
    log(f"model loaded in {load_seconds:.1f}s, peak RSS {rss_load:.0f} MB, check {load_check}")

    wbits, groupsize = SCHEMES[args.scheme]
    ref_llama.args = SimpleNamespace(
        nsamples=n_cal, wbits=wbits, groupsize=groupsize, sym=False, percdamp=args.damp, act_order=False,
        static_groups=False, true_sequential=True, nearest=False,
    )

    names = {id(m): n for n, m in model.named_modules()}
    records: list[dict] = []
    diag: dict[str, torch.Tensor] = {}
    overhead = [0.0]
    orig_fasterquant = ref_gptq.GPTQ.fasterquant

    def fasterquant(self, *a, **kw):
        name = names[id(self.layer)]
        layer0 = name.startswith("model.layers.0.")
        t_d = time.perf_counter()
        H = self.H.clone()  # fasterquant damps self.H in place and deletes it
        W = self.layer.weight.data.clone().float()
        found: list[tuple[torch.Tensor, torch.Tensor]] = []
        if args.diagnose and layer0:
            rel = name[len("model.layers.0."):]
            diag.setdefault(f"H.{GROUP_OF[rel]}", H.clone())
            q = self.quantizer
            orig_find = q.find_params

            def find_params(x, weight=False):
                orig_find(x, weight=weight)
                found.append((q.scale.clone(), q.zero.clone()))

            q.find_params = find_params
        overhead[0] += time.perf_counter() - t_d
        t1 = time.perf_counter()
        orig_fasterquant(self, *a, **kw)
        seconds = time.perf_counter() - t1
        t_d = time.perf_counter()
        Q = self.layer.weight.data.float()
        D = Q - W
        err = float(torch.sqrt(torch.sum((D @ H) * D) / torch.sum((W @ H) * W).clamp_min(1e-30)))
        records.append({"module": name, "rel_error": err, "seconds": seconds, "nsamples": int(self.nsamples)})
        if args.diagnose and layer0:
            rel = name[len("model.layers.0."):]
            del self.quantizer.find_params
            if groupsize == -1:
                scale, zero = found[0][0], found[0][1]  # (rows, 1) from the original W
            else:
                groups = found[1:]  # found[0]: the whole-row call before the loop (ready() was False)
                assert len(groups) == math.ceil(W.shape[1] / groupsize), (len(found), W.shape)
                scale = torch.cat([s for s, _ in groups], dim=1)
                zero = torch.cat([z for _, z in groups], dim=1)
            cols = torch.arange(W.shape[1]) // (groupsize if groupsize != -1 else W.shape[1])
            s_col, z_col = scale[:, cols], zero[:, cols]
            codes = torch.clamp(torch.round(Q / s_col) + z_col, 0, 2**wbits - 1)
            assert torch.allclose(s_col * (codes - z_col), Q, rtol=0, atol=1e-6 * float(s_col.abs().max())), name
            diag[f"codes.{rel}"] = codes.to(torch.uint8)
            diag[f"scale.{rel}"] = scale.contiguous()
            diag[f"zero.{rel}"] = zero.contiguous()
        overhead[0] += time.perf_counter() - t_d

    quant_seconds = None
    tee = Tee()
    if args.scheme != "fp":
        ref_gptq.GPTQ.fasterquant = fasterquant
        model.seqlen = cal_len
        dataloader = [(calib[i : i + 1], None) for i in range(n_cal)]
        log("llama_sequential starts")
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(tee):
            ref_llama.llama_sequential(model, dataloader, dev)
        quant_seconds = time.perf_counter() - t0
        ref_gptq.GPTQ.fasterquant = orig_fasterquant
        log(f"llama_sequential took {quant_seconds:.1f}s ({overhead[0]:.1f}s of it diagnostics)")
    rss_quant = peak_rss_mb()

    n_linear = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    checks = {"load": load_check}
    if args.scheme != "fp":
        checks["linears_quantized"] = len(records)
        checks["linears_in_model"] = n_linear
        checks["calibration_windows_per_hessian"] = sorted({r["nsamples"] for r in records})

    model.seqlen = ev_len
    eval_tee = Tee()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(eval_tee):
        ref_llama.llama_eval(model, SimpleNamespace(input_ids=ev.reshape(1, -1)), dev)
    eval_seconds = time.perf_counter() - t0
    ppl = float([ln for ln in eval_tee.buf.getvalue().splitlines() if ln.strip()][-1])
    rss_end = peak_rss_mb()
    log(f"ppl {ppl:.4f} over {n_ev} windows in {eval_seconds:.1f}s")

    if args.diagnose and args.scheme != "fp":
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and n != "lm_head":
                diag[f"w.{n}"] = m.weight.data.contiguous()
        os.makedirs(os.path.dirname(os.path.abspath(args.diagnose)), exist_ok=True)
        save_file(diag, args.diagnose, metadata={"hessian_scale": "2/n_windows", "tool": "gptq-reference"})
        log(f"diagnostics written to {args.diagnose}")

    result = {
        "tool": "gptq-reference",
        "version": args.ref_commit or "IST-DASLab/gptq (commit not given)",
        "scheme": args.scheme,
        "quant_seconds": None if quant_seconds is None else round(quant_seconds, 3),
        "peak_rss_mb": round(rss_end, 1),
        "peak_rss_quant_mb": round(rss_quant, 1),
        "peak_rss_load_mb": round(rss_load, 1),
        "ppl": ppl,
        "n_calibration": int(n_cal),
        "n_eval": int(n_ev),
        "calibration_seqlen": int(cal_len),
        "eval_seqlen": int(ev_len),
        "eval_seconds": round(eval_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "diag_overhead_seconds": round(overhead[0], 3),
        "records": records,
        "config": {
            "wbits": wbits, "groupsize": groupsize, "sym": False, "percdamp": args.damp, "blocksize": 128,
            "act_order": False, "static_groups": False, "true_sequential": True, "batch_size": 1,
        },
        "checks": checks,
        "cpu_shim": "dev=torch.device('cpu') passed to llama_sequential/llama_eval; torch.cuda.synchronize -> no-op",
        "reference_files_sha256": {f: file_sha256(os.path.join(args.ref_dir, f)) for f in REF_FILES},
        "threads": torch.get_num_threads(),
        "versions": {p: md.version(p) for p in ("torch", "transformers", "safetensors")},
        "python": platform.python_version(),
        "diagnose": args.diagnose,
    }
    ok = load_check["ok"] and (args.scheme == "fp" or len(records) == n_linear)
    checks["all_ok"] = bool(ok)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("tool", "scheme", "quant_seconds", "peak_rss_mb", "ppl", "n_eval")}))
    if not ok:
        log("CHECKS FAILED (see checks in the JSON)")
        sys.exit(2)


if __name__ == "__main__":
    main()
