"""The long-context retrieval task: a deterministic generator and a strict scorer."""

from __future__ import annotations

import re

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


class _Oracle(torch.nn.Module):
    """A 'model' whose greedy continuation is the right pass key for even samples and a wrong one for odd ones."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.calls = 0

    def generate(self, ids, **_kwargs):
        prompt = self.tokenizer.decode(ids[0], skip_special_tokens=True)
        asked = re.search(r"What is the pass key of the (\w+ \w+)\?", prompt).group(1)
        key = re.search(rf"The pass key of the {asked} is (\d+)\.", prompt).group(1)
        answer = key if self.calls % 2 == 0 else str(int(key) + 1)
        self.calls += 1
        extra = self.tokenizer(f" {answer}. Done", add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([ids, extra], dim=1)


def test_accuracy_scores_the_continuation_of_each_sample(stories) -> None:
    oracle = _Oracle(stories.tokenizer)
    acc, answers = retrieval_accuracy(oracle, stories.tokenizer, 200, 4, seed=3, pairs=4)
    assert acc == 0.5 and oracle.calls == 4
    assert all("pass key" not in a and a.strip().endswith("Done") for a in answers)  # the prompt is left out
    for i, a in enumerate(answers):
        assert score(a, make_sample(stories.tokenizer, 200, 3, i, pairs=4).answer) is (i % 2 == 0)


def test_accuracy_runs_with_quantized_kv_and_rejects_too_long_prompts(stories) -> None:
    acc, answers = retrieval_accuracy(stories.model, stories.tokenizer, 256, 2)
    samples = [make_sample(stories.tokenizer, 256, 0, i, pairs=4) for i in range(2)]
    assert len(answers) == 2 and acc == sum(score(a, s.answer) for a, s in zip(answers, samples, strict=True)) / 2
    quantize(stories.model, {"kv_cache": {"bits": 2}}, progress=False)
    acc2, answers2 = retrieval_accuracy(stories.model, stories.tokenizer, 256, 2)
    assert acc2 == sum(score(a, s.answer) for a, s in zip(answers2, samples, strict=True)) / 2
    assert answers2 != answers  # 2-bit keys and values change what the model generates
    with pytest.raises(ValueError, match="exceeds the model's context"):
        retrieval_accuracy(stories.model, stories.tokenizer, 100_000, 1)
    assert torch.is_grad_enabled()
