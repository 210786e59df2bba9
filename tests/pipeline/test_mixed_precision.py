"""Mixed precision through the overrides: FP first layer, 8-bit down_proj, per-module activations."""

from __future__ import annotations

import pytest

from ptqlab.api import plan_quantization
from ptqlab.errors import ConfigError
from ptqlab.testing import tiny_model

SCHEME = {
    "weight": {"bits": 4, "granularity": "channel"},
    "activation": {"bits": 8},
    "overrides": [
        {"match": r"model\.layers\.0\..*", "weight": None, "activation": None},
        {"match": r".*down_proj", "weight": {"bits": 8}},
        {"match": r".*o_proj", "activation": {"bits": 4}},
    ],
}


def test_overrides_set_weights_and_activations_apart() -> None:
    model = tiny_model("llama")
    plan = plan_quantization(model, SCHEME)
    weights = {t.name: t.spec.nbits for t in plan.targets}
    assert "model.layers.0.self_attn.q_proj" not in weights  # FP: the first override
    assert weights["model.layers.0.mlp.down_proj"] == 8  # later entries win
    assert weights["model.layers.1.mlp.down_proj"] == 8
    assert weights["model.layers.1.self_attn.q_proj"] == 4
    acts = {name: a.spec.nbits for name, _, a in plan.activations}
    assert "model.layers.0.mlp.up_proj" not in acts
    assert acts["model.layers.0.self_attn.o_proj"] == 4  # later entries win
    assert acts["model.layers.1.self_attn.o_proj"] == 4
    assert acts["model.layers.1.mlp.down_proj"] == 8  # the weight-only override leaves activations alone
    sizes = plan.size_metrics(model)
    assert 4 < sizes["bits.weight"] < 16


def test_override_that_matches_nothing_fails() -> None:
    bad = {**SCHEME, "overrides": [{"match": r".*nope", "activation": None}]}
    with pytest.raises(ConfigError, match="matches no module"):
        plan_quantization(tiny_model("llama"), bad)
