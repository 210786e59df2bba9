"""Every family adapter describes its tiny random model faithfully."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from ptqlab.errors import UnsupportedModelError
from ptqlab.models.adapter import Adapter, FusedQKV, LinearGroup
from ptqlab.models.experts import ExpertLinear
from ptqlab.models.families import ADAPTERS
from ptqlab.models.heads import fused_qkv_rows, prev_rows_read
from ptqlab.models.inputs import input_site, register_input_hook
from ptqlab.models.registry import get_adapter, supported_classes
from ptqlab.models.weights import in_features, out_features, set_weight_matrix, stored_transposed, weight_matrix
from ptqlab.testing import (
    TINY_FAMILIES,
    TINY_MOE_FAMILIES,
    TINY_SSM_FAMILIES,
    TINY_VARIANTS,
    tiny_config,
    tiny_model,
)

ALL_TINY = TINY_FAMILIES + TINY_SSM_FAMILIES + TINY_MOE_FAMILIES + TINY_VARIANTS
EXPECTED_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "opt": "OPTForCausalLM",
    "bloom": "BloomForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "mamba": "MambaForCausalLM",
    "mamba2": "Mamba2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def _base_family(name: str) -> str:
    """The family of a tiny model name: itself, or the family a variant name starts with (``falcon_new``)."""
    return max((f for f in EXPECTED_CLASSES if name == f or name.startswith(f + "_")), key=len)


@pytest.fixture(scope="module", params=ALL_TINY)
def family_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Adapter]:
    model = tiny_model(request.param, seed=0)
    return request.param, model, get_adapter(model)


def _ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=gen)


def _linear_names(layer: nn.Module) -> list[str]:
    """Every linear of the layer: its modules, and each expert's slice of a fused 3-D expert parameter."""
    return [name for name, mod in layer.named_modules() if isinstance(mod, (nn.Linear, Conv1D, ExpertLinear))]


def _first_layer(model: nn.Module, adapter: Adapter) -> nn.Module:
    return adapter.layers(model)[0]


