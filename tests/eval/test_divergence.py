"""Divergence from the FP model: KL and agreement, the top-k + tail bound, the on-disk FP cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ptqlab.api import quantize
from ptqlab.cli import main
from ptqlab.eval import divergence as dv
from ptqlab.testing import tiny_model

IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def test_fp_model_against_itself_is_zero_and_agrees() -> None:
    model = tiny_model("llama").eval()
    d = dv.divergence(model, dv.compute_reference(model, IDS, k=8))
    assert d.kl == pytest.approx(0.0, abs=1e-6) and d.top1 == 1.0 and d.top5 == 1.0 and d.tokens == 48


def test_topk_kl_is_a_lower_bound_and_exact_with_the_whole_vocabulary() -> None:
    fp = tiny_model("qwen2").eval()
    ref_full = dv.compute_reference(fp, IDS, k=128)  # tiny vocabulary: k = V
    ref_top = dv.compute_reference(fp, IDS, k=8)
    with torch.no_grad():
        p = torch.log_softmax(fp(IDS).logits, -1)
    quantize(fp, {"weight": {"bits": 2, "granularity": "channel"}}, progress=False)
    with torch.no_grad():
        q = torch.log_softmax(fp(IDS).logits, -1)
    exact = float((p.exp() * (p - q)).sum(-1).mean())
    assert dv.divergence(fp, ref_full).kl == pytest.approx(exact, rel=1e-4)
    assert 0 < dv.divergence(fp, ref_top).kl <= exact + 1e-6


def test_reference_cache_computes_once(tmp_path: Path) -> None:
    model = tiny_model("llama").eval()
    cache = dv.ReferenceCache(tmp_path)
    a = cache.get(model, "fp-1", "float32", IDS, 8)
    b = dv.ReferenceCache(tmp_path).get(model, "fp-1", "float32", IDS, 8)
    assert cache.computed == 1 and torch.equal(a.top_logp, b.top_logp)
    cache.get(model, "fp-1", "float32", IDS[:1], 8)  # other data: another reference
    assert cache.computed == 2


def test_fp_reference_is_computed_once_for_a_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    calls = []
    real = dv.compute_reference
    monkeypatch.setattr(dv, "compute_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    db = str(tmp_path / "s.db")
    kls = []
    for bits in (8, 4, 3):
        cfg = {"model": "stories260k", "scheme": {"weight": {"bits": bits, "granularity": "channel"}},
               "evaluate": {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 1,
                            "divergence": {"seqlen": 64, "windows": 2}}}
        path = tmp_path / f"c{bits}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["--store", db, "run", str(path), "--json", "--quiet"]) == 0
        metrics = json.loads(capsys.readouterr().out)["metrics"]
        kls.append(metrics["kl.wikitext2.s64.w2"]["value"])
        assert 0 <= metrics["top1.wikitext2.s64.w2"]["value"] <= metrics["top5.wikitext2.s64.w2"]["value"] <= 1
    assert len(calls) == 1
    assert kls[0] < kls[1] < kls[2]  # KL orders the configs as the bits do


def test_chunked_log_probabilities_equal_the_full_logits() -> None:
    """The head applied 16 positions at a time gives the log-probabilities of the full logits."""
    model = tiny_model("gemma2", seed=0)  # final_logit_softcapping: the chunks apply it too
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float()[0], dim=-1)
    chunks = list(dv.logprob_chunks(model, ids, chunk=16))
    assert [(s, e) for s, e, _ in chunks] == [(s, min(s + 16, 100)) for s in range(0, 100, 16)]
    torch.testing.assert_close(torch.cat([c for _, _, c in chunks]), full, rtol=0, atol=1e-5)
