"""Metric names: every builder's name reads back into its parts and rebuilds to itself."""

from __future__ import annotations

import pytest

from ptqlab.eval.fewshot import shot_measure
from ptqlab.metrics import (
    MetricName,
    adaptive_name,
    divergence_name,
    method_name,
    parse_name,
    perplexity_name,
    retrieval_name,
    task_name,
)


@pytest.mark.parametrize(("name", "parts"), [
    (perplexity_name("wikitext2", 2048, 40), MetricName("ppl", corpus="wikitext2", seqlen=2048, windows=40)),
    (divergence_name("top5", "c4local_new", 512, 16), MetricName("top5", corpus="c4local_new", seqlen=512, windows=16)),
    (task_name("piqa", "acc_norm"), MetricName("lm_eval", task="piqa", measure="acc_norm")),
    (task_name("arc_easy", shot_measure("ece", 5)), MetricName("lm_eval", task="arc_easy", measure="ece", shots=5)),
    (task_name("gsm8k", "exact_match.strict-match"),
     MetricName("lm_eval", task="gsm8k", measure="exact_match.strict-match")),
    (retrieval_name(1024, 8, 20), MetricName("retrieval", length=1024, pairs=8, samples=20)),
    (adaptive_name("delta_ppl"), MetricName("adaptive", measure="delta_ppl")),
    (method_name("zeroquant.local", "loss_ratio"), MetricName("zeroquant", measure="local.loss_ratio")),
    ("bits.weight", MetricName("bits", measure="weight")),
    ("ppl.wikitext2", MetricName("ppl", measure="wikitext2")),  # no size: not a sized name
    ("retrieval.len8.px.n2", MetricName("retrieval", measure="len8.px.n2")),
])
def test_names_read_back_into_their_parts(name: str, parts: MetricName) -> None:
    assert parse_name(name) == parts
    assert str(parse_name(name)) == name
