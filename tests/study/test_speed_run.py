"""``evaluate.speed`` through the run path: the run written as GGUF and timed in llama.cpp, or timed in torch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from ptqlab.cli import main
from ptqlab.export.run import export_config
from ptqlab.models.loading import load_model
from ptqlab.store import Store
from ptqlab.study.config import parse_config

pytest.importorskip("llama_cpp")

SPEED = {"prompt": 16, "generate": 4, "repeats": 2, "threads": 1}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama whose widths are whole GGUF blocks, with stories260K's SentencePiece tokenizer."""
    out = tmp_path_factory.mktemp("speed-llama")
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    load_model("stories260k", "float32", "cpu").tokenizer.save_pretrained(out)
    return out


def _config(model: Path, weight: dict | None, speed: dict, **scheme: object) -> dict:
    return {"model": str(model), "device": "cpu", "scheme": {"weight": weight, **scheme}, "recipe": [],
            "calibration": {"samples": 2, "seqlen": 32},
            "evaluate": {"perplexity": ["wikitext2"], "seqlen": 32, "max_windows": 1, "speed": speed}}


def _run(tmp_path: Path, cfg: dict, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, dict[str, float]]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    db = tmp_path / "s.db"
    code = main(["--store", str(db), "run", str(path), "--quiet"])
    err = capsys.readouterr().err
    if code != 0:
        return code, err, {}
    runs = Store(str(db)).list_runs()
    assert len(runs) == 1 and runs[0].status == "done", runs[0].error
    return code, err, {m.name: m.value for m in runs[0].metrics}


def test_a_gguf_run_is_timed_in_llama_cpp_with_the_exported_files_size(llama, tmp_path, capsys):
    cfg = _config(llama, {"format": "gguf_q8_0"}, SPEED)
    code, err, metrics = _run(tmp_path, cfg, capsys)
    assert code == 0, err
    for name in ("speed.llama_cpp.pp16", "speed.llama_cpp.tg4", "memory.llama_cpp.peak", "size.file.gguf"):
        assert math.isfinite(metrics[name]) and metrics[name] > 0, name
    out = tmp_path / "export"  # the file the measure timed is the one `ptqlab export` writes
    export_config(parse_config(cfg), "gguf", out, progress=False)
    assert metrics["size.file.gguf"] == (out / "model.gguf").stat().st_size


def test_an_fp_run_is_timed_as_f16(llama, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code, err, f16 = _run(tmp_path / "a", _config(llama, None, {**SPEED, "float_type": "f16"}), capsys)
    assert code == 0, err
    code, err, f32 = _run(tmp_path / "b", _config(llama, None, {**SPEED, "float_type": "f32"}), capsys)
    assert code == 0, err
    assert f16["size.file.gguf"] < f32["size.file.gguf"]  # the 2-D tensors at half the bytes


def test_a_kv_cache_llama_cpp_holds_is_passed_and_one_it_cannot_is_refused(llama, tmp_path, capsys):
    kv = {"bits": 8, "symmetric": True, "granularity": "group", "group_size": 32}
    (tmp_path / "a").mkdir()
    code, err, metrics = _run(tmp_path / "a", _config(llama, {"format": "gguf_q4_0"}, SPEED, kv_cache=kv), capsys)
    assert code == 0, err
    assert "speed.llama_cpp.tg4" in metrics
    (tmp_path / "b").mkdir()
    code, err, _ = _run(tmp_path / "b", _config(llama, None, SPEED, kv_cache={"bits": 4}), capsys)
    assert code != 0 and "scheme.kv_cache" in err
    assert not (tmp_path / "b" / "s.db").exists() or not Store(str(tmp_path / "b" / "s.db")).list_runs()


@pytest.mark.parametrize(("scheme", "speed", "message"), [
    ({"weight": {"bits": 4}}, SPEED, "evaluate.speed runtime llama.cpp runs the model written as GGUF"),
    ({"weight": {"format": "gguf_q8_0"}, "activation": {"bits": 8}}, SPEED, "scheme.activation"),
    ({"weight": None}, {**SPEED, "runtime": "vllm"}, "vllm"),
])
def test_what_a_runtime_cannot_time_is_refused_before_any_work(llama, tmp_path, capsys, scheme, speed, message):
    if speed.get("runtime") == "vllm" and torch.cuda.is_available():
        pytest.skip("the refusal without a CUDA device")
    cfg = _config(llama, None, speed)
    cfg["scheme"] = scheme
    code, err, _ = _run(tmp_path, cfg, capsys)
    assert code != 0 and message in err
    assert not (tmp_path / "s.db").exists() or not Store(str(tmp_path / "s.db")).list_runs()


def test_torch_runtime_times_ptqlabs_own_model(llama, tmp_path, capsys):
    code, err, metrics = _run(tmp_path, _config(llama, {"bits": 4}, {**SPEED, "runtime": "torch"}), capsys)
    assert code == 0, err
    assert metrics["speed.torch.pp16"] > 0 and metrics["speed.torch.tg4"] > 0 and "size.file.gguf" not in metrics


def test_the_python_api_times_a_quantized_model_from_its_report(llama: Path) -> None:
    """ptqlab.evaluate(report=...) writes the GGUF from quantize's grids; without the report it refuses first."""
    import ptqlab
    from ptqlab.errors import ConfigError

    loaded = load_model(str(llama), "float32", "cpu")
    report = ptqlab.quantize(loaded.model, {"weight": {"format": "gguf_q8_0"}}, [{"rtn": {}}], progress=False)
    speed = {"speed": {"runtime": "llama.cpp", "prompt": 16, "generate": 4, "repeats": 1, "threads": 1}}
    result = ptqlab.evaluate(loaded.model, loaded.tokenizer, speed, report=report, progress=False)
    got = {m.name: m.value for m in result.metrics}
    assert got["speed.llama_cpp.tg4"] > 0 and got["size.file.gguf"] > 0
    with pytest.raises(ConfigError, match="report="):
        ptqlab.evaluate(loaded.model, loaded.tokenizer, speed, progress=False)
