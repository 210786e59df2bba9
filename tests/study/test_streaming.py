"""Layer streaming: a model quantized and evaluated one layer at a time gives the resident path's numbers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from ptqlab.errors import ConfigError, ModelLoadError
from ptqlab.models.loading import stories260k_dir
from ptqlab.models.shards import Checkpoint
from ptqlab.schema import parse_config
from ptqlab.store import Store, run_id
from ptqlab.study.streamed import choose_stream

HERE = Path(__file__).resolve().parent


def _random_llama(out: Path, layers: int, hidden: int, shard: str, tied: bool = False) -> Path:
    """A random Llama (vocabulary 512, stories260K's tokenizer) written as sharded safetensors."""
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, max_shard_size=shard)
    for f in stories260k_dir().iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, out)
    return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _random_llama(tmp_path_factory.mktemp("small") / "llama", 3, 64, "40KB", tied=True)


def _config(model: Path, tmp: Path, recipe: list, runtime: dict, name: str, embedding: dict | None = None) -> Path:
    data = {"model": str(model), "device": "cpu", "scheme": {"weight": {"bits": 4, "granularity": "group",
                                                                       "group_size": 32}, "embedding": embedding},
            "recipe": recipe, "calibration": {"dataset": "c4local", "samples": 4, "seqlen": 64},
            "evaluate": {"perplexity": ["wikitext2"], "seqlen": 128, "max_windows": 2,
                         "divergence": {"windows": 1, "seqlen": 128}},
            "runtime": runtime}
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


def _metrics(store: Path) -> dict[str, float]:
    (record,) = Store(str(store)).list_runs()
    assert record.status == "done", record.error
    return {m.name: m.value for m in record.metrics}


E4 = {"bits": 4, "granularity": "group", "group_size": 32}  # scheme.embedding: the embedding and its tied head


@pytest.mark.parametrize(("recipe", "embedding"), [([{"rtn": {}}], None), ([{"gptq": {}}], None),
                                                   ([{"gptq": {}}], E4)], ids=["rtn", "gptq", "gptq-embedding"])