@contextmanager
def _capture(modules: dict[str, nn.Module], outputs: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Record the last input (or output) tensor of each module during a forward."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for key, mod in modules.items():
        if outputs:
            hook = mod.register_forward_hook(lambda _m, _a, out, key=key: seen.__setitem__(key, out.detach()))
        else:
            hook = mod.register_forward_pre_hook(lambda _m, args, key=key: seen.__setitem__(key, args[0].detach()))
        handles.append(hook)
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def test_registry_knows_every_family() -> None:
    classes = supported_classes()
    assert set(EXPECTED_CLASSES.values()) <= set(classes)
    assert classes == sorted(set(classes))
    assert set(TINY_FAMILIES + TINY_SSM_FAMILIES + TINY_MOE_FAMILIES) == set(EXPECTED_CLASSES)


def test_adapter_found_for_the_class(family_model: tuple[str, nn.Module, Adapter]) -> None:
    family, model, adapter = family_model
    base = _base_family(family)
    assert type(model).__name__ == EXPECTED_CLASSES[base]
    assert type(model).__name__ in adapter.classes
    assert adapter.family == base


def test_every_linear_in_exactly_one_group(family_model: tuple[str, nn.Module, Adapter]) -> None:
    _, model, adapter = family_model
    names = adapter.linear_names()
    assert len(names) == len(set(names)), "a linear is listed in two groups"
    for layer in adapter.layers(model):
        assert sorted(_linear_names(layer)) == sorted(names)


def test_weight_layout_matches_module_type(family_model: tuple[str, nn.Module, Adapter]) -> None:
    """GPT-2 stores its linears transposed (Conv1D), experts slices of 3-D parameters; the helpers read the layout."""
    _, model, adapter = family_model
    layer = _first_layer(model, adapter)
    for name in adapter.linear_names():
        module = layer.get_submodule(name)
        routed = adapter.group_of(name).routed
        expected = ExpertLinear if routed else Conv1D if adapter.family == "gpt2" else nn.Linear
        assert isinstance(module, expected)
        assert routed is (adapter.experts is not None and name.startswith(adapter.experts.module + "."))
        assert stored_transposed(module) is (expected is Conv1D)
        assert weight_matrix(module).shape == (out_features(module), in_features(module))


def test_final_norm_attention_and_k_projection_are_where_the_adapter_says(
    family_model: tuple[str, nn.Module, Adapter],
) -> None:
    """The final norm's output is what the LM head reads; each layer's attention module and k projection."""
    family, model, adapter = family_model
    norm = adapter.final_norm_module(model)
    if norm is None:
        assert family == "opt_post_ln"  # post-LN OPT (350M) ends in its last layer's norm
    else:
        head = model.get_output_embeddings()
        with _capture({"norm": norm}, outputs=True) as out, _capture({"head": head}, outputs=False) as inp, \
                torch.no_grad():
            model(_ids())
        torch.testing.assert_close(inp["head"], out["norm"])
    attention = adapter.attention_modules(model)
    assert len(attention) == len(adapter.layers(model))
    layer = _first_layer(model, adapter)
    assert layer.get_submodule(adapter.attention) is attention[0]
    if adapter.token_mixer == "ssm":  # the SSM mixer: no attention, no keys
        assert all("Mixer" in type(m).__name__ for m in attention)
        assert adapter.attention_refusal() is not None
        assert adapter.k_proj is None and adapter.fused_qkv is None and not adapter.has_rope
        return
    assert adapter.attention_refusal() is None
    assert all("Attention" in type(m).__name__ for m in attention)
    if adapter.fused_qkv is None:
        assert adapter.k_proj is not None and adapter.k_proj in adapter.linear_names()
        assert adapter.k_proj.startswith(adapter.attention + ".")
    else:
        assert adapter.k_proj is None
        assert adapter.fused_qkv.module.startswith(adapter.attention + ".")


def test_rotation_is_refused_where_it_would_not_be_exact() -> None:
    refused = {a.family for a in ADAPTERS if a.rotation_refusal() is not None}
    assert refused == {
        "opt", "bloom", "gpt2", "gpt_neox", "falcon", "gemma2", "gemma3", "glm4", "stablelm", "mamba", "mamba2",
        "mixtral", "qwen3_moe",
    }


def test_scaling_is_refused_only_where_a_group_cannot_fold() -> None:
    """Mamba's x_proj and out_proj read SiLU outputs that no op can scale; the experts of a mixture of experts
    share their norm with the router; every other family folds."""
    refused = {a.family for a in ADAPTERS if a.scaling_refusal() is not None}
    assert refused == {"mamba", "mixtral", "qwen3_moe"}
    mamba = next(a for a in ADAPTERS if a.family == "mamba")
    assert [g.name for g in mamba.groups if g.fold == "none"] == ["x", "out"]


def test_groups_share_input_width(family_model: tuple[str, nn.Module, Adapter]) -> None:
    _, model, adapter = family_model
    layer = _first_layer(model, adapter)
    for group in adapter.groups:
        widths = {in_features(layer.get_submodule(name)) for name in group.linears}
        assert len(widths) == 1, f"{group.name}: {widths}"


def _read_width(layer: nn.Module, adapter: Adapter, group: LinearGroup, config: Any) -> int:
    """Width of the part of prev_op's output that the group reads (fold='linear')."""
    assert group.prev_op is not None
    prev = layer.get_submodule(group.prev_op)
    if group.prev_part == "v":
        assert adapter.fused_qkv is not None and adapter.fused_qkv.module == group.prev_op
        return int(fused_qkv_rows(adapter.fused_qkv, config, out_features(prev))[2].numel())
    if group.prev_part == "up":
        return out_features(prev) // 2
    if group.prev_part == "lead":  # Mamba's x_proj output is [dt; B; C]: dt_proj reads time_step_rank rows
        return int(config.time_step_rank)
    return out_features(prev)


def test_prev_op_widths(family_model: tuple[str, nn.Module, Adapter]) -> None:
    _, model, adapter = family_model
    layer = _first_layer(model, adapter)
    for group in adapter.groups:
        width = in_features(layer.get_submodule(group.linears[0]))
        if group.prev_op is None:
            assert group.fold == "none"
            continue
        prev = layer.get_submodule(group.prev_op)  # raises when missing
        if group.fold == "norm":
            assert prev.get_parameter("weight").numel() == width, group.name
        elif group.fold == "linear":
            read = _read_width(layer, adapter, group, model.config)
            if group.name == "o" and read < width:
                # Grouped-query (or multi-query) attention: each value head serves width/read query
                # heads, so v is narrower than o's input; scales must be tied across those heads.
                assert width % read == 0
            else:
                assert read == width, group.name


def test_norm_and_activation_feed_their_group(family_model: tuple[str, nn.Module, Adapter]) -> None:
    """A group with fold 'norm' or 'none' reads exactly prev_op's output."""
    _, model, adapter = family_model
    layer = _first_layer(model, adapter)
    groups = [g for g in adapter.groups if g.prev_op is not None and g.fold in ("norm", "none")]
    prevs = {g.prev_op: layer.get_submodule(g.prev_op) for g in groups if g.prev_op}
    linears = {name: layer.get_submodule(name) for g in groups for name in g.linears}
    with _capture(prevs, outputs=True) as out, _capture(linears, outputs=False) as inp, torch.no_grad():
        model(_ids())
    for group in groups:
        for name in group.linears:
            torch.testing.assert_close(_flat(inp[name]), _flat(out[str(group.prev_op)]), msg=name)


@contextmanager
def _seen_input(model: nn.Module, adapter: Adapter, layer: nn.Module, linear: str) -> Iterator[list[torch.Tensor]]:
    """Record the input of ``linear`` where ptqlab's hooks see it (at the linear, or in prev_op's rows)."""
    seen: list[torch.Tensor] = []
    handle = register_input_hook(input_site(model.config, adapter, layer, linear), lambda x: seen.append(x.clone()))
    try:
        yield seen
    finally:
        handle.remove()


def test_linear_prev_op_rows_drive_the_group(family_model: tuple[str, nn.Module, Adapter]) -> None:
    """Zeroing the prev_op rows a fold='linear' group reads zeroes that group's input, and only those."""
    _, model, adapter = family_model
    for group in (g for g in adapter.groups if g.fold == "linear"):
        layer = _first_layer(model, adapter)
        prev = layer.get_submodule(str(group.prev_op))
        rows = prev_rows_read(model.config, adapter, layer, group)
        saved_w = weight_matrix(prev).detach().clone()
        bias: torch.Tensor | None = getattr(prev, "bias", None)
        saved_b = None if bias is None else bias.detach().clone()
        w = saved_w.clone()
        w[rows] = 0
        set_weight_matrix(prev, w)
        with torch.no_grad():
            if bias is not None:
                bias[rows] = 0
            with _seen_input(model, adapter, layer, group.linears[0]) as inp:
                model(_ids())
            assert torch.count_nonzero(inp[-1]) == 0, group.name
            set_weight_matrix(prev, saved_w)
            if bias is not None and saved_b is not None:
                bias.copy_(saved_b)
            with _seen_input(model, adapter, layer, group.linears[0]) as inp:
                model(_ids())
            assert torch.count_nonzero(inp[-1]) > 0, group.name


def test_input_site_holds_what_the_weight_multiplies(family_model: tuple[str, nn.Module, Adapter]) -> None:
    """Doubling a linear's input where its site sees it equals doubling its weight (W(2x) = (2W)x).

    This holds for linears the model never calls too (Mamba's dt_proj, seen in x_proj's leading rows).
    """
    _, model, adapter = family_model
    layer = _first_layer(model, adapter)
    ids = _ids(seed=5)
    for group in adapter.groups:
        linear = group.linears[0]
        module = layer.get_submodule(linear)
        site = input_site(model.config, adapter, layer, linear)
        assert (site.rows is None) is group.called, linear
        with torch.no_grad():
            base = model(ids).logits
            handle = register_input_hook(site, lambda x: 2 * x)
            try:
                doubled_input = model(ids).logits
            finally:
                handle.remove()
            saved = weight_matrix(module).detach().clone()
            set_weight_matrix(module, 2 * saved)
            try:
                doubled_weight = model(ids).logits
            finally:
                set_weight_matrix(module, saved)
        assert not torch.allclose(doubled_input, base), linear
        torch.testing.assert_close(doubled_input, doubled_weight, rtol=1e-4, atol=1e-5, msg=linear)


def test_quantized_weights_forward(family_model: tuple[str, nn.Module, Adapter]) -> None:
    family, _, _ = family_model
    model = tiny_model(family, seed=1)  # a fresh copy: this test changes weights
    adapter = get_adapter(model)
    ids = _ids(seed=3)
    with torch.no_grad():
        before = model(ids).logits
        for layer in adapter.layers(model):
            for name in adapter.linear_names():
                module = layer.get_submodule(name)
                set_weight_matrix(module, torch.round(weight_matrix(module) * 8) / 8)
        after = model(ids).logits
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)


