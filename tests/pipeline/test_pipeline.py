"""The layer-by-layer driver on tiny random models of every family."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ptqlab.api import plan_quantization, run_quantization
from ptqlab.errors import ConfigError
from ptqlab.models.registry import get_adapter
from ptqlab.models.weights import weight_matrix
from ptqlab.nn.capture import capture_inputs, layer_output
from ptqlab.quant import QuantSpec, fake_quantize
from ptqlab.testing import TINY_FAMILIES, tiny_model


def _calib(model, n=6, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, t), generator=g)


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_gptq_pass_outputs_match_a_plain_forward_of_the_quantized_model(family):
    """The outputs the sequential pass hands to the next layer are those of the quantized layer."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = _calib(model)
    plan = plan_quantization(model, {"weight": {"bits": 4}}, [{"gptq": {}}], ids)
    plan = dataclasses.replace(plan, batch_size=4)  # two chunks of different size: 4 + 2
    report = run_quantization(model, plan, progress=False)
    n_lin = len(adapter.linear_names()) * len(adapter.layers(model))
    assert len(report.records) == n_lin
    assert all(r.rel_error is not None and r.rel_error >= 0 for r in report.records)
    # every quantized weight sits on a 4-bit per-row grid: at most 16 distinct values per row
    layer0 = adapter.layers(model)[0]
    for rel in adapter.linear_names():
        w = weight_matrix(layer0.get_submodule(rel))
        assert max(len(torch.unique(row)) for row in w) <= 16, rel
    logits = _logits(model, ids[:2])
    assert torch.isfinite(logits).all()


def test_sequential_pass_feeds_quantized_outputs_forward():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    ids = _calib(model, n=4)
    plan = plan_quantization(model, {"weight": {"bits": 3}}, [{"gptq": {}}], ids)
    plan = dataclasses.replace(plan, batch_size=2)
    from ptqlab.pipeline import sequential

    seen = []
    real = sequential.run_layer_pass

    def spy(layer, groups, hidden, calls, observe, apply, input_map=None):
        inputs = list(hidden)
        out = real(layer, groups, hidden, calls, observe, apply, input_map)
        assert all(h is None for h in hidden)  # consumed
        hidden = inputs
        with torch.inference_mode():
            again = [layer_output(layer(h, *c.args, **c.kwargs)) for h, c in zip(hidden, calls, strict=True)]
        seen.append(max(float((a - b).abs().max()) for a, b in zip(out, again, strict=True)))
        return out

    sequential.run_layer_pass = spy
    import ptqlab.pipeline.driver as driver

    driver.run_layer_pass = spy
    try:
        run_quantization(model, plan, progress=False)
    finally:
        sequential.run_layer_pass = real
        driver.run_layer_pass = real
    assert len(seen) == len(layers)
    assert max(seen) < 1e-5  # the pass's outputs are the quantized layer's outputs


def test_rtn_needs_no_calibration_and_equals_fake_quantize():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    before = {n: weight_matrix(m).clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    spec = {"bits": 4, "granularity": "group", "group_size": 16}
    plan = plan_quantization(model, {"weight": spec}, [{"rtn": {}}], None)
    assert plan.calibration is None
    run_quantization(model, plan, progress=False)
    for name, w in before.items():
        got = weight_matrix(model.get_submodule(name))
        torch.testing.assert_close(got, fake_quantize(w, QuantSpec(**spec)))
    assert len(adapter.layers(model)) == 2


def test_bits16_installs_nothing_and_changes_nothing():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m).__name__ for m in model.modules()]
    for scheme in ({}, {"weight": {"bits": 16}}, {"weight": None}):
        plan = plan_quantization(model, scheme, [{"gptq": {}}], None)
        report = run_quantization(model, plan, progress=False)
        assert report.records == []
    assert modules == [type(m).__name__ for m in model.modules()]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_overrides_later_entries_win_and_fp_layers_untouched():
    model = tiny_model("llama")
    w0 = weight_matrix(model.model.layers[0].mlp.down_proj).clone()
    scheme = {"weight": {"bits": 4}, "overrides": [
        {"match": r".*down_proj", "weight": {"bits": 8}},
        {"match": r"model\.layers\.0\..*", "weight": None},
    ]}
    plan = plan_quantization(model, scheme, [], None)
    bits = {t.name: t.spec.bits for t in plan.targets}
    assert "model.layers.0.mlp.down_proj" not in bits and bits["model.layers.1.mlp.down_proj"] == 8
    assert bits["model.layers.1.self_attn.q_proj"] == 4
    run_quantization(model, plan, progress=False)
    assert torch.equal(weight_matrix(model.model.layers[0].mlp.down_proj), w0)


def test_plan_errors_before_any_work():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"does not divide the input width 64 of module model\.layers\.0\."):
        plan_quantization(model, {"weight": {"bits": 4, "granularity": "group", "group_size": 48}}, [], None)
    with pytest.raises(ConfigError, match="matches no module"):
        plan_quantization(model, {"weight": {"bits": 4}, "overrides": [{"match": "nothing", "weight": None}]}, [], None)
    with pytest.raises(ConfigError, match="needs calibration"):
        plan_quantization(model, {"weight": {"bits": 4}}, [{"gptq": {}}], None)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_capture_records_each_layer_call():
    model = tiny_model("gemma2")
    layers = get_adapter(model).layers(model)
    ids = _calib(model, n=3)
    cap = capture_inputs(model, layers, list(ids.split(2)))
    assert len(cap.hidden) == 2 and cap.hidden[0].shape[:2] == (2, 16)
    assert all(len(c) == 2 for c in cap.calls)
    assert all("forward" not in vars(layer) for layer in layers)  # recorders removed


def test_lean_malloc_is_active_on_glibc():
    import platform

    from ptqlab.pipeline.malloc import lean_malloc

    with lean_malloc() as ok:
        assert ok is (platform.libc_ver()[0] == "glibc")
