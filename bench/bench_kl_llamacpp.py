"""`make bench-kl-llamacpp`: ptqlab's fidelity statistics against `llama-perplexity --kl-divergence`.

SmolLM2-135M (fp32) and RTN runs in llama.cpp block types (`gguf_q4_0`, `gguf_q8_0`) are exported to GGUF by
ptqlab's exporter (the run's weights, bit for bit). `llama-perplexity --kl-divergence-base` runs the FP
GGUF over a wikitext2 text file and `--kl-divergence` each quantized GGUF; the tokens it scored are read
back from its base file, so every side below sees the same tokens at the same positions (each chunk of
`--ctx` tokens, the first token replaced by BOS when the vocabulary adds one, and only positions
`ctx/2 .. ctx-2` scored: the first half of each chunk is context).

llama.cpp runs with an f32 KV cache and flash attention off (`-ctk f32 -ctv f32 -fa off`): its CPU flash
attention (on by default, `auto`) moves FP log-probabilities by up to 0.04 nats (median 7e-4) from the
fp32 result; without it they equal torch's to 3.5e-4 (mostly the 16-bit storage of the base file). Five
ptqlab computations on those positions, each beside llama.cpp's own numbers:

- `ptqlab stats, llama.cpp values`: ptqlab's statistics code (`Divergence.statistics`: mean, standard
  error, percentiles, maximum, RMS) on the per-token values llama-perplexity itself computes: the base
  log-probabilities decoded from its base file (16-bit) and the quantized GGUF's logits from llama.cpp
  (llama-cpp-python on the binary's own libllama when it sits beside it, else on the wheel's build of the
  same sources), with its formula (KL over the base tokens above e^-16). It checks the definitions of the
  statistics: equal to float noise.
- `ptqlab KL, llama.cpp logits`: ptqlab's full-vocabulary KL (`DivergenceSum.add_full`) on both GGUFs'
  float logits from llama.cpp. It differs from llama-perplexity by llama-perplexity's 16-bit storage of
  the base log-probabilities (16 nats over 65535 steps) and its e^-16 cut.
- `ptqlab torch, full`: ptqlab's own models in torch (FP and the run's quantized weights),
  `ptqlab.eval.divergence.full_divergence`: the exact KL over all 49152 tokens. It differs from llama.cpp
  by what the runtimes compute: llama.cpp's CPU kernels quantize the activations entering a Q4_0 / Q8_0
  matmul to Q8_0 blocks; ptqlab's fake-quantized model keeps them in fp32.
- `ptqlab torch, full, A8 g32`: the same with llama.cpp's Q8_0 activations emulated by ptqlab (the run's
  weights plus `activation: {bits: 8, granularity: group, group_size: 32, symmetric: true}`): close to
  llama.cpp's numbers, which shows where the difference comes from (not exact: ggml rounds its block
  scales to fp16 and quantizes no activation before the F32 output head and attention products).
- `ptqlab torch, top-32`: the KL the run metrics (`kl.*`, `kl_p99.*` ...) report: over FP's top-32
  tokens plus one tail bucket, a lower bound of the full KL.

Needs the `llama-perplexity` binary (built from the llama.cpp sources that llama-cpp-python vendors, see
`--help`) and llama-cpp-python. Writes `bench/results/kl-llamacpp.json`.

    python bench/bench_kl_llamacpp.py --llama-perplexity /path/to/llama-perplexity
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2-135m"
ROWS = [("Q4_0 RTN", {"weight": {"format": "gguf_q4_0"}}), ("Q8_0 RTN", {"weight": {"format": "gguf_q8_0"}})]
BUILD = """llama-perplexity is built from the llama.cpp that llama-cpp-python vendors:
    .venv/bin/pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    cd /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release
    nice cmake --build build --target llama-perplexity -j2      # build/bin/llama-perplexity"""
DEFAULT_BIN = "/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-perplexity"

