"""Perplexity under the GPTQ protocol against closed forms and a plain re-computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ptqlab.errors import ConfigError
from ptqlab.eval.perplexity import PerplexityResult, perplexity
from ptqlab.testing import TINY_FAMILIES, tiny_model


class Uniform(nn.Module):
    """Zero logits over ``vocab`` tokens: every token has probability 1/vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.seen_training: list[bool] = []
        self.kwargs: list[dict] = []

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        self.seen_training.append(self.training)
        self.kwargs.append(kwargs)
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab, dtype=torch.float16))


class Oracle(nn.Module):
    """Puts (almost) all mass on the token that actually comes next: perplexity 1 iff the shift is right."""

    def __init__(self, vocab: int, next_ids: torch.Tensor, margin: float = 50.0) -> None:
        super().__init__()
        self.vocab = vocab
        self.margin = margin
        self.next_ids = next_ids  # (windows, seqlen): next_ids[:, t] is the token at t + 1
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        rows = self.next_ids[self.calls : self.calls + input_ids.shape[0]]
        self.calls += input_ids.shape[0]
        logits = torch.full((*input_ids.shape, self.vocab), -self.margin)
        logits.scatter_(2, rows.unsqueeze(-1), self.margin)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on several OpenMP threads stall badly when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 97, (7, 48), generator=torch.Generator().manual_seed(1))


def test_uniform_logits_give_vocab_size(windows):
    model = Uniform(1000).train()
    result = perplexity(model, windows, batch_size=2, progress=False)
    assert isinstance(result, PerplexityResult)
    assert result.ppl == pytest.approx(1000, rel=1e-6)
    assert result.nll == pytest.approx([math.log(1000)] * 7, rel=1e-6)
    assert result.tokens == 7 * 48 and result.seconds > 0 and result.tokens_per_second > 0
    assert model.seen_training == [False] * 4 and model.training  # eval inside, restored after
    assert all(kw == {"use_cache": False} for kw in model.kwargs)


def test_targets_are_shifted_by_one(windows):
    next_ids = torch.roll(windows, -1, dims=1)  # the last column is never scored
    assert perplexity(Oracle(97, next_ids), windows, batch_size=3, progress=False).ppl == pytest.approx(1.0)
    assert perplexity(Oracle(97, windows), windows, progress=False).ppl > 1e10  # unshifted: wrong


def test_matches_plain_gptq_formula(llama, windows):
    result = perplexity(llama, windows, progress=False)
    with torch.no_grad():
        logits = llama(windows).logits
    loss = nn.CrossEntropyLoss()
    nlls = [loss(logits[i, :-1], windows[i, 1:]).float() * 48 for i in range(7)]
    expected = torch.exp(torch.stack(nlls).sum() / (7 * 48)).item()
    assert math.isfinite(result.ppl) and result.ppl > 1
    assert result.ppl == pytest.approx(expected, rel=1e-5)


def test_batch_size_does_not_change_the_result(llama, windows):
    one = perplexity(llama, windows, batch_size=1, progress=False)
    three = perplexity(llama, windows, batch_size=3, progress=True, desc="test")
    assert three.ppl == pytest.approx(one.ppl, rel=1e-6)
    assert three.nll == pytest.approx(one.nll, rel=1e-5)


def test_explicit_device_and_bad_inputs(windows):
    model = Uniform(97)
    assert perplexity(model, windows.to(torch.int32), device="cpu", progress=False).ppl == pytest.approx(97)
    with pytest.raises(ConfigError, match="shape"):
        perplexity(model, windows[0], progress=False)
    with pytest.raises(ConfigError, match="shape"):
        perplexity(model, windows[:, :1], progress=False)
    with pytest.raises(ConfigError, match="integer"):
        perplexity(model, windows.float(), progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        perplexity(model, windows, batch_size=0, progress=False)


def test_overflowing_perplexity_is_inf(windows):
    wrong = torch.ones_like(windows)  # always predicts token 1, confidently
    result = perplexity(Oracle(97, wrong, margin=500.0), windows.clamp(min=2), progress=False)
    assert result.ppl == math.inf and result.nll == pytest.approx([1000.0] * 7)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chunked_loss_equals_full_logits_for_every_family(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    full = perplexity(model, ids, batch_size=2, progress=False, chunk=0)
    chunked = perplexity(model, ids, batch_size=2, progress=False, chunk=7)
    assert chunked.nll == pytest.approx(full.nll, rel=1e-5, abs=1e-6)
