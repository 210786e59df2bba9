"""Rotation: orthogonal, exact on RMSNorm pre-norm families, refused clearly elsewhere; W4A4 holds up."""

from __future__ import annotations

import pytest
import torch

from ptqlab.api import quantize
from ptqlab.errors import ConfigError
from ptqlab.methods import build_recipe
from ptqlab.methods.rotation import hadamard, random_rotation
from ptqlab.testing import tiny_model

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
EXACT = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


@pytest.mark.parametrize("d", [64, 576, 1536, 7, 96])
def test_rotations_are_orthogonal_and_apply_matches_the_matrix(d: int) -> None:
    R = random_rotation(d, seed=3)
    Q = R.matrix()
    torch.testing.assert_close(Q @ Q.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-10)
    x = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(R.apply(x), x @ Q, rtol=0, atol=1e-10)


def test_hadamard_rows_are_orthogonal() -> None:
    H = hadamard(16)
    assert torch.equal(H @ H.T, 16 * torch.eye(16, dtype=torch.float64))


@pytest.mark.parametrize("family", EXACT)
def test_rotation_keeps_the_fp_output(family: str) -> None:
    model = tiny_model(family).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.dim() == 1:  # norms that are not all ones, with outliers
                p.copy_(p + torch.rand(p.shape, generator=g))
                p[::9] *= 10.0
        ref = model(IDS).logits
    quantize(model, None, [{"rotation": {"seed": 1}}], progress=False)
    with torch.no_grad():
        out = model(IDS).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "gpt2", "bloom", "falcon", "gpt_neox", "gemma2", "gemma3"])
def test_unsupported_families_are_refused_before_any_work(family: str) -> None:
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="rotation"):
        quantize(model, {"weight": {"bits": 4}}, [{"rotation": {}}], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rotation_goes_first() -> None:
    with pytest.raises(ConfigError, match="put it first"):
        build_recipe([{"gptq": {}}, {"rotation": {}}])
    assert build_recipe([{"rotation": {}}, {"gptq": {}}]).model_transforms


def test_rotation_helps_w4a4_on_outlier_activations() -> None:
    errs = {}
    scheme = {"weight": {"bits": 4, "granularity": "channel"}, "activation": {"bits": 4}}
    for name, recipe in (("plain", [{"rtn": {}}]), ("rotated", [{"rotation": {}}, {"rtn": {}}])):
        model = tiny_model("llama").eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n and p.dim() == 1:
                    p[::9] *= 20.0  # outlier channels in the residual stream
            ref = model(IDS).logits
        quantize(model, scheme, recipe, progress=False)
        with torch.no_grad():
            errs[name] = float((model(IDS).logits - ref).norm() / ref.norm())
    assert errs["rotated"] < errs["plain"]


def test_rotated_keys_spread_outlier_channels() -> None:
    from ptqlab.nn.context import ForwardContext
    from ptqlab.nn.kv_cache import QuantizedKVCache
    from ptqlab.nn.specs import kv_specs

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 10, 64, generator=g)
    k[..., 3] *= 30.0  # an outlier channel, as keys have
    errs = {}
    for rotate in (False, True):
        kv = kv_specs({"bits": 4, "granularity": "head"})
        assert kv is not None
        kv = type(kv)(kv.key, kv.value, kv.where, kv.mode, rotate_keys=rotate)
        cache = QuantizedKVCache(kv, ForwardContext())
        keys, _ = cache.update(k, k.clone(), 0)
        errs[rotate] = float((keys - k).norm() / k.norm())
    assert errs[True] < errs[False]


def test_rotation_kv_needs_a_kv_scheme() -> None:
    with pytest.raises(ConfigError, match="quantizes nothing"):
        quantize(tiny_model("llama"), {"weight": {"bits": 4}}, [{"rotation": {"kv": True}}], progress=False)
    logits = {}
    for bits, kv in ((16, False), (4, False), (4, True), (8, True)):
        model = tiny_model("llama").eval()
        scheme = {"kv_cache": {"bits": bits}} if bits < 16 else {}
        quantize(model, scheme, [{"rotation": {"kv": kv, "online_down": False}}], progress=False)
        with torch.no_grad():
            logits[bits, kv] = model(IDS).logits
    fp = logits[16, False]
    assert not torch.allclose(logits[4, True], logits[4, False])  # kv: true quantizes keys in another basis
    for key in ((4, False), (4, True), (8, True)):
        assert 0 < float((logits[key] - fp).norm() / fp.norm()) < 0.5, key
    assert (logits[8, True] - fp).norm() < (logits[4, True] - fp).norm()