def test_streamed_run_equals_resident(small: Path, tmp_path: Path, cache: Path, recipe: list,
                                      embedding: dict | None) -> None:
    from ptqlab.cli import main

    for mode in ("on", "off"):
        cfg = _config(small, tmp_path, recipe, {"stream": mode, "offload_dir": str(tmp_path / "off")}, f"{mode}.yaml",
                      embedding)
        assert main(["run", str(cfg), "--store", str(tmp_path / f"{mode}.db")]) == 0
    on, off = _metrics(tmp_path / "on.db"), _metrics(tmp_path / "off.db")
    assert set(on) == set(off)
    for name, value in off.items():  # the same floats: same batching, same kernels
        assert on[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    (written,) = (tmp_path / "off").iterdir()
    assert (written / "model.safetensors.index.json").is_file()


def test_runtime_is_not_identity(small: Path) -> None:
    base = {"model": str(small), "scheme": {"weight": {"bits": 4}}}
    ids = {run_id(parse_config({**base, "runtime": rt}), "fp") for rt in
           ({}, {"stream": "on", "max_memory": "1GiB"}, {"stream": False, "offload_dir": "/tmp/x"})}
    assert len(ids) == 1
    assert parse_config({**base, "runtime": {"stream": True}}).runtime.stream == "on"  # YAML's `on`


def test_bad_runtime_values() -> None:
    with pytest.raises(ConfigError, match="runtime.max_memory"):
        parse_config({"model": "m", "runtime": {"max_memory": "lots"}})
    with pytest.raises(ConfigError, match="runtime.stream"):
        parse_config({"model": "m", "runtime": {"stream": "sometimes"}})


def test_budget_below_one_layer_is_named(small: Path, tmp_path: Path) -> None:
    cfg = parse_config({"model": str(small), "runtime": {"stream": "on", "max_memory": "10KB",
                                                         "offload_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"one decoder layer needs [\d.]+ KiB at float32"):
        choose_stream(cfg)


def test_auto_streams_past_the_budget(small: Path, tmp_path: Path) -> None:
    fits = parse_config({"model": str(small), "runtime": {"max_memory": "1GiB", "offload_dir": str(tmp_path)}})
    tight = parse_config({"model": str(small), "runtime": {"max_memory": "300KB", "offload_dir": str(tmp_path)}})
    assert not choose_stream(fits).stream
    assert choose_stream(tight).stream


def test_auto_streams_onto_a_gpu_the_model_does_not_fit(small: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the GPU's free memory is a budget too: a model past it goes one layer at a time (no GPU needed)."""
    from ptqlab.study import streamed

    monkeypatch.setattr(streamed, "resolve_device", lambda _name: torch.device("cuda"))
    cfg = parse_config({"model": str(small), "device": "cuda",
                        "runtime": {"max_memory": "1GiB", "offload_dir": str(tmp_path)}})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _dev=None: (80 << 30, 80 << 30))
    assert not choose_stream(cfg).stream
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _dev=None: (300_000, 80 << 30))
    assert choose_stream(cfg).stream
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _dev=None: (10_000, 80 << 30))
    with pytest.raises(ConfigError, match=r"the GPU's free memory \(9.8 KiB\) is too small .* one decoder layer"):
        choose_stream(cfg)


def test_unwritable_offload_dir(small: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = parse_config({"model": str(small), "runtime": {"stream": "on", "offload_dir": str(blocker / "sub")}})
    with pytest.raises(ConfigError, match="runtime.offload_dir: cannot write"):
        choose_stream(cfg)


def test_missing_and_truncated_shards_are_named(small: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    name, shard = sorted(index.items())[-1]
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=rf"{re.escape(shard)} is truncated: tensor '.+' ends at byte"):
        Checkpoint(broken)
    (broken / shard).write_bytes(b"this is not a safetensors file")  # a header length past the end
    with pytest.raises(ModelLoadError, match=rf"corrupt or unreadable safetensors file .*{re.escape(shard)}"):
        Checkpoint(broken)
    (broken / shard).unlink()
    with pytest.raises(ModelLoadError, match=rf"{re.escape(shard)} is missing \(it holds tensor "):
        Checkpoint(broken)


def test_whole_model_methods_refuse_to_stream(small: Path, tmp_path: Path, cache: Path) -> None:
    from ptqlab.cli import main

    cfg = _config(small, tmp_path, [{"rotation": {}}, {"rtn": {}}], {"stream": "on", "offload_dir": str(tmp_path)},
                  "rot.yaml")
    assert main(["run", str(cfg), "--store", str(tmp_path / "s.db")]) == 2
    assert not (tmp_path / "s.db").exists() or not Store(str(tmp_path / "s.db")).list_runs()


def _cgroup_ok() -> bool:
    sys.path.insert(0, str(HERE))
    try:
        from capped_run import memory_cgroup
    finally:
        sys.path.pop(0)
    found = memory_cgroup()
    return found is not None and os.access(found[0].parent, os.W_OK)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _cgroup_ok(), reason="needs a writable memory cgroup")
def test_model_four_times_larger_than_its_memory(tmp_path: Path, cache: Path) -> None:
    """GPTQ W4 + perplexity + divergence of a 289 MB model with 72 MB of memory gives the resident numbers."""
    from ptqlab.cli import main

    model = _random_llama(tmp_path / "big", 128, 256, "20MB")
    size = Checkpoint(model).bytes_of("", 4)
    streamed = _config(model, tmp_path, [{"gptq": {}}], {"stream": "on", "offload_dir": str(tmp_path / "off")},
                       "s.yaml")
    env = {**os.environ, "PTQLAB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(HERE / "capped_run.py"), str(size // 4), str(streamed),
                           str(tmp_path / "s.db")], env=env, capture_output=True, text=True, timeout=900)
    group = re.search(r"new memory in (\S+)", proc.stdout)
    if group:
        Path(group.group(1)).rmdir()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    resident = _config(model, tmp_path, [{"gptq": {}}], {"stream": "off"}, "r.yaml")
    assert main(["run", str(resident), "--store", str(tmp_path / "r.db")]) == 0
    on, off = _metrics(tmp_path / "s.db"), _metrics(tmp_path / "r.db")
    for name, value in off.items():
        assert on[name] == pytest.approx(value, rel=1e-6), name


def test_streamed_tasks_equal_resident(small: Path, tmp_path: Path, cache: Path) -> None:
    """lm-eval tasks on a streamed model (every request layer-major) give the resident run's answers."""
    from ptqlab.cli import main

    for mode in ("on", "off"):
        data = yaml.safe_load(_config(small, tmp_path, [{"rtn": {}}], {"stream": mode, "offload_dir":
                                                                         str(tmp_path / "off")}, "x.yaml").read_text())
        data["evaluate"] = {"tasks": ["piqa", "lambada_openai"], "limit": 6}
        (tmp_path / f"{mode}.yaml").write_text(yaml.safe_dump(data))
        assert main(["run", str(tmp_path / f"{mode}.yaml"), "--store", str(tmp_path / f"{mode}.db")]) == 0
    on, off = _metrics(tmp_path / "on.db"), _metrics(tmp_path / "off.db")
    tasks = {k: v for k, v in off.items() if k.startswith("lm_eval.")}
    assert "lm_eval.piqa.acc" in tasks and "lm_eval.piqa.agree_fp" in tasks
    # The two runs score the same requests through other batch shapes (the resident run shares contexts,
    # the streamed one runs each request whole), so loglikelihood sums differ by float32 noise: a few
    # ulps of logits of magnitude <= 20 per token, over <= 50 tokens, well inside 1e-4 nats. Answers
    # (argmax over choices) are equal unless two choices tie within that noise. What is computed from
    # the sums moves by their noise at most: word perplexity relatively by exp(1e-4) - 1 ~ 1e-4, and ECE
    # by the largest change of an item's confidence (a softmax of the choices' sums moves by at most half
    # the change of their difference: 1e-4), unless an item sits within 1e-4 of a bin edge.
    noisy = {"perplexity": {"rel": 1e-4}, "ece": {"abs": 1e-4}}
    for name, value in tasks.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in noisy:
            assert on[name] == pytest.approx(value, **noisy[kind]), name
        else:
            assert on[name] == value, name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_on_cuda_matches_cpu(small: Path, tmp_path: Path, cache: Path) -> None:
    """One layer at a time on the GPU (calibration, Hessians, evaluation there) gives the CPU numbers."""
    from ptqlab.cli import main

    for device in ("cpu", "cuda"):
        runtime = {"stream": "on", "offload_dir": str(tmp_path / device)}
        data = yaml.safe_load(_config(small, tmp_path, [{"gptq": {}}], runtime, "x.yaml").read_text())
        data["device"] = device
        (tmp_path / f"{device}.yaml").write_text(yaml.safe_dump(data))
        assert main(["run", str(tmp_path / f"{device}.yaml"), "--store", str(tmp_path / f"{device}.db")]) == 0
    cpu, gpu = _metrics(tmp_path / "cpu.db"), _metrics(tmp_path / "cuda.db")
    for name, value in cpu.items():
        assert gpu[name] == pytest.approx(value, rel=1e-3, abs=1e-4), name


def test_dry_run_says_the_run_streams(small: Path, tmp_path: Path, cache: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from ptqlab.cli import main

    cfg = _config(small, tmp_path, [{"gptq": {}}], {"stream": "on", "offload_dir": str(tmp_path / "off")}, "d.yaml")
    assert main(["run", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "streamed one decoder layer at a time" in out and str(tmp_path / "off") in out
    assert not (tmp_path / "off").exists() or not any((tmp_path / "off").iterdir())


def test_force_reuses_the_kept_model_and_no_reuse_quantizes_again(small: Path, tmp_path: Path, cache: Path) -> None:
    """``--force`` recomputes the run but reads the quantized model the first run left; ``--no-reuse`` does not."""
    from ptqlab.cli import main

    config = _config(small, tmp_path, [{"gptq": {}}], {"stream": "on", "offload_dir": str(tmp_path / "off")}, "f.yaml")
    store = tmp_path / "f.db"
    timings = []
    for flags in ([], ["--force"], ["--no-reuse"]):
        assert main(["run", str(config), "--store", str(store), "--quiet", *flags]) == 0
        (record,) = Store(str(store)).list_runs()
        timings.append(record.timings)
    assert [t.get("qmodel_reused") for t in timings] == [None, 1.0, None]
    assert "quantize_s" in timings[2] and "quantize_s" not in timings[1]


def test_a_streamed_run_is_exported_from_its_checkpoint(small: Path, tmp_path: Path, cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`export:` of a streamed run copies its quantized checkpoint: never loaded whole, never quantized again."""
    from safetensors.torch import load_file

    import ptqlab.export.run as export_run
    import ptqlab.study.streamed as streamed
    from ptqlab.cli import main
    from ptqlab.export.run import export_config

    passes: list[int] = []
    real = streamed.quantize_streamed

    def counted(*args: object, **kwargs: object) -> object:
        passes.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(streamed, "quantize_streamed", counted)
    monkeypatch.setattr(export_run, "load_model", lambda *a, **k: pytest.fail("the streamed model was loaded whole"))
    cfg = _config(small, tmp_path, [{"gptq": {}}], {"stream": "on", "offload_dir": str(tmp_path / "off")}, "on.yaml")
    out = tmp_path / "hf"
    cfg.write_text(yaml.safe_dump(yaml.safe_load(cfg.read_text()) | {"export": {"format": "hf", "out": str(out)}}))
    assert main(["run", str(cfg), "--store", str(tmp_path / "runs.db"), "--quiet"]) == 0
    assert len(passes) == 1
    (written,) = (tmp_path / "off").iterdir()
    ckpt = Checkpoint(written)
    exported = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert set(exported) == set(ckpt.names())
    for name, tensor in ckpt.load(sorted(exported)).items():
        assert torch.equal(exported[name], tensor), name
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, exported["model.layers.1.mlp.down_proj.weight"])
    with pytest.raises(ConfigError, match="--format gguf writes from a model in memory.*runtime.stream"):
        export_config(parse_config(yaml.safe_load(cfg.read_text())), "gguf", tmp_path / "gguf", progress=False)
    assert len(passes) == 1 and not (tmp_path / "gguf").exists()