# llama-perplexity's summary lines -> our keys (values in its units: KL in nats, Δp and same-top in %)
PATTERNS = {
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([-\d.eE+]+)\s*±\s*([-\d.eE+]+)",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*([-\d.eE+]+)\s*±\s*([-\d.eE+]+)",
    "kl": r"Mean\s+KLD:\s*([-\d.eE+]+)\s*±\s*([-\d.eE+]+)",
    "kl_max": r"Maximum KLD:\s*([-\d.eE+]+)",
    "kl_p999": r"99\.9%\s+KLD:\s*([-\d.eE+]+)",
    "kl_p99": r"99\.0%\s+KLD:\s*([-\d.eE+]+)",
    "kl_p95": r"95\.0%\s+KLD:\s*([-\d.eE+]+)",
    "kl_p90": r"90\.0%\s+KLD:\s*([-\d.eE+]+)",
    "kl_p50": r"Median\s+KLD:\s*([-\d.eE+]+)",
    "dp_mean": r"Mean\s+Δp:\s*([-\d.eE+]+)\s*±\s*([-\d.eE+]+)\s*%",
    "dp_max": r"Maximum Δp:\s*([-\d.eE+]+)%",
    "dp_p99": r"99\.0%\s+Δp:\s*([-\d.eE+]+)%",
    "dp_p95": r"95\.0%\s+Δp:\s*([-\d.eE+]+)%",
    "dp_p50": r"Median\s+Δp:\s*([-\d.eE+]+)%",
    "dp_p5": r" 5\.0%\s+Δp:\s*([-\d.eE+]+)%",
    "dp_p1": r" 1\.0%\s+Δp:\s*([-\d.eE+]+)%",
    "dp_min": r"Minimum Δp:\s*([-\d.eE+]+)%",
    "dp_rms": r"RMS Δp\s*:\s*([-\d.eE+]+)\s*±\s*([-\d.eE+]+)\s*%",
    "top1": r"Same top p:\s*([-\d.eE+]+)\s*±\s*([-\d.eE+]+)\s*%",
}
PERCENT = {"dp_mean", "dp_max", "dp_p99", "dp_p95", "dp_p50", "dp_p5", "dp_p1", "dp_min", "dp_rms", "top1"}
COMPARED = ["kl", "kl_se", "kl_p50", "kl_p90", "kl_p95", "kl_p99", "kl_p999", "kl_max", "top1", "dp_rms", "dp_mean",
            "dp_min", "dp_p1", "dp_p5", "dp_p50", "dp_p95", "dp_p99", "dp_max", "ppl_ratio"]


def parse_llama(text: str) -> dict[str, float]:
    """The summary statistics of a ``llama-perplexity --kl-divergence`` log, as fractions (not percent)."""
    out: dict[str, float] = {}
    for key, pattern in PATTERNS.items():
        m = re.search(pattern, text)
        if m is None:
            continue
        scale = 0.01 if key in PERCENT else 1.0
        out[key] = float(m.group(1)) * scale
        if m.lastindex and m.lastindex >= 2:
            out[f"{key}_se"] = float(m.group(2)) * scale
    return out


def run_logged(cmd: list[str], log: Path) -> str:
    """Run a command (niced), keep its output in ``log``, fail loudly with its tail."""
    t0 = time.perf_counter()
    proc = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    log.write_text(text)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    print(f"  {time.perf_counter() - t0:.1f} s: {shlex.join(cmd)}", flush=True)
    return text


def read_base_tokens(path: Path) -> tuple[int, int, int, np.ndarray]:
    """``(n_ctx, n_vocab, n_chunk, tokens)`` from the header of a ``--kl-divergence-base`` file."""
    with path.open("rb") as f:
        if f.read(8) != b"_logits_":
            raise SystemExit(f"{path} is not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(f.read(12), dtype=np.int32))
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32).copy()
    return n_ctx, n_vocab, n_chunk, tokens


