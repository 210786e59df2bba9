"""Runtime quantization (activations, KV cache, attention inputs) on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from ptqlab.api import plan_quantization, quantize, run_quantization
from ptqlab.errors import ConfigError
from ptqlab.models.registry import get_adapter
from ptqlab.nn import kv_cache
from ptqlab.nn.kv_cache import QuantizedKVCache
from ptqlab.nn.specs import kv_specs
from ptqlab.testing import TINY_FAMILIES, tiny_model

ROPE_FAMILIES = ("llama", "qwen3", "gpt_neox", "gemma2", "phi3")


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _logits(model: torch.nn.Module, ids: torch.Tensor, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


def _per_token_asym_int8(x: torch.Tensor) -> torch.Tensor:
    """The per-token asymmetric INT8 formula, written out row by row."""
    rows = x.reshape(-1, x.shape[-1]).double()
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        lo, hi = min(float(rows[r].min()), 0.0), max(float(rows[r].max()), 0.0)
        scale = (hi - lo) / 255 or 1.0
        zero = round(-lo / scale)
        q = torch.clamp(torch.round(rows[r] / scale) + zero, 0, 255)
        out[r] = scale * (q - zero)
    return out.reshape(x.shape)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a16_kv16_installs_nothing(family: str) -> None:
    model = tiny_model(family).eval()
    ids = _ids()
    ref = _logits(model, ids)
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    report = quantize(model, {"activation": {"bits": 16}, "kv_cache": {"bits": 16}}, progress=False)
    assert report.runtime is not None and not report.runtime.installed
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == n_hooks
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dynamic_per_token_equals_formula(family: str) -> None:
    model = tiny_model(family).eval()
    adapter = get_adapter(model)
    layer = adapter.layers(model)[1]
    report = quantize(model, {"activation": {"bits": 8, "granularity": "token"}}, progress=False)
    fp_in: dict[str, torch.Tensor] = {}
    q_in: dict[str, torch.Tensor] = {}
    for rel in adapter.linear_names():
        mod = layer.get_submodule(rel)
        mod.register_forward_pre_hook(lambda m, a, rel=rel: fp_in.__setitem__(rel, a[0].clone()), prepend=True)
        mod.register_forward_pre_hook(lambda m, a, rel=rel: q_in.__setitem__(rel, a[0].clone()))
    _logits(model, _ids())
    for rel in adapter.linear_names():
        torch.testing.assert_close(q_in[rel].double(), _per_token_asym_int8(fp_in[rel]), rtol=0, atol=1e-5)
    assert report.runtime is not None and report.runtime.installed


@pytest.mark.parametrize(
    "scheme",
    [
        {"activation": {"bits": 8, "granularity": "tensor", "symmetric": True}},
        {"activation": {"bits": 4, "granularity": "group", "group_size": 16}},
        {"kv_cache": {"bits": 4, "granularity": "channel"}},
        {"kv_cache": {"bits": 3, "granularity": "token"}, "activation": {"bits": 8}},
    ],
)
def test_results_do_not_depend_on_batch_or_padding(scheme: dict) -> None:
    model = tiny_model("llama").eval()
    quantize(model, scheme, progress=False)
    a, b = _ids(1, 12, seed=1), _ids(1, 7, seed=2)
    alone_a, alone_b = _logits(model, a), _logits(model, b)
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], dim=1)])
    mask = torch.ones_like(padded)
    mask[1, 7:] = 0  # right padding: real tokens keep their positions
    both = _logits(model, padded, attention_mask=mask)
    torch.testing.assert_close(both[0], alone_a[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(both[1, :7], alone_b[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_kv_quantized_in_prefill_and_every_decode_step(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(family).eval()
    n_layers = len(get_adapter(model).layers(model))
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = QuantizedKVCache.update

    def spy(self: QuantizedKVCache, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *a: object, **kw: object):
        keys, values = original(self, k, v, layer_idx, *a, **kw)
        calls.append((k, keys, values))
        return keys, values

    monkeypatch.setattr(QuantizedKVCache, "update", spy)
    quantize(model, {"kv_cache": {"bits": 4, "granularity": "head"}}, progress=False)
    spec = kv_specs({"bits": 4}).key  # type: ignore[union-attr]
    prompt, new = _ids(1, 6), 4
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert out.shape[1] == 6 + new
    assert len(calls) == n_layers * new  # one prefill + (new - 1) decode steps, every layer
    lengths = sorted(keys.shape[2] for _, keys, _ in calls[::n_layers])
    assert lengths == [6, 7, 8, 9]  # decode steps attend to the growing quantized cache, not a fresh one
    for k_in, keys, _ in calls:  # what attention reads ends with the quantized new keys
        t = k_in.shape[2]
        torch.testing.assert_close(keys[:, :, -t:], kv_cache.quantize_kv(k_in, spec), rtol=0, atol=0)
    calls.clear()
    _logits(model, _ids(), use_cache=False)  # no cache and use_cache=False: still quantized
    assert len(calls) == n_layers


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_decode_mode_keeps_fp_prompt_logits(family: str) -> None:
    model = tiny_model(family).eval()
    ids = _ids()
    ref = _logits(model, ids)
    quantize(model, {"kv_cache": {"bits": 2, "mode": "decode"}}, progress=False)
    assert torch.equal(_logits(model, ids), ref)
    model2 = tiny_model(family).eval()
    quantize(model2, {"kv_cache": {"bits": 2, "mode": "all"}}, progress=False)
    assert not torch.allclose(_logits(model2, ids), ref)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_pre_rope_keys_quantized_at_k_projection(family: str) -> None:
    model = tiny_model(family).eval()
    ids = _ids()
    ref = _logits(model, ids)
    quantize(model, {"kv_cache": {"bits": 3, "where": "pre_rope", "value": {"bits": 16}}}, progress=False)
    assert not torch.allclose(_logits(model, ids), ref)


def test_static_activation_ranges_from_calibration() -> None:
    model = tiny_model("llama").eval()
    cal = _ids(4, 16, seed=5)
    plan = plan_quantization(model, {"activation": {"bits": 8, "dynamic": False, "granularity": "tensor"}},
                             [], cal)
    report = run_quantization(model, plan, progress=False)
    assert report.runtime is not None and report.runtime.activations is not None
    q = next(iter(report.runtime.activations.quantizers.values()))
    assert q.static is not None and q.static.scale.numel() == 1
    _logits(model, _ids())


def test_attention_inputs_quantized_where_the_family_allows_it() -> None:
    model = tiny_model("llama").eval()
    ids = _ids()
    ref = _logits(model, ids)
    report = quantize(model, {"activation": {"bits": 4, "attention": True}}, progress=False)
    assert not torch.allclose(_logits(model, ids), ref)
    assert report.runtime is not None
    report.runtime.remove()
    assert torch.equal(_logits(model, ids), ref)
    with pytest.raises(ConfigError, match="hard-codes its attention"):
        quantize(tiny_model("bloom"), {"activation": {"bits": 8, "attention": True}}, progress=False)


@pytest.mark.parametrize(
    ("family", "scheme", "match"),
    [
        ("gpt2", {"kv_cache": {"bits": 4, "where": "pre_rope"}}, "has no RoPE"),
        ("llama", {"kv_cache": {"bits": 4, "granularity": "group", "group_size": 5}}, "does not divide head_dim"),
        ("llama", {"activation": {"bits": 8, "format": "fp9"}}, "format='fp9' is unknown"),
        ("llama", {"activation": {"bits": 4, "format": "fp8_e4m3"}}, "conflicts with format"),
        ("llama", {"weight": {"format": "mxfp4", "group_size": 64}}, "blocks of exactly 32"),
        ("llama", {"activation": {"bits": 8, "granularity": "head"}}, "not valid here"),
        ("llama", {"kv_cache": {"bits": 1}}, "out of range"),
    ],
)
def test_bad_runtime_input_fails_before_any_work(family: str, scheme: dict, match: str) -> None:
    model = tiny_model(family).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        quantize(model, scheme, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_padding_independence_for_every_family(family: str) -> None:
    model = tiny_model(family).eval()
    scheme = {"activation": {"bits": 6, "granularity": "tensor"}, "kv_cache": {"bits": 4, "granularity": "channel"}}
    quantize(model, scheme, progress=False)
    a, b = _ids(1, 10, seed=3), _ids(1, 6, seed=4)
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], dim=1)])
    mask = torch.ones_like(padded)
    mask[1, 6:] = 0
    both = _logits(model, padded, attention_mask=mask)
    torch.testing.assert_close(both[0], _logits(model, a)[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(both[1, :6], _logits(model, b)[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "llama"])  # eager and sdpa attention
def test_quantized_attention_inputs_keep_the_model_causal(family: str) -> None:
    """Future tokens never change earlier logits (transformers gets a mask function for ptqlab's attention)."""
    from ptqlab.nn.attention import install_attention_quantization
    from ptqlab.nn.context import ForwardContext
    from ptqlab.quant.spec import QuantSpec
    from ptqlab.testing import tiny_model

    model = tiny_model(family, seed=0)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 15:] = 3
    undo = install_attention_quantization(model, [layer.self_attn for layer in model.model.layers],
                                          QuantSpec(bits=8, granularity="token"), ForwardContext())
    try:
        with torch.no_grad():
            a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    finally:
        undo()
    assert torch.equal(a[0, :15], b[0, :15])
