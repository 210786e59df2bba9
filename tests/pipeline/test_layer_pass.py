"""A pass per linear group (one chunk's intermediates at a time) gives the one pass's floats."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ptqlab.api import plan_quantization, run_quantization
from ptqlab.models.registry import get_adapter
from ptqlab.pipeline import budget
from ptqlab.pipeline.plan import RunOptions
from ptqlab.pipeline.sequential import run_group_passes
from ptqlab.testing import TINY_FAMILIES, tiny_model

CAL = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(5))
SCHEME = {"weight": {"bits": 3, "granularity": "group", "group_size": 16}}


def _quantized(family: str, recipe: list[dict], layer_pass: str) -> tuple[dict[str, torch.Tensor], list]:
    model = tiny_model(family).eval()
    plan = dataclasses.replace(plan_quantization(model, SCHEME, recipe, CAL), batch_size=2)  # three chunks
    report = run_quantization(model, plan, progress=False, options=RunOptions(layer_pass=layer_pass))
    return {k: v.clone() for k, v in model.state_dict().items()}, [r.rel_error for r in report.records]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_per_group_passes_give_the_one_pass_weights_bit_for_bit(family: str) -> None:
    one, err_one = _quantized(family, [{"gptq": {}}], "one")
    per, err_per = _quantized(family, [{"gptq": {}}], "per_group")
    assert one.keys() == per.keys()
    for k in one:
        assert torch.equal(one[k], per[k]), k
    assert err_one == err_per


@pytest.mark.parametrize("recipe", [[{"awq": {}}], [{"smoothquant": {}}, {"gptq": {}}]])
def test_per_group_passes_with_folded_scales(recipe: list[dict]) -> None:
    """A scale folded into the op before a group acts once in the later passes (not folded and mapped)."""
    one, _ = _quantized("llama", recipe, "one")
    per, _ = _quantized("llama", recipe, "per_group")
    model = tiny_model("llama").eval()
    ids = CAL[:2]
    logits = []
    for state in (one, per):
        model.load_state_dict(state)
        with torch.inference_mode():
            logits.append(model(ids).logits)
    # float rounding of op(x) / s against (op / s)(x); a scale applied twice would change the weights by s
    assert (logits[0] - logits[1]).abs().max() < 1e-5
    for k in one:
        assert (one[k] - per[k]).norm() <= 1e-5 * one[k].norm() + 1e-12, k


def test_per_group_passes_stop_each_chunk_and_apply_groups_in_forward_order() -> None:
    from ptqlab.nn.capture import capture_inputs

    model = tiny_model("llama").eval()
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    captured = capture_inputs(model, layers, list(CAL.split(2)))
    groups = [[layers[0].get_submodule(rel) for rel in g.linears] for g in adapter.groups]
    events: list[tuple[str, int]] = []
    hidden = list(captured.hidden)
    out = run_group_passes(layers[0], groups, hidden, captured.calls[0],
                           lambda g, x: events.append(("observe", g)), lambda g: events.append(("apply", g)))
    assert events == [e for g in range(len(groups)) for e in [("observe", g)] * 3 + [("apply", g)]]
    assert len(out) == 3 and all(h is None for h in hidden)
    with torch.inference_mode():
        plain = [layers[0](x, *c.args, **c.kwargs) for x, c in zip(captured.hidden, captured.calls[0], strict=True)]
    for o, p in zip(out, plain, strict=True):
        assert torch.equal(o, p[0] if isinstance(p, tuple) else p)


def test_auto_takes_a_pass_per_group_when_the_held_chunks_would_not_fit(monkeypatch) -> None:
    model = tiny_model("llama").eval()
    layer = get_adapter(model).layers(model)[0]
    hidden = [torch.zeros(2, 24, model.config.hidden_size) for _ in range(3)]
    held = budget.held_bytes(layer, hidden)
    widest = max(model.config.intermediate_size, model.config.hidden_size)
    assert held == 6 * 24 * (widest + 4 * model.config.hidden_size) * 4
    monkeypatch.setattr(budget, "resident_bytes", lambda: 1000)
    options = RunOptions(max_memory=1000 + 2 * held + 2)
    assert budget.per_group_passes(options, layer, hidden) is False
    options = dataclasses.replace(options, max_memory=1000 + 2 * held - 2)
    assert budget.per_group_passes(options, layer, hidden) is True
    options = dataclasses.replace(options, layer_pass="one")
    assert budget.per_group_passes(options, layer, hidden) is False


def test_hidden_states_past_the_budget_are_memory_mapped(monkeypatch, tmp_path, caplog) -> None:
    """A budget too small for the hidden states maps them to unlinked files: same weights, no file left."""
    import logging

    one, _ = _quantized("llama", [{"gptq": {}}], "one")
    monkeypatch.setattr(budget, "resident_bytes", lambda: 1000)
    model = tiny_model("llama").eval()
    plan = dataclasses.replace(plan_quantization(model, SCHEME, [{"gptq": {}}], CAL), batch_size=2)
    options = RunOptions(layer_pass="auto", max_memory=1001, offload_dir=str(tmp_path))
    kept: list[int] = []
    real = budget.HiddenSpill.keep

    def keep(self, tensors):
        out = real(self, tensors)
        kept.append(len(out))
        assert all(not t.untyped_storage().resizable() for t in out)  # file-backed, not heap storage
        return out

    monkeypatch.setattr(budget.HiddenSpill, "keep", keep)
    with caplog.at_level(logging.INFO, logger="ptqlab.pipeline.budget"):
        run_quantization(model, plan, progress=False, options=options)
    assert "memory-mapped files" in caplog.text and "a pass per linear group" in caplog.text
    assert kept == [3] * (1 + len(get_adapter(model).layers(model)))  # the captured inputs, then each layer's
    assert list(tmp_path.iterdir()) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, one[k]), k
