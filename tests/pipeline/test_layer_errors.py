"""``calibration.layer_errors``: a recipe that needs no data measures each linear's output error, weights unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ptqlab.api import plan_quantization, run_quantization
from ptqlab.models.registry import get_adapter
from ptqlab.models.weights import weight_matrix
from ptqlab.schema import RunConfig
from ptqlab.store.identity import run_id, weights_key
from ptqlab.testing import tiny_model


def _ids(model, n=4, t=16):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))


def _rtn(recipe, layer_errors: bool):
    model = tiny_model("llama")
    ids = _ids(model)
    plan = plan_quantization(model, {"weight": {"bits": 3, "granularity": "group", "group_size": 16}}, recipe)
    if layer_errors:
        plan = dataclasses.replace(plan, calibration=ids, layer_errors=True, batch_size=2)
    report = run_quantization(model, plan, progress=False)
    return model, ids, report


@pytest.mark.parametrize("recipe", [[{"rtn": {}}], [{"rtn": {}}, {"lorc": {"rank": 4}}]])
def test_layer_errors_leave_the_weights_as_they_are(recipe):
    plain, _, plain_report = _rtn(recipe, layer_errors=False)
    measured, _, report = _rtn(recipe, layer_errors=True)
    assert all(r.rel_error is None for r in plain_report.records)
    assert [r.module for r in report.records] == [r.module for r in plain_report.records]
    assert all(r.rel_error is not None and r.rel_error > 0 and r.tokens == 4 * 16 for r in report.records)
    for (name, a), (_, b) in zip(plain.state_dict().items(), measured.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_layer_error_is_the_relative_output_error_on_the_layer_inputs():
    """Layer 0's q_proj: ||X (Q - W)^T|| / ||X W^T|| with X its input on the calibration tokens."""
    fp = tiny_model("llama")
    model, ids, report = _rtn([{"rtn": {}}], layer_errors=True)
    layer = get_adapter(fp).layers(fp)[0]
    seen: list[torch.Tensor] = []
    handle = layer.self_attn.q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.inference_mode():
        fp(input_ids=ids, use_cache=False)
    handle.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()
    W = weight_matrix(layer.self_attn.q_proj).detach().double()
    Q = weight_matrix(get_adapter(model).layers(model)[0].self_attn.q_proj).detach().double()
    expected = float(torch.linalg.norm(X @ (Q - W).T) / torch.linalg.norm(X @ W.T))
    got = next(r.rel_error for r in report.records if r.module.endswith("layers.0.self_attn.q_proj"))
    assert got == pytest.approx(expected, rel=1e-4)  # float32 Hessian of 64 tokens against float64 products


def test_layer_errors_key_the_weights_and_leave_older_run_ids_alone():
    base = {"model": "m", "scheme": {"weight": {"bits": 4}}, "recipe": [{"rtn": {}}]}
    plain = RunConfig.model_validate(base)
    off = RunConfig.model_validate({**base, "calibration": {"layer_errors": False}})
    on = RunConfig.model_validate({**base, "calibration": {"layer_errors": True}})
    assert run_id(plain, "f") == run_id(off, "f") != run_id(on, "f")
    assert weights_key(plain, "f") == weights_key(off, "f") != weights_key(on, "f")  # records are kept with weights
