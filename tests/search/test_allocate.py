"""Allocations as run configurations on stories260K: overrides that resolve to the allocation, sizes that agree."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest

from ptqlab.compile import bind, compile_config
from ptqlab.metrics import BITS_WEIGHT, SIZE_MODEL_BYTES
from ptqlab.models.loading import load_model
from ptqlab.models.registry import get_adapter
from ptqlab.search import parse_search
from ptqlab.search.allocate import allocation_config, random_allocation, read_allocation
from ptqlab.search.rule import rule_allocation, use_more_bits
from ptqlab.search.units import build_units
from ptqlab.study.config import parse_config

MENU = [{"bits": 3, "granularity": "channel"}, {"bits": 4, "granularity": "group", "group_size": 4,
                                                "symmetric": True}, {"format": "nf4"}, {"bits": 8}]
FILE = {"model": "stories260k", "evaluate": {"divergence": {"seqlen": 64, "windows": 2}},
        "search": {"menu": MENU, "budget": {"bits": [5.0]}}}


@pytest.fixture(scope="module")
def setting():
    lm = load_model("stories260k")
    search = parse_search(FILE)
    return lm, search


@pytest.mark.parametrize("unit", ["module", "layer"])
def test_the_overrides_written_resolve_to_the_allocation_and_its_size(setting, unit: str) -> None:
    lm, search = setting
    units = build_units(lm.model, get_adapter(lm.model), search.menu, unit)
    assert len(units.units) == (35 if unit == "module" else 5)
    base = search.base.model_dump(mode="json")
    rng = random.Random(7)
    for _ in range(4):
        choice = tuple(rng.randrange(len(MENU)) for _ in units.units)
        data = allocation_config(base, units, choice, search.menu)
        cfg = parse_config(copy.deepcopy(data))
        assert read_allocation(cfg.model_dump(mode="json"), units, search.menu) == choice
        # the pipeline's own resolution (plan_weights: fullmatch, later entries win) gives each module its menu spec
        model = copy.deepcopy(lm.model)
        plan = bind(compile_config(cfg), model, lm.tokenizer).quantization
        menu_specs = [replace(parse_config({**base, "scheme": {"weight": w}})._compiled.scheme.weight_spec, where="")
                      for w in search.menu]
        want = {name: menu_specs[m] for u, m in zip(units.units, choice, strict=True) for name in u.modules}
        got = {t.name: replace(t.spec, where="") for t in plan.targets}
        assert got == want
        sizes = plan.size_metrics(model)  # the size accounting a run stores
        assert sizes[BITS_WEIGHT] == units.weight_bits(choice)
        assert sizes[SIZE_MODEL_BYTES] == units.model_bytes(choice)


def test_random_allocations_fit_their_budget_and_repeat_with_their_seed(setting) -> None:
    lm, search = setting
    units = build_units(lm.model, get_adapter(lm.model), search.menu, "module")
    capacity = units.capacity("bits", 5.0)
    draws = [random_allocation(units, capacity, random.Random("0:bits:5.0")) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(3)
    many = {random_allocation(units, capacity, rng) for _ in range(20)}
    assert len(many) == 20 and all(units.total_bits(c) <= capacity for c in many)
    assert all(units.weight_bits(c) > 4.5 for c in many)  # filled up to near the budget


def test_the_rule_moves_value_and_down_projections_of_llama_cpps_layers_one_type_up(setting) -> None:
    lm, search = setting
    units = build_units(lm.model, get_adapter(lm.model), search.menu, "module")
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    choice = rule_allocation(units, 1)
    up = {u.name for u, m in zip(units.units, choice, strict=True) if m == 2}
    assert set(choice) == {1, 2}
    # 5 layers: llama.cpp's rule picks layer 4 (the last eighth) and layer 2 ((i - 0) % 3 == 2)
    assert up == {f"model.layers.{i}.{rel}" for i in (2, 4) for rel in ("self_attn.v_proj", "mlp.down_proj")}


def test_a_bytes_budget_is_the_model_size_runs_store(setting) -> None:
    lm, search = setting
    units = build_units(lm.model, get_adapter(lm.model), search.menu, "module")
    rng = random.Random(11)
    for _ in range(20):
        choice = tuple(rng.randrange(len(MENU)) for _ in units.units)
        size = units.model_bytes(choice)
        assert units.total_bits(choice) <= units.capacity("bytes", size)
        assert units.total_bits(choice) > units.capacity("bytes", size - 1)
    lo, hi = units.feasible("bytes")
    assert lo == units.model_bytes([0] * len(units.units)) and hi == units.model_bytes([3] * len(units.units))