def test_fused_qkv_rows_partition() -> None:
    class Cfg:
        num_attention_heads = 4
        num_kv_heads = 2

    for fused in (
        FusedQKV("x", interleaved=False),
        FusedQKV("x", interleaved=True),
        FusedQKV("x", interleaved=True, kv_heads_attr="num_kv_heads"),
        FusedQKV("x", interleaved=False, multi_query=True),
    ):
        kv = 1 if fused.multi_query else (2 if fused.kv_heads_attr else 4)
        total = (4 + 2 * kv) * 8
        q, k, v = fused_qkv_rows(fused, Cfg(), total)
        assert (q.numel(), k.numel(), v.numel()) == (32, kv * 8, kv * 8)
        assert torch.equal(torch.cat([q, k, v]).sort().values, torch.arange(total))
    # Falcon-40B-style grouping: per KV head [q, q, k, v]
    q, k, v = fused_qkv_rows(FusedQKV("x", True, "num_kv_heads"), Cfg(), 64)
    assert v[:8].tolist() == list(range(24, 32)) and k[:8].tolist() == list(range(16, 24))


def test_model_type_fallback() -> None:
    class MyLlamaForCausalLM(LlamaForCausalLM):
        pass

    torch.manual_seed(0)
    config = tiny_config("llama")
    assert isinstance(config, LlamaConfig)
    model = MyLlamaForCausalLM(config)
    assert get_adapter(model).family == "llama"


