"""Mixture-of-experts families (Mixtral, Qwen3-MoE): every expert's matrices quantized as linears of their own."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ptqlab.api import plan_quantization, quantize, run_quantization
from ptqlab.errors import ConfigError, DataError, UnsupportedModelError
from ptqlab.methods.base import relative_output_error
from ptqlab.methods.gptq import GPTQ, GPTQConfig
from ptqlab.methods.rtn import RTN
from ptqlab.models.experts import ExpertLinear
from ptqlab.models.registry import get_adapter
from ptqlab.models.weights import weight_matrix, weight_parameter
from ptqlab.pipeline.plan import RunOptions
from ptqlab.quant.size import weight_storage_bits
from ptqlab.quant.spec import QuantSpec
from ptqlab.testing import EXPERTS, TINY_MOE_FAMILIES, tiny_config, tiny_model

SEQ = 16
CAL = torch.randint(3, 128, (4, SEQ), generator=torch.Generator().manual_seed(7))
ONLY_LAYER0_EXPERTS = [
    {"match": r"model\.layers\.1\..*", "weight": None},  # layer 0's experts only: attention stays FP
    {"match": r".*self_attn\..*", "weight": None},
]


def _ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _fused(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the fused expert parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 3}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(before[k], v) for k, v in now.items())


def _forced_experts(rows: int, rare: int = 1) -> torch.Tensor:
    """Each flattened token's two experts: 0 always; ``rare`` at sequence positions 0 mod 4, else 2."""
    pos = torch.arange(rows) % SEQ
    second = torch.where(pos % 4 == 0, rare, 2)
    return torch.stack([torch.zeros_like(second), second], dim=1)  # (rows, 2)