def gguf_bos(path: Path) -> int | None:
    """The BOS id when llama.cpp's vocabulary of the GGUF adds one (llama-perplexity then starts each chunk with it)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    adds = len(vocab.tokenize(b"a", add_bos=True)) > len(vocab.tokenize(b"a", add_bos=False))
    return int(vocab.token_bos()) if adds else None


def read_base_logprobs(path: Path) -> list[torch.Tensor]:
    """The base log-probabilities (n_ctx - 1 - n_ctx/2, V) of each chunk, decoded from llama-perplexity's file.

    Each row is two floats (scale, minimum log-probability), two pad words, then one uint16 per token:
    ``log p = scale * u + minimum`` (llama-perplexity's ``log_softmax`` writer).
    """
    n_ctx, n_vocab, n_chunk, _ = read_base_tokens(path)
    rows, nv = n_ctx - 1 - n_ctx // 2, 2 * ((n_vocab + 1) // 2) + 4
    raw = np.fromfile(path, dtype=np.uint16, offset=8 + 12 + 4 * n_ctx * n_chunk).reshape(n_chunk, rows, nv)
    out = []
    for chunk in raw:
        head = chunk[:, :4].copy().view(np.float32)  # (rows, 2): scale, minimum
        out.append(torch.from_numpy(head[:, :1] * chunk[:, 4 : 4 + n_vocab].astype(np.float32) + head[:, 1:2]))
    return out


def llama_formula(base: list[torch.Tensor], q: list[torch.Tensor], windows: torch.Tensor, start: int) -> Any:
    """Per-token values as llama-perplexity computes them, gathered into ptqlab's :class:`Divergence`.

    KL sums only over base tokens with log-probability above -16; same top: first index of each maximum.
    """
    from ptqlab.eval import divergence as dv

    acc = dv.DivergenceSum()
    for lb, lq, ids in zip(base, q, windows, strict=True):
        t = ids[start + 1 :, None]
        terms = torch.where(lb > -16, lb.exp() * (lb - lq), torch.zeros(()))
        acc.kl_parts.append(terms.double().sum(-1).float())
        best_q = lq.topk(5, dim=-1).indices
        best_base = lb.argmax(-1)
        acc.top1 += int((best_q[:, 0] == best_base).sum())
        acc.top5 += int((best_q == best_base[:, None]).any(-1).sum())
        acc.dp_parts.append((lq.gather(-1, t).exp() - lb.gather(-1, t).exp()).squeeze(-1))
    return acc.result()


def llama_logprobs(path: Path, windows: torch.Tensor, start: int, threads: int) -> list[torch.Tensor]:
    """llama.cpp's log-probabilities (T - 1 - start, V) at each window's scored positions (f32 KV, no FA)."""
    from llama_cpp import Llama

    n_ctx = int(windows.shape[1])
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, type_k=0, type_v=0, flash_attn=False, verbose=False)  # 0: F32
    out = []
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[start : n_ctx - 1], dtype=np.float32))
        out.append(torch.log_softmax(logits, dim=-1))
    del llm
    return out


def torch_logprobs(model: torch.nn.Module, windows: torch.Tensor, start: int) -> list[torch.Tensor]:
    """ptqlab's log-probabilities (T - 1 - start, V) at each window's scored positions."""
    from ptqlab.eval import divergence as dv

    return [torch.cat([c for _, _, c in dv.logprob_chunks(model, row)])[start:-1] for row in windows.split(1)]


def statistics_of(fp: list[torch.Tensor], q: list[torch.Tensor], windows: torch.Tensor, start: int,
                  d: Any = None) -> dict[str, float]:
    """ptqlab's statistics of both models' scored log-probabilities, and the token-paired perplexity ratio.

    ``d``: an already measured divergence of those positions (else measured here from ``fp`` and ``q``).
    """
    from ptqlab.eval import divergence as dv

    targets = [ids[start + 1 :] for ids in windows]
    if d is None:
        acc = dv.DivergenceSum()
        for p_w, q_w, t in zip(fp, q, targets, strict=True):
            acc.add_full(p_w, q_w, t)
        d = acc.result()
    out = {"kl": d.kl, "top1": d.top1, "top5": d.top5, "tokens": d.tokens, **d.statistics()}
    # llama-perplexity's ratio: token NLLs paired per token (ptqlab's run metric pairs per window)
    diff = torch.cat([(p_w.gather(-1, t[:, None]) - q_w.gather(-1, t[:, None])).squeeze(-1).double()
                      for p_w, q_w, t in zip(fp, q, targets, strict=True)])
    out["ppl_ratio"] = math.exp(float(diff.mean()))
    out["ppl_ratio_se"] = out["ppl_ratio"] * float(diff.std() / math.sqrt(diff.numel()))
    return out


def quantized_model(cfg: Any) -> tuple[Any, Any]:
    """The run's quantized model (RTN: the weights the export wrote) and its tokenizer."""
    from ptqlab.compile import bind, compile_config
    from ptqlab.models.loading import load_model
    from ptqlab.pipeline.quantize import quantize

    loaded = load_model(cfg.model, cfg.dtype, "cpu")
    plan = bind(compile_config(cfg), loaded.model, loaded.tokenizer)
    quantize(loaded.model, plan.quantization, progress=False)
    return loaded.model.eval(), loaded.tokenizer


A8_G32 = {"bits": 8, "granularity": "group", "group_size": 32, "symmetric": True, "dynamic": True}
"""Activations as llama.cpp's CPU kernels feed a Q4_0 / Q8_0 matmul: symmetric 8-bit blocks of 32 (Q8_0)."""


def a8_divergence(fp_model: torch.nn.Module, scheme: dict, windows: torch.Tensor, start: int) -> dict[str, float]:
    """The full KL of the run's weights with llama.cpp's Q8_0 activations emulated (ptqlab's A8 g32 sym)."""
    import copy

    from ptqlab.api import quantize
    from ptqlab.eval import divergence as dv

    model = copy.deepcopy(fp_model)
    quantize(model, {**scheme, "activation": A8_G32}, progress=False)
    d = dv.full_divergence(fp_model, model.eval(), windows, start=start)
    return {"kl": d.kl, "top1": d.top1, "top5": d.top5, "tokens": d.tokens, **d.statistics()}


def weights_differing(model: torch.nn.Module, gguf_dir: Path) -> int:
    """Tensors of ``model`` that differ from the GGUF as transformers' GGUF loader reads it back."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf", dtype=torch.float32)
    mine = model.state_dict()
    differ = [k for k, v in theirs.state_dict().items() if k in mine and not torch.equal(v, mine[k])]
    del theirs
    return len(differ)


def main() -> None:  # noqa: PLR0915 - one linear script
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=BUILD)
    ap.add_argument("--llama-perplexity", default=os.environ.get("LLAMA_PERPLEXITY", DEFAULT_BIN))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/ptqlab-kl-llamacpp", help="exports, text and logs (outside the repo)")
    args = ap.parse_args()
    binary = Path(args.llama_perplexity)
    if not binary.is_file():
        raise SystemExit(f"no llama-perplexity at {binary}\n{BUILD}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (binary.parent / "libllama.so").is_file():  # llama-cpp-python on the binary's own build: the same kernels
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(binary.parent))
    torch.set_num_threads(args.threads)

    from ptqlab.data.corpora import load_text
    from ptqlab.eval import divergence as dv
    from ptqlab.export.run import export_config
    from ptqlab.models.loading import load_model
    from ptqlab.study.config import parse_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text_file = work / "wiki.test.raw"
    text_file.write_text(load_text("wikitext2"))
    common = ["-c", str(args.ctx), "-b", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads),
              "-ctk", "f32", "-ctv", "f32", "-fa", "off"]
    base_cfg = {"model": MODEL, "device": "cpu", "dtype": "float32"}
    print("exporting FP", flush=True)
    export_config(parse_config(base_cfg), "gguf", work / "fp", overwrite=True, progress=False)
    base_file = work / "fp.kld"
    base_cmd = [str(binary), "-m", str(work / "fp" / "model.gguf"), "-f", str(text_file), *common,
                "--kl-divergence-base", str(base_file)]
    run_logged(base_cmd, work / "fp.log")
    n_ctx, n_vocab, n_chunk, flat = read_base_tokens(base_file)
    windows = torch.from_numpy(flat.astype(np.int64)).view(n_chunk, n_ctx)
    bos = gguf_bos(work / "fp" / "model.gguf")
    if bos is not None:
        windows[:, 0] = bos
    start = n_ctx // 2

    fp_loaded = load_model(MODEL, "float32", "cpu")
    fp_model, tokenizer = fp_loaded.model.eval(), fp_loaded.tokenizer
    ours = tokenizer(load_text("wikitext2"), return_tensors="pt").input_ids[0][: flat.size]
    tokens_equal = bool(torch.equal(ours, torch.from_numpy(flat.astype(np.int64))))
    print(f"tokens: {n_chunk} chunks of {n_ctx}, BOS {bos}; ptqlab's tokenizer gives the same tokens: "
          f"{tokens_equal}", flush=True)
    base = read_base_logprobs(base_file)
    fp_llama = llama_logprobs(work / "fp" / "model.gguf", windows, start, args.threads)
    fp_torch = torch_logprobs(fp_model, windows, start)
    ref = dv.compute_reference(fp_model, windows, k=dv.TOP_K)
    fp_agreement = statistics_of(fp_llama, fp_torch, windows, start)  # llama.cpp's FP against torch's FP
    base_error = max(float((b - f)[b > -16].abs().max()) for b, f in zip(base, fp_torch, strict=True))

    rows = []
    for label, scheme in ROWS:
        cfg = parse_config({**base_cfg, "scheme": scheme})
        out = work / label.split()[0].lower()
        print(f"exporting {label}", flush=True)
        result = export_config(cfg, "gguf", out, overwrite=True, progress=False)
        q_cmd = [str(binary), "-m", str(out / "model.gguf"), *common, "--kl-divergence-base", str(base_file),
                 "--kl-divergence"]
        llama = parse_llama(run_logged(q_cmd, work / f"{out.name}.log"))
        q_model, _ = quantized_model(cfg)
        differing = weights_differing(q_model, out)
        q_llama = llama_logprobs(out / "model.gguf", windows, start, args.threads)
        on_values = statistics_of(base, q_llama, windows, start, llama_formula(base, q_llama, windows, start))
        on_llama = statistics_of(fp_llama, q_llama, windows, start)
        full = dv.full_divergence(fp_model, q_model, windows, start=start)  # the library's function
        q_torch = torch_logprobs(q_model, windows, start)
        torch_full = statistics_of(fp_torch, q_torch, windows, start, full)
        emulated = a8_divergence(fp_model, scheme, windows, start)
        topk = dv.divergence(q_model, ref)
        keep = torch.zeros(windows.shape, dtype=torch.bool)
        keep[:, start:-1] = True
        bound = dv.Divergence(float(topk.kl_values[keep.flatten()].double().mean()), math.nan, math.nan,
                              int(keep.sum()), topk.kl_values[keep.flatten()], torch.zeros(0))
        torch_topk = {"kl": bound.kl, **{k: v for k, v in bound.statistics().items() if k.startswith("kl")}}
        sides = {"llama_perplexity": llama, "ptqlab_stats_llamacpp_values": on_values,
                 "ptqlab_kl_llamacpp_logits": on_llama, "ptqlab_torch_full": torch_full,
                 "ptqlab_torch_full_a8g32": emulated, "ptqlab_torch_top32": torch_topk}
        compare = {key: {"llama_perplexity": llama.get(key),
                         **{side: vals.get(key) for side, vals in sides.items() if side != "llama_perplexity"}}
                   for key in COMPARED}
        rows.append({"run": label, "scheme": scheme, "run_id": result.run_id, "weights_differing_from_gguf": differing,
                     "command": shlex.join(q_cmd), "sides": sides, "compare": compare})
        del q_model, q_llama, q_torch

    table = _table(rows)
    print(table)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {args.threads} threads",
            "model": f"{MODEL} fp32", "ctx": n_ctx, "chunks": n_chunk, "scored_positions": f"{start}..{n_ctx - 2}",
            "tokens_scored": n_chunk * (n_ctx - 1 - start), "bos": bos, "ptqlab_tokenizer_same_tokens": tokens_equal,
            "base_command": shlex.join(base_cmd), "llama_cpp_lib": os.environ.get("LLAMA_CPP_LIB_PATH", "wheel"),
            "command": "python bench/bench_kl_llamacpp.py",
            "fp_llamacpp_vs_fp_torch": fp_agreement, "base_file_vs_torch_fp_max_abs_logp": base_error}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kl-llamacpp.json").write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2))


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


SIDES = [("ptqlab_stats_llamacpp_values", "ptqlab stats, llama.cpp values"),
         ("ptqlab_kl_llamacpp_logits", "ptqlab KL, llama.cpp logits"), ("ptqlab_torch_full", "ptqlab torch, full"),
         ("ptqlab_torch_full_a8g32", "ptqlab torch, full, A8 g32")]


def _table(rows: list[dict[str, Any]]) -> str:
    """Per run: llama-perplexity's statistics, and each ptqlab side with its ratio to llama-perplexity's."""
    lines = []
    for r in rows:
        head = " | ".join(f"{title} | ratio" for _, title in SIDES)
        lines += [f"### {r['run']} ({r['weights_differing_from_gguf']} tensors differ from the GGUF)", "",
                  f"| statistic | llama-perplexity | {head} | ptqlab torch, top-32 |",
                  "|---|---|" + "---|---|" * len(SIDES) + "---|"]
        for key, c in r["compare"].items():
            ref = c["llama_perplexity"]
            cells = [_fmt(ref)]
            for side, _ in SIDES:
                v = c[side]
                ratio = None if v is None or ref is None or ref == 0 else v / ref
                cells += [_fmt(v), _fmt(ratio)]
            cells.append(_fmt(c["ptqlab_torch_top32"]))
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
