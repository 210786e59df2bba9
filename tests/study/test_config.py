"""The config schema rejects bad input with the path of the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptqlab.errors import ConfigError
from ptqlab.store import qmodel_key, run_id
from ptqlab.study.config import load_config, parse_config

BASE = {"model": "stories260k", "scheme": {"weight": {"bits": 4}}, "recipe": [{"gptq": {"damp": 0.01}}]}


def _with(**changes):
    cfg = {**BASE}
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        (_with(modle="x"), r"modle: unknown key"),
        (_with(scheme={"weight": {"bits": 4, "bitz": 3}}), r"scheme\.weight\.bitz: unknown key"),
        (_with(scheme={"weight": {"bits": "4"}}), r"scheme\.weight\.bits"),
        (_with(scheme={"weight": {"bits": 33}}), r"scheme\.weight\.bits=33 is out of range"),
        (_with(scheme={"weight": {"bits": 4, "granularity": "group"}}), r"scheme\.weight\.group_size"),
        (_with(dtype="float64"), r"dtype"),
        (_with(device="tpu"), r"device"),
        (_with(recipe=[{"gptqq": {}}]), r"unknown method 'gptqq'"),
        (_with(recipe=[{"gptq": {"dampp": 0.1}}]), r"recipe\[0\]\.gptq\.dampp: unknown option"),
        (_with(recipe=[{"gptq": {"damp": 2.0}}]), r"damp=2.0"),
        (_with(recipe=[{"rtn": {}}, {"gptq": {}}]), r"more than one weight quantizer"),
        (_with(calibration={"samples": 0}), r"calibration\.samples"),
        (_with(evaluate={"perplexity": ["wikitext3"]}), r"wikitext3"),
        (_with(scheme={"activation": {"bits": 8, "granularity": "head"}}), r"scheme\.activation\.granularity"),
        (_with(scheme={"activation": {"format": "mxfp4", "group_size": 16}}), r"blocks of exactly 32"),
        (_with(scheme={"weight": {"format": "fp8_e5m2", "bits": 4}}), r"conflicts with format"),
        (_with(scheme={"weight": {"format": "fp7"}}), r"scheme\.weight\.format='fp7' is unknown"),
        (_with(scheme={"kv_cache": {"bits": 4, "granularity": "tensor"}}), r"scheme\.kv_cache\.key\.granularity"),
        (_with(scheme={"kv_cache": {"bits": 4, "mode": "later"}}), r"scheme\.kv_cache\.mode"),
        (_with(scheme={"activation": {"bits": 8, "dynamic": False, "clipping": "mse", "granularity": "tensor"}}),
         r"mse"),
        ({"scheme": {}}, r"model: Field required"),
    ],
)
def test_bad_configs(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(cfg)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_run_id_ignores_path_and_device_but_not_scheme():
    a = parse_config(BASE)
    b = parse_config(_with(model="/some/other/path", device="cpu"))
    c = parse_config(_with(scheme={"weight": {"bits": 3}}))
    assert run_id(a, "fp1") == run_id(b, "fp1")
    assert run_id(a, "fp1") != run_id(a, "fp2")
    assert run_id(a, "fp1") != run_id(c, "fp1")
    d = parse_config(_with(evaluate={"max_windows": 4}))
    assert qmodel_key(a, "fp1") == qmodel_key(d, "fp1") and run_id(a, "fp1") != run_id(d, "fp1")


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[2].glob("configs/examples/*.yaml")))
def test_example_configs_are_valid(path):
    assert load_config(path).model


def test_a_config_is_compiled_once(monkeypatch):
    """parse_config compiles (every error comes before a model loads); the runner reuses that compile."""
    import ptqlab.compile as compile_module

    calls = []
    real = compile_module.compile_scheme
    monkeypatch.setattr(compile_module, "compile_scheme", lambda *a: calls.append(1) or real(*a))
    cfg = parse_config(BASE)
    compiled = compile_module.compile_config(cfg)
    assert compile_module.compile_config(cfg) is compiled and len(calls) == 1
    assert compiled.scheme.recipe.steps == ["gptq"] and compiled.scheme.weight_spec.bits == 4


def test_kept_quantized_weights_are_keyed_by_the_code_that_made_them(monkeypatch, tmp_path):
    """A change to ptqlab's code (a method fixed) must not reuse weights the old code quantized."""
    from ptqlab.store import identity

    base = {"model": "stories260k", "scheme": {"weight": {"bits": 4}}}
    w4, w4a8 = parse_config(base), parse_config({**base, "scheme": {"weight": {"bits": 4}, "activation": {"bits": 8}}})
    key, rid = identity.weights_key(w4, "fp"), identity.run_id(w4, "fp")
    assert identity.weights_key(w4a8, "fp") == key  # activations do not change the weights
    assert identity.code_fingerprint() == identity.code_fingerprint.__wrapped__()  # the package's files
    monkeypatch.setattr(identity, "code_fingerprint", lambda: "another-version")
    assert identity.weights_key(w4, "fp") != key
    assert identity.run_id(w4, "fp") == rid  # a run's identity is its config and model alone
