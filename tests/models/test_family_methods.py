"""Every method path on the GLM, StableLM and Mamba families: what runs, and what is refused before any work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from ptqlab.api import plan_quantization, quantize, run_quantization
from ptqlab.errors import ConfigError
from ptqlab.models import get_adapter, input_site, register_input_hook, weight_matrix
from ptqlab.models.tiny import tiny_model

ATTENTION_FAMILIES = ("glm", "glm4", "stablelm", "stablelm_qkv_bias", "stablelm_parallel")
SSM_FAMILIES = ("mamba", "mamba2")
CAL = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(7))


def _ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _outlier_model(family: str) -> nn.Module:
    """A tiny model whose norms scale every 7th channel by 8 (activation outliers), as SmoothQuant's tests use."""
    model = tiny_model(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and p.dim() == 1:
                p[::7] *= 8.0
    return model


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(before[k], v) for k, v in now.items())


@pytest.mark.parametrize("family", ATTENTION_FAMILIES + SSM_FAMILIES)
def test_gptq_quantizes_every_linear_of_every_layer(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = _ids()
    ref = _logits(model, ids)
    plan = plan_quantization(model, {"weight": {"bits": 4}}, [{"gptq": {}}], CAL)
    plan.batch_size = 3  # two chunks (3 + 1): the sequential pass waits for both at every group
    report = run_quantization(model, plan, progress=False)
    names = {f"{adapter.layers_path}.{li}.{rel}" for li in range(2) for rel in adapter.linear_names()}
    assert {r.module for r in report.records} == names
    assert all(r.rel_error is not None for r in report.records)  # each group was observed (dt_proj too)
    for layer in adapter.layers(model):
        for rel in adapter.linear_names():
            w = weight_matrix(layer.get_submodule(rel))
            assert max(len(torch.unique(row)) for row in w) <= 16, rel  # a 4-bit grid per row
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


@pytest.mark.parametrize("family", [*ATTENTION_FAMILIES, "mamba2"])
def test_smoothquant_keeps_the_fp_function(family: str) -> None:
    """Scales fold into norms and the rows before o/down (biased v_proj, fused [gate; up], Mamba-2's gated norm)."""
    model = _outlier_model(family)
    ids = _ids()
    ref = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, None, [{"smoothquant": {"alpha": 0.5}}], CAL, progress=False)
    assert not _unchanged(model, before), "nothing was folded"
    # float32 folding; StableLM-2-12B's per-head q/k LayerNorm (16-wide heads here) amplifies its rounding
    # to about 2e-5, where a wrong fold moves the logits by 1e-1
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=5e-5)


@pytest.mark.parametrize("family", ["mamba", "glm4"])
@pytest.mark.parametrize("later", [{"lorc": {"rank": 2}}, {"zeroquant_local": {"steps": 2}}])
def test_compensators_and_refiners_run(family: str, later: dict) -> None:
    """LoRC and ZeroQuant-Local work on every quantized weight (Mamba's dt_proj is used by weight, not called)."""
    model = tiny_model(family)
    report = quantize(model, {"weight": {"bits": 4, "granularity": "group", "group_size": 4}}, [{"gptq": {}}, later],
                      CAL, progress=False)
    assert len(report.records) == 2 * len(get_adapter(model).linear_names())
    assert torch.isfinite(_logits(model, _ids())).all()


@pytest.mark.parametrize("family", ["glm", "mamba2", "stablelm_parallel"])
def test_awq_runs(family: str) -> None:
    model = tiny_model(family)
    ids = _ids()
    ref = _logits(model, ids)
    quantize(model, {"weight": {"bits": 4, "granularity": "group", "group_size": 32}}, [{"awq": {}}], CAL,
             progress=False)
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_rotation_keeps_glm_and_is_refused_where_it_would_not_be_exact() -> None:
    model = tiny_model("glm")
    ids = _ids()
    ref = _logits(model, ids)
    quantize(model, None, [{"rotation": {"seed": 0}}], progress=False)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    for family, reason in (
        ("glm4", "normalises sublayer outputs"),
        ("stablelm", "uses layernorm"),
        ("mamba", "linears inside each SSM mixer"),
        ("mamba2", "gated RMSNorm inside each mixer"),
    ):
        model = tiny_model(family)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ConfigError, match=f"rotation: family {family.split('_')[0]} .*{reason}"):
            quantize(model, {"weight": {"bits": 4}}, [{"rotation": {}}], progress=False)
        assert _unchanged(model, before)


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
@pytest.mark.parametrize("where", ["post_rope", "pre_rope"])
def test_kv_cache_quantized_in_prefill_and_decode(family: str, where: str) -> None:
    """Partial RoPE (GLM's interleaved, StableLM's) and per-head q/k LayerNorm: KV quantization still applies."""
    model = tiny_model(family)
    ids = _ids()
    ref = _logits(model, ids)
    report = quantize(model, {"kv_cache": {"bits": 3, "where": where}}, progress=False)
    assert report.runtime is not None and report.runtime.kv is not None
    assert not torch.allclose(_logits(model, ids), ref)
    out = model.generate(ids[:1, :6], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)


