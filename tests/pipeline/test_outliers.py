"""LLM.int8-style outlier decomposition: the rule, the weight and activation sides, sizes, reuse, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptqlab.compile import bind, compile_config
from ptqlab.errors import ConfigError
from ptqlab.methods.gptq import GPTQ
from ptqlab.methods.rtn import RTN
from ptqlab.models.loading import load_model
from ptqlab.pipeline.outliers import quantize_decomposed
from ptqlab.pipeline.quantize import quantize
from ptqlab.pipeline.stream import check_quantization_streamable
from ptqlab.quant.outliers import INDEX_BITS, OutlierRule
from ptqlab.quant.size import bits_per_element
from ptqlab.quant.spec import QuantSpec
from ptqlab.study.config import parse_config
from ptqlab.study.worker import Worker

EVAL = {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 2, "sensitivity": None, "sample": None}


def _config(scheme: dict, recipe: list | None = None) -> dict:
    return {"model": "stories260k", "scheme": scheme, "recipe": recipe or [{"rtn": {}}], "evaluate": EVAL,
            "calibration": {"samples": 4, "seqlen": 64, "batch_size": 4}}


def test_the_rule_selects_by_threshold_or_top_fraction() -> None:
    absmax = torch.tensor([0.5, 7.0, 6.0, 9.0, 1.0, 9.0])
    assert OutlierRule().select(absmax).tolist() == [False, True, False, True, False, True]
    assert OutlierRule(threshold=0.9).select(absmax).sum() == 5
    assert OutlierRule(fraction=0.5).select(absmax).nonzero().flatten().tolist() == [1, 3, 5]
    assert OutlierRule(fraction=0.01).select(absmax).nonzero().flatten().tolist() == [3]  # at least one; ties stable


@pytest.mark.parametrize(("outliers", "message"), [
    ({"threshold": 0.0}, "threshold=0.0 must be > 0"),
    ({"threshold": -1.0}, "must be > 0"),
    ({"fraction": 1.0}, "fraction=1.0 must be in"),
])
def test_a_bad_rule_is_one_clear_error(outliers: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compile_config(parse_config(_config({"weight": {"bits": 8}, "outliers": outliers})))


def test_outliers_need_something_quantized_and_refuse_scale_transforms() -> None:
    with pytest.raises(ConfigError, match="quantizes no weight or activation"):
        compile_config(parse_config(_config({"outliers": {}})))
    with pytest.raises(ConfigError, match="smoothquant/awq"):
        compile_config(parse_config(_config({"weight": {"bits": 8}, "activation": {"bits": 8}, "outliers": {}},
                                            [{"smoothquant": {}}, {"rtn": {}}])))


def test_the_weight_side_is_the_quantization_of_the_other_columns_alone() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 64, generator=g)
    X[:, 5] *= 20
    X[:, 40] *= 15
    H = 2 * X.T @ X / 1024
    W = torch.randn(16, 64, generator=g) * 0.05
    W[:, 40] = 0.9  # a large weight column: outside, it no longer sets the rows' ranges
    keep = torch.zeros(64, dtype=torch.bool)
    keep[[5, 40]] = True
    spec = QuantSpec(bits=4, symmetric=True)
    for method, hess in ((GPTQ(), H), (RTN(), None)):
        out = quantize_decomposed(method, W, spec, hess, keep).weight
        alone = method.quantize(W[:, ~keep], spec, None if hess is None else H[~keep][:, ~keep]).weight
        assert torch.equal(out[:, ~keep], alone)
        assert torch.equal(out[:, keep], W[:, keep].half().float())


def _planted() -> tuple[dict, torch.nn.Module, object]:
    """stories260K with one input feature of layer 0's attention made an outlier (its norm weight x 60)."""
    cfg = parse_config(_config({"weight": {"bits": 4, "symmetric": True}, "activation": {"bits": 4},
                                "outliers": {"threshold": 6.0}}))
    lm = load_model(cfg.model, cfg.dtype, "cpu")
    with torch.no_grad():
        lm.model.model.layers[0].input_layernorm.weight[3] *= 60
    plan = bind(compile_config(cfg), lm.model, lm.tokenizer)
    return cfg, lm.model, plan


def test_a_planted_outlier_column_stays_fp16_in_weights_and_activations() -> None:
    _, model, plan = _planted()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    report = quantize(model, plan.quantization, progress=False)
    name = "model.layers.0.self_attn.q_proj"
    keep = report.outliers[name]
    assert bool(keep[3]) and torch.equal(keep, report.outliers["model.layers.0.self_attn.v_proj"])
    after = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(after[:, keep], before[:, keep].half().float())
    assert not torch.equal(after[:, ~keep], before[:, ~keep])
    quantizer = report.runtime.activations.quantizers[name]
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
    x[..., 3] *= 100
    out = quantizer(x)
    quantizer.clear()
    assert torch.equal(out[..., keep], x[..., keep].half().float())
    quantizer.keep = None
    regular = quantizer(x.masked_fill(keep, 0))  # the other columns: ranges without the outliers
    assert torch.equal(out[..., ~keep], regular[..., ~keep])
    bits = {m.name: m.value for m in report.metrics}
    base = plan.quantization.size_metrics(model)  # the same plan counted without FP16 columns
    linears = [model.get_submodule(t.name) for t in plan.quantization.targets]
    params = sum(m.weight.numel() for m in linears)
    extra = sum(int(mask.sum()) * (model.get_submodule(n).out_features * (16 - 4) + INDEX_BITS)
                for n, mask in report.outliers.items())
    assert bits["bits.weight"] == pytest.approx(base["bits.weight"] + extra / params, rel=1e-12)
    per_input = []
    for n, _, act in plan.quantization.activations:
        width, k = model.get_submodule(n).in_features, int(report.outliers[n].sum()) if n in report.outliers else 0
        b = bits_per_element(act.spec, width)
        per_input.append((b * (width - k) + 16 * k) / width)
    assert bits["bits.activation"] == pytest.approx(sum(per_input) / len(per_input), rel=1e-12)
    assert bits["bits.activation"] > base["bits.activation"]


def test_a_reused_quantized_model_gets_its_fp16_columns_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    scheme = {"weight": {"bits": 4}, "outliers": {"fraction": 0.05}}
    worker = Worker(progress=False)
    worker.run(parse_config(_config(scheme, [{"gptq": {}}])))
    w4a8 = parse_config(_config({**scheme, "activation": {"bits": 8}}, [{"gptq": {}}]))
    reused = worker.run(w4a8)
    assert reused.timings["qmodel_reused"] == 1.0
    alone = Worker(progress=False, share=False, reuse=False).run(w4a8)
    assert [(m.name, m.value) for m in reused.metrics] == [(m.name, m.value) for m in alone.metrics]


def test_streaming_refuses_the_whole_model_pass() -> None:
    _, _, plan = _planted()
    with pytest.raises(ConfigError, match="scheme.outliers"):
        check_quantization_streamable(plan.quantization)