def test_unsupported_config_variant() -> None:
    config = tiny_config("falcon")
    config.multi_query = False  # parallel attention without multi-query: no real checkpoint has it
    model = tiny_model("falcon")
    model.config = config
    with pytest.raises(UnsupportedModelError, match="not with this configuration"):
        get_adapter(model)


def test_unsupported_class_lists_supported() -> None:
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM") as info:
        get_adapter(nn.Linear(2, 2))
    assert "Linear" in str(info.value)
    for cls in EXPECTED_CLASSES.values():
        assert cls in str(info.value)


@pytest.mark.parametrize(
    ("family", "variant", "qkv_bias", "second_norm"),
    [
        ("stablelm", "sequential", False, True),
        ("stablelm_qkv_bias", "sequential", True, True),
        ("stablelm_parallel", "parallel-residual", False, False),
    ],
)
def test_stablelm_layouts(family: str, variant: str, qkv_bias: bool, second_norm: bool) -> None:
    """The config picks StableLM's adapter (parallel residual: one norm feeds attention and the MLP)."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.extra["variant"] == variant
    layer = _first_layer(model, adapter)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert (layer.get_submodule(f"self_attn.{proj}").bias is not None) is qkv_bias
    assert (layer.post_attention_layernorm is not None) is second_norm
    norms = {g.prev_op for g in adapter.groups if g.fold == "norm"}
    assert norms == ({"input_layernorm", "post_attention_layernorm"} if second_norm else {"input_layernorm"})


def test_a_group_the_model_does_not_call_needs_its_input() -> None:
    with pytest.raises(ValueError, match="need prev_op"):
        LinearGroup("dt", ("mixer.dt_proj",), called=False)
    with pytest.raises(KeyError, match="no linear group"):
        get_adapter(tiny_model("llama")).group_of("mlp.nothing")


def test_adapters_are_unique_per_condition() -> None:
    keys = [(cls, a.when) for a in ADAPTERS for cls in a.classes]
    assert len(keys) == len(set(keys))


def test_weight_matrix_linear_and_conv1d() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    conv = Conv1D(3, 5)  # nf=out, nx=in; stores (in, out)
    for mod in (lin, conv):
        assert (in_features(mod), out_features(mod)) == (5, 3)
        assert weight_matrix(mod).shape == (3, 5)
        x = torch.randn(4, 5)
        torch.testing.assert_close(mod(x), x @ weight_matrix(mod).T + mod.bias)
        new = torch.arange(15, dtype=torch.float64).view(3, 5)
        set_weight_matrix(mod, new)
        assert mod.weight.dtype == torch.float32
        torch.testing.assert_close(weight_matrix(mod), new.float())
        with pytest.raises(ValueError, match="shape"):
            set_weight_matrix(mod, new.T)
    with pytest.raises(TypeError):
        weight_matrix(nn.LayerNorm(4))