@contextmanager
def _inputs(model: nn.Module, store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record the input of every linear of layer 1 where ptqlab's hooks see it."""
    adapter = get_adapter(model)
    layer = adapter.layers(model)[1]
    handles = [
        register_input_hook(input_site(model.config, adapter, layer, rel), lambda x, rel=rel: store.__setitem__(
            rel, x.detach().clone()))
        for rel in adapter.linear_names()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric per-token INT8 fake quantization, written out."""
    rows = x.reshape(-1, x.shape[-1]).double()
    lo = rows.amin(dim=1, keepdim=True).clamp(max=0)
    hi = rows.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).masked_fill(hi == lo, 1.0)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(rows / scale) + zero, 0, 255)
    return (scale * (q - zero)).reshape(x.shape)


@pytest.mark.parametrize("family", [*SSM_FAMILIES, "glm", "stablelm_parallel"])
def test_dynamic_activations_quantize_every_linear_input(family: str) -> None:
    """Each linear reads its per-token INT8 input, dt_proj included (quantized in x_proj's leading rows)."""
    model = tiny_model(family)
    fp: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    with _inputs(model, fp):  # registered first: sees the inputs before the quantizers
        report = quantize(model, {"activation": {"bits": 8, "granularity": "token"}}, progress=False)
        with _inputs(model, seen):
            _logits(model, _ids())
    assert report.runtime is not None and report.runtime.installed
    assert set(seen) == set(get_adapter(model).linear_names())
    for rel, x in seen.items():
        torch.testing.assert_close(x.double(), _per_token_int8(fp[rel]), rtol=0, atol=1e-5, msg=rel)


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_ssm_static_activations_and_generation(family: str) -> None:
    model = tiny_model(family)
    ids = _ids()
    plan = plan_quantization(
        model, {"weight": {"bits": 8}, "activation": {"bits": 8, "dynamic": False, "granularity": "tensor"}},
        [], CAL,
    )
    report = run_quantization(model, plan, progress=False)
    assert report.runtime is not None and report.runtime.activations is not None
    assert all(q.static is not None for q in report.runtime.activations.quantizers.values())
    assert torch.isfinite(_logits(model, ids)).all()
    out = model.generate(ids[:1, :6], max_new_tokens=3, min_new_tokens=3, do_sample=False)  # SSM state cached
    assert out.shape == (1, 9)


@pytest.mark.parametrize("family", SSM_FAMILIES)
@pytest.mark.parametrize(
    ("scheme", "recipe", "match"),
    [
        ({"kv_cache": {"bits": 4}}, [], r"scheme.kv_cache: family mamba2? .*no KV cache"),
        ({"weight": {"bits": 4}, "kv_cache": {"bits": 8, "where": "pre_rope"}}, [{"gptq": {}}], "no KV cache"),
        ({"activation": {"bits": 8, "attention": True}}, [], r"scheme.activation.attention: .*no attention"),
    ],
)
def test_ssm_families_refuse_attention_parts_before_any_work(
    family: str, scheme: dict, recipe: list, match: str
) -> None:
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        quantize(model, scheme, recipe, CAL, progress=False)
    assert _unchanged(model, before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("recipe", [[{"smoothquant": {}}], [{"awq": {}}]])
def test_mamba_refuses_scaling_through_the_conv1d(recipe: list) -> None:
    model = tiny_model("mamba")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"cannot run on family mamba: .*conv1d.*absorb a per-channel scale"):
        quantize(model, {"weight": {"bits": 4}}, recipe, CAL, progress=False)
    assert _unchanged(model, before)
