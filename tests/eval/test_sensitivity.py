"""Per-layer sensitivity against the FP model on the same tokens."""

from __future__ import annotations

import math

import torch

from ptqlab.api import quantize
from ptqlab.eval.sensitivity import compare, record_outputs
from ptqlab.models.registry import get_adapter
from ptqlab.testing import tiny_model

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def test_fp_against_itself_has_no_error() -> None:
    model = tiny_model("gpt2").eval()
    adapter = get_adapter(model)
    found = compare(model, adapter, IDS, record_outputs(model, adapter, IDS))
    assert len(found) == 2 * (len(adapter.linear_names()) + 1)
    assert all(s.rel_error == 0 and math.isinf(s.sqnr_db) for s in found)


def test_quantized_modules_deviate_and_fewer_bits_deviate_more() -> None:
    errs = {}
    for bits in (8, 3):
        model = tiny_model("llama").eval()
        adapter = get_adapter(model)
        fp = record_outputs(model, adapter, IDS)
        quantize(model, {"weight": {"bits": bits, "granularity": "channel"}}, progress=False)
        found = {s.module: s for s in compare(model, adapter, IDS, fp)}
        errs[bits] = found
        first = found["model.layers.0.self_attn.q_proj"]
        assert first.rel_error > 0 and math.isclose(first.sqnr_db, -20 * math.log10(first.rel_error), rel_tol=1e-6)
    assert all(errs[3][m].rel_error > errs[8][m].rel_error for m in errs[8])


def test_a_linear_the_model_does_not_call_is_measured_from_its_input() -> None:
    """Mamba's mixer multiplies by dt_proj.weight itself: its output is computed from the input it reads."""
    model = tiny_model("mamba").eval()
    adapter = get_adapter(model)
    fp = record_outputs(model, adapter, IDS)
    name = f"{adapter.layers_path}.0.mixer.dt_proj"
    dt = model.get_submodule(name)
    assert fp[name].shape[-1] == dt.out_features
    quantize(model, {"weight": {"bits": 3, "granularity": "channel"}}, progress=False)
    found = {s.module: s for s in compare(model, adapter, IDS, fp)}
    assert found[name].rel_error > 0 and len(found) == 2 * (len(adapter.linear_names()) + 1)


def test_a_mixture_of_experts_compares_its_layers_and_shared_linears() -> None:
    """Quantization can change a token's experts: expert outputs are not paired, the layers' outputs are."""
    model = tiny_model("mixtral").eval()
    adapter = get_adapter(model)
    fp = record_outputs(model, adapter, IDS)
    quantize(model, {"weight": {"bits": 2, "granularity": "channel"}}, progress=False)
    found = {s.module: s for s in compare(model, adapter, IDS, fp)}
    assert f"{adapter.layers_path}.0" in found and f"{adapter.layers_path}.0.self_attn.q_proj" in found
    assert not [m for m in found if ".experts." in m]
    assert found[f"{adapter.layers_path}.1"].rel_error > 0
