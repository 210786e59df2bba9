"""Runtime timers: llama.cpp (a GGUF file timed in a child process) and torch (the model in memory).

The llama.cpp tests run the real llama.cpp (llama-cpp-python) on a tiny random Llama written by
``write_gguf``; they check what the timers return, never how fast anything is.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ptqlab.api import quantize
from ptqlab.errors import ConfigError, ModelLoadError
from ptqlab.eval.speed import (
    CACHE_TYPES,
    SpeedSample,
    check_llama_cpp,
    llama_cpp_cache_types,
    llama_cpp_speed,
    torch_speed,
)
from ptqlab.formats.gguf import write_gguf
from ptqlab.models.loading import load_model
from ptqlab.nn.kv_cache import QuantizedKVCache
from ptqlab.schema import KVCacheScheme
from ptqlab.testing import tiny_model

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (the dev extra installs it)")

SIZES: dict[str, Any] = {"prompt": 32, "generate": 8, "repeats": 2, "threads": 1}


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, Any]:
    """A random Llama with head_dim 32 (one llama.cpp cache block per head), stories260K's tokenizer."""
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, load_model("stories260k", "float32", "cpu").tokenizer


@pytest.fixture(scope="module")
def fp_gguf(llama: tuple[torch.nn.Module, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FP model as written by default (its own dtype: F32)."""
    path = tmp_path_factory.mktemp("gguf") / "fp.gguf"
    write_gguf(llama[0], llama[1], path, {})
    return path


@pytest.fixture(scope="module")
def f16_gguf(llama: tuple[torch.nn.Module, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FP model as llama.cpp's F16 row."""
    path = tmp_path_factory.mktemp("gguf") / "f16.gguf"
    write_gguf(llama[0], llama[1], path, {}, float_type="f16")
    return path


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _check(sample: SpeedSample, path: Path | None, runtime: str, prompt: int, generate: int, repeats: int) -> None:
    assert sample.runtime == runtime and (sample.prompt, sample.generate) == (prompt, generate)
    assert len(sample.pp) == len(sample.tg) == repeats
    assert all(math.isfinite(v) and v > 0 for v in (*sample.pp, *sample.tg))
    assert sample.threads >= 1 and sample.peak_bytes is not None and sample.peak_bytes > 0
    assert sample.file_bytes == (None if path is None else path.stat().st_size)
    metrics = {m.name: m for m in sample.metrics()}
    pp, tg = f"speed.{runtime}.pp{prompt}", f"speed.{runtime}.tg{generate}"
    expected = [pp, tg, f"memory.{runtime}.peak"] + ([] if path is None else ["size.file.gguf"])
    assert list(metrics) == expected
    assert metrics[pp].value == statistics.median(sample.pp) and metrics[tg].value == statistics.median(sample.tg)
    assert metrics[f"memory.{runtime}.peak"].value == sample.peak_bytes
    if path is not None:
        assert metrics["size.file.gguf"].value == path.stat().st_size


def test_float_type_sets_the_full_precision_tensors_and_leaves_norms_f32(
        llama: tuple[torch.nn.Module, Any], fp_gguf: Path, f16_gguf: Path, tmp_path: Path) -> None:
    auto, f16 = _types(fp_gguf), _types(f16_gguf)
    assert set(auto.values()) == {"F32"}
    matrices = ["token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    assert all(f16[k] == "F16" for k in matrices)
    assert f16["output_norm.weight"] == f16["blk.0.attn_norm.weight"] == "F32"
    assert fp_gguf.stat().st_size > f16_gguf.stat().st_size
    bf16 = tmp_path / "bf16.gguf"
    write_gguf(llama[0], llama[1], bf16, {}, float_type="bf16")
    types = _types(bf16)
    assert types["token_embd.weight"] == "BF16" and types["output_norm.weight"] == "F32"
    with pytest.raises(ConfigError, match="float_type='f8'"):
        write_gguf(llama[0], llama[1], tmp_path / "f8.gguf", {}, float_type="f8")


@needs_llama_cpp
def test_llama_cpp_speed_of_the_f16_row(f16_gguf: Path) -> None:
    sample = llama_cpp_speed(f16_gguf, **SIZES)
    _check(sample, f16_gguf, "llama_cpp", 32, 8, 2)
    assert sample.threads == 1


@needs_llama_cpp
def test_llama_cpp_speed_with_quantized_kv_cache(fp_gguf: Path) -> None:
    sample = llama_cpp_speed(fp_gguf, cache_type_k="q8_0", cache_type_v="q8_0", seed=1, **SIZES)
    _check(sample, fp_gguf, "llama_cpp", 32, 8, 2)


@needs_llama_cpp
def test_llama_cpp_failures_are_ptqlab_errors_naming_the_file(tmp_path: Path, fp_gguf: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ModelLoadError, match="missing.gguf") as info:
        llama_cpp_speed(missing, **SIZES)
    assert "stderr ends with" in str(info.value) and "failed to" in str(info.value)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(fp_gguf.read_bytes()[:100_000])
    with pytest.raises(ModelLoadError, match="corrupt.gguf") as info:
        llama_cpp_speed(corrupt, **SIZES)
    assert "could not load" in str(info.value)


def test_llama_cpp_arguments_are_checked_before_any_work(fp_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llama_cpp") is not None:  # these are checked once it is there
        with pytest.raises(ConfigError, match="cache_type_k='q3_0'"):
            llama_cpp_speed(fp_gguf, cache_type_k="q3_0")
        with pytest.raises(ConfigError, match="prompt=0"):
            llama_cpp_speed(fp_gguf, prompt=0)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(ConfigError, match=r"pip install 'ptqlab\[llamacpp\]'"):
        llama_cpp_speed(fp_gguf)
    with pytest.raises(ConfigError, match="needs llama-cpp-python"):
        check_llama_cpp()


@needs_llama_cpp
def test_cache_type_table_is_llama_cpps() -> None:
    import llama_cpp

    for name, value in CACHE_TYPES.items():
        constant = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
        assert constant in (None, value), name  # bf16 (30) has no constant in the bindings


def test_torch_speed_times_prompt_and_cached_generation() -> None:
    model = tiny_model("llama").eval()
    seen: list[int] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append(0 if cache is None else cache.get_seq_length())

    model.register_forward_pre_hook(record, with_kwargs=True)
    before = torch.get_num_threads()
    sample = torch_speed(model, prompt=16, generate=4, repeats=2, threads=1)
    assert torch.get_num_threads() == before
    _check(sample, None, "torch", 16, 4, 2)
    assert seen == [0, 0, 1, 2, 3] * 3  # the warm-up and two repeats; generation passes its cache back


def test_torch_speed_keeps_the_models_kv_quantization() -> None:
    model = tiny_model("llama").eval()
    quantize(model, {"kv_cache": {"bits": 4}}, progress=False)
    seen: list[tuple[bool, int]] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:  # runs after ptqlab's KV hook
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((isinstance(cache, QuantizedKVCache), cache.get_seq_length()))

    model.register_forward_pre_hook(record, with_kwargs=True)
    sample = torch_speed(model, prompt=8, generate=3, repeats=1, threads=1)
    _check(sample, None, "torch", 8, 3, 1)
    assert seen == [(True, 0), (True, 0), (True, 1), (True, 2)] * 2


def test_metrics_are_medians_with_the_standard_error() -> None:
    sample = SpeedSample("torch", 4, 2, pp=(10.0, 30.0, 20.0), tg=(5.0,), threads=1)
    pp, tg = sample.metrics()
    assert (pp.name, pp.value, pp.stderr) == ("speed.torch.pp4", 20.0, pytest.approx(10.0 / math.sqrt(3)))
    assert (tg.name, tg.value, tg.stderr) == ("speed.torch.tg2", 5.0, None)


def _kv(**fields: Any) -> KVCacheScheme:
    return KVCacheScheme.model_validate(fields)


BLOCK = {"granularity": "group", "group_size": 32}


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, (None, None)),
    ({"bits": 16}, (None, None)),
    ({"bits": 8, "symmetric": True, **BLOCK}, ("q8_0", "q8_0")),
    ({"bits": 4, "symmetric": True, **BLOCK}, ("q4_0", "q4_0")),
    ({"bits": 5, "symmetric": True, **BLOCK}, ("q5_0", "q5_0")),
    ({"bits": 4, "zero_point": "float", **BLOCK}, ("q4_1", "q4_1")),
    ({"bits": 5, "zero_point": "float", **BLOCK}, ("q5_1", "q5_1")),
    ({"key": {"bits": 8, "symmetric": True, **BLOCK}}, ("q8_0", None)),
    ({"bits": 4, "symmetric": True, **BLOCK, "value": {"bits": 8}}, ("q4_0", "q8_0")),
    ({"bits": 4, "zero_point": "float", **BLOCK, "key": {"bits": 16}}, (None, "q4_1")),
])
def test_kv_cache_sections_llama_cpp_holds(fields: dict[str, Any], expected: tuple[str | None, str | None]) -> None:
    assert llama_cpp_cache_types(_kv(**fields) if fields else None) == expected
    if not fields:
        assert llama_cpp_cache_types(_kv()) == (None, None)


@pytest.mark.parametrize(("fields", "message"), [
    ({"bits": 4}, r"scheme\.kv_cache\.key: llama\.cpp's cache types are blocks of 32 along head_dim .* not 4-bit "
                  r"asymmetric per head with zero_point: int; set granularity: group, group_size: 32"),
    ({"bits": 8, "symmetric": True, "granularity": "group", "group_size": 64}, "per group 64; set granularity"),
    ({"bits": 8, "symmetric": True, "granularity": "channel"}, "per channel; set granularity"),
    ({"bits": 4, **BLOCK}, "with zero_point: int; set zero_point: float"),
    ({"bits": 8, "zero_point": "float", **BLOCK}, r"8-bit asymmetric .*set symmetric: true \(q8_0\)"),
    ({"bits": 3, "symmetric": True, **BLOCK}, "3-bit symmetric per group 32; set bits: 4, 5 or 8"),
    ({"bits": 2, "zero_point": "float", **BLOCK}, "set bits: 4 or 5"),
    ({"bits": 8, "symmetric": True, **BLOCK, "value": {"bits": 4, "group_size": 64}},
     r"scheme\.kv_cache\.value: .* not 4-bit symmetric per group 64"),
    ({"bits": 8, "symmetric": True, **BLOCK, "where": "pre_rope"}, "where=pre_rope.*set where: post_rope"),
    ({"bits": 8, "symmetric": True, **BLOCK, "mode": "decode"}, "mode=decode.*set mode: all"),
])
def test_kv_cache_sections_llama_cpp_cannot_hold_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        llama_cpp_cache_types(_kv(**fields))
