"""``scheme.embedding``: the input embedding rounded onto a grid, counted in the size, refused where it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptqlab.compile import bind, compile_config
from ptqlab.errors import ConfigError
from ptqlab.models.loading import load_model
from ptqlab.pipeline.quantize import quantize
from ptqlab.quant.core import fake_quantize
from ptqlab.report.runs import describe_scheme
from ptqlab.store import normalized
from ptqlab.study.config import parse_config
from ptqlab.study.worker import Worker

EVAL = {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 2, "sensitivity": None, "sample": None}
BASE = {"model": "stories260k", "scheme": {"weight": {"bits": 4, "granularity": "channel"}}, "evaluate": EVAL}
Q8_0 = {"format": "gguf_q8_0"}


def _with(embedding: dict | None, **extra: object) -> dict:
    return {**BASE, "scheme": {**BASE["scheme"], "embedding": embedding}, **extra}


def test_the_embedding_and_its_tied_head_are_rounded_and_counted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    cfg = parse_config(_with(Q8_0))
    lm = load_model("stories260k", "float32", "cpu")
    fp = lm.model.get_input_embeddings().weight.detach().clone()
    plan = bind(compile_config(cfg), lm.model, lm.tokenizer)
    report = quantize(lm.model, plan.quantization, progress=False)
    table = lm.model.get_input_embeddings().weight
    assert lm.model.lm_head.weight is table  # stories260K ties its head: one tensor, one rounding
    spec = plan.quantization.embedding.spec
    assert torch.equal(table, fake_quantize(fp, spec)) and not torch.equal(table, fp)
    assert torch.equal(fake_quantize(table, spec), table)  # on its grid
    plain = parse_config(BASE)
    lm2 = load_model("stories260k", "float32", "cpu")
    plain_report = quantize(lm2.model, bind(compile_config(plain), lm2.model, lm2.tokenizer).quantization,
                            progress=False)
    sizes = {m.name: m.value for m in report.metrics}
    plain_sizes = {m.name: m.value for m in plain_report.metrics}
    assert sizes["bits.weight"] == plain_sizes["bits.weight"]  # the decoder linears' bits, as before
    # Q8_0: 32 one-byte codes and an FP16 scale per block = 8.5 bits a weight, against 16 in full precision
    assert plain_sizes["size.model_bytes"] - sizes["size.model_bytes"] == fp.numel() * (16 - 8.5) / 8


def test_a_run_without_it_keeps_its_id_and_a_run_with_it_is_its_own() -> None:
    assert "embedding" not in normalized(parse_config(BASE))["scheme"]  # stored runs keep their ids
    worker = Worker(progress=False)
    assert worker.run_id(parse_config(_with(Q8_0))) != worker.run_id(parse_config(BASE))
    assert describe_scheme(normalized(parse_config(_with(Q8_0)))["scheme"]) == "W4 channel + Egguf_q8_0"


@pytest.mark.parametrize(("embedding", "extra", "message"), [
    ({"bits": 4, "granularity": "group", "group_size": 48}, {}, "scheme.embedding.*48"),
    ({"format": "kmeans", "bits": 4, "granularity": "channel"}, {}, "scheme.embedding format kmeans"),
])
def test_what_cannot_run_is_refused_before_any_work(tmp_path: Path, monkeypatch, embedding: dict, extra: dict,
                                                    message: str) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=message):
        Worker(progress=False).prepare(parse_config(_with(embedding, **extra)))


def test_a_kept_model_with_a_quantized_embedding_is_reused(tmp_path: Path, monkeypatch) -> None:
    """A second run with the same weights restores the kept model (its embedding's grid too), not quantizing again."""
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    worker = Worker(progress=False)
    first = worker.run(parse_config(_with(Q8_0)))
    second = worker.run(parse_config({**_with(Q8_0), "evaluate": {**EVAL, "max_windows": 1}}))
    assert first.status == second.status == "done"
    assert "qmodel_reused" not in first.timings and second.timings.get("qmodel_reused") == 1.0
    sizes = [{m.name: m.value for m in r.metrics if m.name.startswith("size.")} for r in (first, second)]
    assert sizes[0] == sizes[1]
    window = "ppl.wikitext2.s64.w2"
    assert second.windows["ppl.wikitext2.s64.w1"]["nll"][0] == first.windows[window]["nll"][0]
