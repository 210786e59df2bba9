"""The long-context retrieval task: a deterministic generator and a strict scorer."""

from __future__ import annotations

import pytest
import torch

from ptqlab.api import quantize
from ptqlab.eval.retrieval import make_sample, retrieval_accuracy, score
from ptqlab.models.loading import load_model


@pytest.fixture(scope="module")
def stories():
    return load_model("stories260k")


def test_generator_is_deterministic_and_fits_the_length(stories) -> None:
    tok = stories.tokenizer
    a, b = make_sample(tok, 200, 0, 3, pairs=4), make_sample(tok, 200, 0, 3, pairs=4)
    assert a == b
    assert make_sample(tok, 200, 0, 4, pairs=4).prompt != a.prompt
    assert make_sample(tok, 200, 1, 3, pairs=4).prompt != a.prompt
    assert 150 < a.length <= 200 and len(tok(a.prompt).input_ids) == a.length
    assert a.prompt.count(f" is {a.answer}.") == 1 and 0 <= a.position <= 1


def test_a_length_too_short_for_the_records_is_an_error(stories) -> None:
    with pytest.raises(ValueError, match="too short for 4 records"):
        make_sample(stories.tokenizer, 40, 0, 0, pairs=4)


def test_scorer_accepts_the_answer_and_rejects_near_misses() -> None:
    assert score(" 48213. Remember it.", "48213")
    assert score("48213", "48213")
    for miss in (" 4821.", " 482130", " 48 213", " 48312", "", " the key"):
        assert not score(miss, "48213")


def test_accuracy_runs_with_quantized_kv_and_rejects_too_long_prompts(stories) -> None:
    acc, answers = retrieval_accuracy(stories.model, stories.tokenizer, 256, 2)
    assert 0.0 <= acc <= 1.0 and len(answers) == 2
    quantize(stories.model, {"kv_cache": {"bits": 2}}, progress=False)
    acc2, _ = retrieval_accuracy(stories.model, stories.tokenizer, 256, 2)
    assert 0.0 <= acc2 <= 1.0
    with pytest.raises(ValueError, match="exceeds the model's context"):
        retrieval_accuracy(stories.model, stories.tokenizer, 100_000, 1)
    assert torch.is_grad_enabled()