@contextmanager
def _forced_routing(model: nn.Module, reach_3_every: int = 0) -> Iterator[None]:
    """Replace every router's choice with :func:`_forced_experts` (scores 0.7 and 0.3).

    Expert 3 takes expert 1's tokens in every ``reach_3_every``-th call of each router, from its first
    (never when 0), and gets no token in the others.
    """
    calls: dict[int, int] = {}

    def hook(m: nn.Module, _args: Any, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        logits = out[0]
        calls[id(m)] = calls.get(id(m), 0) + 1
        rare = 3 if reach_3_every and (calls[id(m)] - 1) % reach_3_every == 0 else 1
        index = _forced_experts(logits.shape[0], rare).to(logits.device)
        scores = torch.tensor([0.7, 0.3], dtype=out[1].dtype).expand(logits.shape[0], 2).to(logits.device)
        return logits, scores, index

    adapter = get_adapter(model)
    assert adapter.experts is not None
    handles = [layer.get_submodule(adapter.experts.router).register_forward_hook(hook)
               for layer in adapter.layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_experts_run_through_their_linears_with_the_eager_floats(family: str) -> None:
    """Exposing the experts keeps the parameters, the state dict and transformers' eager output, bit for bit."""
    model = tiny_model(family)
    model.set_experts_implementation("eager")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    ref = _logits(model, ids)
    adapter = get_adapter(model)
    assert _unchanged(model, state)
    assert torch.equal(_logits(model, ids), ref)
    assert len(adapter.groups) == 2 + 2 * EXPERTS
    assert get_adapter(model).groups == adapter.groups  # exposing again changes nothing
    assert sum(isinstance(m, ExpertLinear) for m in model.modules()) == 2 * 2 * EXPERTS


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_every_matrix_of_a_layer_is_an_attention_linear_an_expert_slice_or_the_router(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.experts is not None
    layer = adapter.layers(model)[0]
    slices: dict[int, set[int]] = {}
    for rel in adapter.linear_names():
        module = layer.get_submodule(rel)
        param = weight_parameter(module)
        if isinstance(module, ExpertLinear):
            assert param.dim() == 3 and weight_matrix(module).data_ptr() == param[module.index].data_ptr()
            slices.setdefault(id(param), set()).add(module.index)
        else:
            slices[id(param)] = {0}
    router = layer.get_submodule(adapter.experts.router).get_parameter("weight")
    matrices = {id(p): p for p in layer.parameters() if p.dim() >= 2}
    assert set(matrices) - set(slices) == {id(router)}  # the router stays in full precision, in no group
    assert all(slices[i] == set(range(EXPERTS)) for i, p in matrices.items() if p.dim() == 3)


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_fused_parameters_are_quantized_per_expert(family: str) -> None:
    """Quantizing the fused parameter equals quantizing each expert's slice alone (one range per expert)."""
    model = tiny_model(family)
    before = _fused(model)
    plan = plan_quantization(model, {"weight": {"bits": 3, "granularity": "tensor"}})
    run_quantization(model, plan, progress=False)
    spec = plan.targets[0].spec
    after = _fused(model)
    for name, fused in before.items():
        per_expert = torch.stack([RTN().quantize(fused[e], spec).weight for e in range(EXPERTS)])
        torch.testing.assert_close(after[name], per_expert, rtol=0, atol=0, msg=name)
        all_at_once = RTN().quantize(fused.reshape(-1, fused.shape[-1]), spec).weight.reshape(fused.shape)
        assert not torch.equal(after[name], all_at_once), name  # the test tells the two apart


class _Recording:
    """GPTQ that keeps the Hessian of each linear it quantizes, and the weight it was given and returned, in order."""

    kind: ClassVar[str] = "quantizer"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, inner: GPTQ) -> None:
        self.inner = inner
        self.hessians: list[torch.Tensor] = []
        self.weights: list[tuple[torch.Tensor, torch.Tensor]] = []  # (W given, GPTQ's Q(W)), float32

    @property
    def min_tokens(self) -> int:
        return self.inner.min_tokens

    @property
    def permutes_columns(self) -> bool:
        return self.inner.permutes_columns

    def check_spec(self, spec: QuantSpec) -> None:
        self.inner.check_spec(spec)

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> Any:
        assert H is not None
        self.hessians.append(H.clone())
        result = self.inner.quantize(W, spec, H)
        self.weights.append((W.detach().float().clone(), result.weight.detach().float().clone()))
        return result


def _norm_outputs(model: nn.Module, chunks: list[torch.Tensor]) -> torch.Tensor:
    """Layer 0's post-attention norm output on every chunk, flattened (tokens, hidden), routing forced."""
    norm = get_adapter(model).layers(model)[0].get_submodule("post_attention_layernorm")
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().reshape(-1, out.shape[-1])))
    try:
        with _forced_routing(model), torch.no_grad():
            for chunk in chunks:
                model(chunk, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.double().t() @ x.double()


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
@pytest.mark.parametrize("min_tokens", [1, 20])
def test_gptq_hessians_come_from_the_routed_tokens_only(
    family: str, min_tokens: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Experts 0, 1, 2 get 64, 16 and 48 tokens and expert 3 none: each Hessian is 2/n X_e^T X_e of its own
    tokens (down's through the quantized gate_up); below ``min_tokens`` an expert is rounded to nearest."""
    model = tiny_model(family)
    plan = plan_quantization(model, {"weight": {"bits": 4}, "overrides": ONLY_LAYER0_EXPERTS},
                             [{"gptq": {"min_tokens": min_tokens}}], CAL)
    plan = dataclasses.replace(plan, batch_size=3)  # two chunks: 3 windows, then 1
    recorder = _Recording(GPTQ(GPTQConfig(min_tokens=min_tokens)))
    plan.recipe.quantizer = recorder
    spec = plan.targets[0].spec
    x = _norm_outputs(model, list(CAL.split(plan.batch_size)))  # (64, hidden): the FP model's, as attention stays FP
    expert_of = _forced_experts(x.shape[0])
    experts = get_adapter(model).layers(model)[0].get_submodule("mlp.experts")
    original = _fused(model)
    with _forced_routing(model), caplog.at_level(logging.WARNING):
        report = run_quantization(model, plan, progress=False)
    tokens = {0: 64, 1: 16, 2: 48, 3: 0}
    by_name = {r.module.removeprefix("model.layers.0.mlp.experts."): r for r in report.records}
    assert set(by_name) == {f"{e}.{m}" for e in range(EXPERTS) for m in ("gate_up_proj", "down_proj")}
    hessians = iter(recorder.hessians)
    gate_up_all = original["model.layers.0.mlp.experts.gate_up_proj"]
    down_all = original["model.layers.0.mlp.experts.down_proj"]
    for e in range(EXPERTS):
        gate_up, down = by_name[f"{e}.gate_up_proj"], by_name[f"{e}.down_proj"]
        assert gate_up.tokens == down.tokens == tokens[e]
        now_gate_up = weight_matrix(experts.get_submodule(f"{e}.gate_up_proj")).detach()
        now_down = weight_matrix(experts.get_submodule(f"{e}.down_proj")).detach()
        if tokens[e] < min_tokens:  # rounded to nearest, and said so
            assert gate_up.fallback == down.fallback == "rtn"
            assert torch.equal(now_gate_up, RTN().quantize(gate_up_all[e], spec).weight)
            assert torch.equal(now_down, RTN().quantize(down_all[e], spec).weight)
            assert f"experts.{e}.gate_up_proj saw {tokens[e]} calibration tokens" in caplog.text
            continue
        assert gate_up.fallback is None and down.fallback is None
        x_e = x[(expert_of == e).any(dim=1)]  # the tokens routed to e, in token order
        h_gate_up, h_down = next(hessians), next(hessians)
        torch.testing.assert_close(h_gate_up.double(), _hessian(x_e), rtol=1e-5, atol=1e-6)
        gate, up = F.linear(x_e, now_gate_up).chunk(2, dim=-1)
        torch.testing.assert_close(h_down.double(), _hessian(F.silu(gate) * up), rtol=1e-4, atol=1e-6)
        # each expert's slice is GPTQ of that slice alone with its own Hessian
        assert torch.equal(now_gate_up, GPTQ().quantize(gate_up_all[e], spec, h_gate_up).weight)
    assert next(hessians, None) is None
    assert "experts.3.gate_up_proj saw 0 calibration tokens" in caplog.text


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_size_counts_every_expert(family: str) -> None:
    model = tiny_model(family)
    total = sum(p.numel() for p in model.parameters())
    fp = plan_quantization(model, None).size_metrics(model)
    assert fp["size.model_bytes"] == 2 * total and fp["bits.weight"] == 16  # no parameter counted twice
    plan = plan_quantization(model, {"weight": {"bits": 4, "granularity": "group", "group_size": 16}})
    spec = plan.targets[0].spec
    adapter = get_adapter(model)
    quantized = {id(p): p for layer in adapter.layers(model) for n, p in layer.named_parameters()
                 if p.dim() == 3 or ("self_attn" in n and n.endswith("proj.weight"))}
    bits = elements = 0
    for p in quantized.values():
        experts, rows, cols = p.shape if p.dim() == 3 else (1, *p.shape)
        bits += experts * weight_storage_bits(spec, rows, cols)
        elements += p.numel()
    assert sum(1 for p in quantized.values() if p.dim() == 3) == 2 * 2  # gate_up and down of 2 layers
    sizes = plan.size_metrics(model)
    assert sizes["bits.weight"] == pytest.approx(bits / elements)
    assert sizes["size.model_bytes"] == pytest.approx((bits + 16 * (total - elements)) / 8)


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_gptq_quantizes_every_expert_and_the_model_generates_with_a_quantized_kv_cache(family: str) -> None:
    """GPTQ + LoRC on every expert slice, natural routing: on each slice's own routed tokens (its Hessian, see
    the test above) GPTQ's output error is below RTN's, and LoRC then adds a rank-2 correction that brings the
    slice closer to its FP weights; the quantized KV cache changes the logits on top of the weights."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    fp = copy.deepcopy(model)
    ids = _ids()
    ref = _logits(model, ids)
    plan = plan_quantization(model, {"weight": {"bits": 4}, "kv_cache": {"bits": 4}},
                             [{"gptq": {}}, {"lorc": {"rank": 2}}], CAL)
    recorder = _Recording(GPTQ())
    plan.recipe.quantizer = recorder
    spec = plan.targets[0].spec
    report = run_quantization(model, plan, progress=False)
    names = {f"model.layers.{li}.{rel}" for li in range(2) for rel in adapter.linear_names()}
    assert {r.module for r in report.records} == names
    assert all(r.fallback is None and r.tokens for r in report.records)
    assert len(recorder.weights) == len(report.records)
    for record, H, (W, Q) in zip(report.records, recorder.hessians, recorder.weights, strict=True):
        name = record.module
        assert torch.equal(W, weight_matrix(fp.get_submodule(name)).float()), name  # the records' order
        rtn = RTN().quantize(W, spec).weight
        assert relative_output_error(W, Q, H) < relative_output_error(W, rtn, H), name  # measured: 0.33-0.74x
        now = weight_matrix(model.get_submodule(name)).detach().float()
        assert int(torch.linalg.matrix_rank(now - Q)) == 2, name
        assert torch.linalg.norm(W - now) < torch.linalg.norm(W - Q), name
    assert report.runtime is not None and report.runtime.kv is not None
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    generated = model.generate(ids[:1, :6], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 9)
    report.runtime.remove()
    assert not torch.allclose(_logits(model, ids), out)  # the KV cache quantizer was at work


def test_per_group_passes_give_the_one_pass_weights_with_an_expert_no_token_reaches() -> None:
    """The pass per group stops at every expert too, including one that is called with no token."""
    states = []
    for layer_pass in ("one", "per_group"):
        model = tiny_model("mixtral")
        plan = plan_quantization(model, {"weight": {"bits": 3}}, [{"gptq": {}}], CAL)
        plan = dataclasses.replace(plan, batch_size=3)
        with _forced_routing(model):
            report = run_quantization(model, plan, progress=False, options=RunOptions(layer_pass=layer_pass))
        assert {r.module for r in report.records if r.fallback} == {
            f"model.layers.{li}.mlp.experts.3.{m}" for li in range(2) for m in ("gate_up_proj", "down_proj")}
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_activations_of_every_expert_are_quantized_per_token() -> None:
    """Each expert reads its own routed tokens, each quantized to INT8 on its own range."""
    model = tiny_model("qwen3_moe")
    experts = get_adapter(model).layers(model)[1].get_submodule("mlp.experts")
    seen: dict[int, list[torch.Tensor]] = {}

    def keep(e: int) -> Any:
        return lambda _m, args: seen.setdefault(e, []).append(args[0].detach().clone())

    handles = [experts.get_submodule(f"{e}.gate_up_proj").register_forward_pre_hook(keep(e)) for e in range(EXPERTS)]
    report = quantize(model, {"activation": {"bits": 8, "granularity": "token"}}, progress=False)
    handles += [experts.get_submodule(f"{e}.gate_up_proj").register_forward_pre_hook(keep(e + EXPERTS))
                for e in range(EXPERTS)]
    try:
        _logits(model, _ids())
    finally:
        for h in handles:
            h.remove()
    assert report.runtime is not None and report.runtime.activations is not None
    for e in range(EXPERTS):
        fp, q = seen[e][-1], seen[e + EXPERTS][-1]
        assert fp.shape[0] > 0 and fp.shape == q.shape
        lo, hi = fp.amin(dim=1, keepdim=True).clamp(max=0), fp.amax(dim=1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / 255
        assert torch.all((q - fp).abs() <= scale / 2 + 1e-6), e
        assert not torch.equal(q, fp)


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
@pytest.mark.parametrize(
    ("scheme", "recipe", "match"),
    [
        ({"weight": {"bits": 4}}, [{"smoothquant": {}}], r"scaling .* cannot run on family {f}: .*router"),
        ({"weight": {"bits": 4}}, [{"awq": {}}], r"scaling .* cannot run on family {f}: .*router"),
        ({"weight": {"bits": 4}}, [{"rotation": {}}], r"rotation: family {f} has a router"),
        ({"weight": {"bits": 4}}, [{"gptq": {}}, {"zeroquant_local": {}}], r"refiners .* family {f}: .*fused 3-D"),
        ({"activation": {"bits": 8, "granularity": "tensor"}}, [], r"experts\.0\.gate_up_proj \(an expert\)"),
        ({"weight": {"bits": 4}}, [{"gptq": {"min_tokens": 0}}], r"recipe\.gptq\.min_tokens=0 must be at least 1"),
    ],
)
def test_what_cannot_run_on_experts_is_refused_before_any_work(
    family: str, scheme: dict, recipe: list, match: str
) -> None:
    model = tiny_model(family)
    get_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match.format(f=family)):
        quantize(model, scheme, recipe, CAL, progress=False)
    assert _unchanged(model, before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_static_ranges_need_a_calibration_token_at_every_expert() -> None:
    """Outlier columns and static ranges are found when some chunks give an expert no token; an expert that no
    chunk gives a token has no range: an error naming it."""
    scheme = {"activation": {"bits": 8, "granularity": "tensor", "dynamic": False}, "outliers": {"fraction": 0.05}}
    model = tiny_model("mixtral")
    plan = plan_quantization(model, scheme, [], CAL)
    # 4 chunks a pass: expert 3 gets tokens in the first only, expert 1 in the others only
    plan = dataclasses.replace(plan, batch_size=1)
    with _forced_routing(model, reach_3_every=4):
        report = run_quantization(model, plan, progress=False)
    assert report.runtime is not None and report.runtime.activations is not None
    assert all(q.static is not None for q in report.runtime.activations.quantizers.values())
    assert torch.isfinite(_logits(model, _ids())).all()
    model = tiny_model("mixtral")
    plan = plan_quantization(model, {"activation": scheme["activation"]}, [], CAL)
    with _forced_routing(model), pytest.raises(DataError, match=r"layers\.0\.mlp\.experts\.3\.gate_up_proj"):
        run_quantization(model, plan, progress=False)


def test_a_dense_layer_among_sparse_ones_is_refused() -> None:
    config = tiny_config("qwen3_moe")
    config.mlp_only_layers = [1]
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="layer 1 has no mlp.experts"):
        get_adapter(model)


def test_streaming_and_compressed_tensors_export_refuse_fused_experts() -> None:
    from ptqlab.formats.compressed import check_compressed
    from ptqlab.pipeline.stream import check_quantization_streamable

    model = tiny_model("mixtral")
    plan = plan_quantization(model, {"weight": {"bits": 4, "granularity": "channel"}})
    with pytest.raises(ConfigError, match="runtime.stream: family mixtral"):
        check_quantization_streamable(plan)
    with pytest.raises(ConfigError, match="compressed-tensors export of fused mixture-of-experts"):
        check_compressed(plan)
