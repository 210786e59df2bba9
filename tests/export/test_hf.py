"""`ptqlab export --format hf`: fake-quantized safetensors that transformers loads with the run's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from ptqlab.cli import main
from ptqlab.errors import ConfigError
from ptqlab.export.run import export_config
from ptqlab.store import Store
from ptqlab.study.config import parse_config

BASE = {"model": "stories260k", "device": "cpu",
        "scheme": {"weight": {"bits": 4, "granularity": "group", "group_size": 4, "symmetric": False}},
        "recipe": [{"gptq": {}}], "calibration": {"samples": 4, "seqlen": 64},
        "evaluate": {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 2}}


def test_transformers_loads_the_runs_weights_bit_for_bit(tmp_path: Path, quantized_here) -> None:
    out = tmp_path / "export"
    result = export_config(parse_config(BASE), "hf", out, progress=False)
    ours = quantized_here(BASE)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    mine = ours.state_dict()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, mine[name]), name
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)
    manifest = json.loads((out / "ptqlab-export.json").read_text())
    assert manifest["run_id"] == result.run_id and manifest["format"] == "hf"
    assert "group_size: 4" in (out / "README.md").read_text()
    assert (out / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temporary left


def test_cli_exports_a_stored_run_with_its_metrics_in_the_card(tmp_path: Path, capsys) -> None:
    config, store = tmp_path / "run.yaml", tmp_path / "runs.db"
    config.write_text(yaml.safe_dump(BASE))
    assert main(["run", str(config), "--store", str(store), "--quiet"]) == 0
    (record,) = Store(str(store)).list_runs()
    out = tmp_path / "by-id"
    assert main(["export", record.id[:8], "--format", "hf", "--out", str(out), "--store", str(store), "--quiet"]) == 0
    card = (out / "README.md").read_text()
    assert record.id in card and "ppl.wikitext2.s64.w2" in card
    assert json.loads((out / "ptqlab-export.json").read_text())["run_id"] == record.id
    assert main(["export", str(config), "--format", "hf", "--out", str(out), "--store", str(store)]) == 2  # exists
    assert main(["export", str(config), "--format", "hf", "--out", str(out), "--store", str(store), "--quiet",
                 "--overwrite"]) == 0
    assert [e["format"] for e in Store(str(store)).exports(record.id)] == ["hf"]  # one record per directory
    assert main(["show", record.id, "--store", str(store)]) == 0
    assert f"exported: hf -> {out.resolve()}" in capsys.readouterr().out


@pytest.mark.parametrize(("change", "message"), [
    ({"scheme": {"weight": {"bits": 4}, "activation": {"bits": 8}}}, "scheme.activation"),
    ({"scheme": {"weight": {"bits": 4}, "kv_cache": {"bits": 4}}}, "scheme.kv_cache"),
    ({"recipe": [{"rotation": {}}, {"gptq": {}}]}, "online_down: false"),
])
def test_what_a_plain_checkpoint_cannot_hold_is_refused_before_writing(tmp_path: Path, change: dict,
                                                                       message: str) -> None:
    out = tmp_path / "export"
    with pytest.raises(ConfigError, match=message):
        export_config(parse_config(BASE | change), "hf", out, progress=False)
    assert not out.exists()


def test_an_existing_directory_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "there"
    out.mkdir()
    import ptqlab.export.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        export_config(parse_config(BASE), "hf", out)
    with pytest.raises(ConfigError, match="not an export format"):
        export_config(parse_config(BASE), "gguf-q9", tmp_path / "new")


def test_an_export_section_exports_when_the_run_is_done(tmp_path: Path) -> None:
    """`export:` in a run config: written after the run, not part of its id, its directory checked first."""
    plain, with_export = tmp_path / "plain.yaml", tmp_path / "export.yaml"
    out = tmp_path / "served"
    plain.write_text(yaml.safe_dump(BASE))
    with_export.write_text(yaml.safe_dump(BASE | {"export": {"format": "compressed-tensors", "out": str(out)}}))
    store = tmp_path / "runs.db"
    assert main(["run", str(with_export), "--store", str(store), "--quiet"]) == 0
    (record,) = Store(str(store)).list_runs()
    assert json.loads((out / "ptqlab-export.json").read_text())["run_id"] == record.id
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert main(["run", str(plain), "--store", str(store), "--quiet"]) == 0  # the same run: reused
    assert len(Store(str(store)).list_runs()) == 1
    before = (out / "ptqlab-export.json").stat().st_mtime_ns
    assert main(["run", str(with_export), "--store", str(store), "--force"]) == 2  # out exists: nothing run
    assert (out / "ptqlab-export.json").stat().st_mtime_ns == before


def test_an_explicit_scale_op_is_refused(tmp_path: Path) -> None:
    """SmoothQuant on GPT-2 divides fc2's input after the GELU in a module transformers would not rebuild."""
    from ptqlab.models.loading import load_model
    from ptqlab.testing import tiny_model

    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    load_model("stories260k", "float32", "cpu").tokenizer.save_pretrained(gpt2)
    data = BASE | {"model": str(gpt2), "recipe": [{"smoothquant": {}}, {"rtn": {}}],
                   "scheme": {"weight": {"bits": 8, "symmetric": True},
                              "activation": {"bits": 8, "symmetric": True}}}
    weights_only = data | {"scheme": {"weight": {"bits": 8}}}
    for fmt, cfg in (("hf", weights_only), ("compressed-tensors", data)):
        with pytest.raises(ConfigError, match="explicit scale op"):
            export_config(parse_config(cfg), fmt, tmp_path / fmt, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_a_run_with_an_export_section_quantizes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export reads the quantized model the run kept (with its grids): one quantization pass in all."""
    import ptqlab.pipeline.quantize as pq

    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    passes: list[int] = []
    real = pq.quantize_weights

    def counted(*args: object, **kwargs: object) -> None:
        passes.append(1)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pq, "quantize_weights", counted)
    config, store = tmp_path / "run.yaml", tmp_path / "runs.db"
    packed = tmp_path / "packed"
    config.write_text(yaml.safe_dump(BASE | {"export": {"format": "compressed-tensors", "out": str(packed)}}))
    assert main(["run", str(config), "--store", str(store), "--quiet"]) == 0
    assert len(passes) == 1
    (record,) = Store(str(store)).list_runs()
    plain = tmp_path / "plain"
    assert main(["export", record.id, "--format", "hf", "--out", str(plain), "--store", str(store), "--quiet"]) == 0
    assert len(passes) == 1  # a stored run is exported from the store, not quantized again
    assert main(["run", str(config), "--store", str(store), "--quiet", "--no-reuse"]) == 2  # out exists: no work
    assert len(passes) == 1
    shutil.rmtree(packed)
    assert main(["run", str(config), "--store", str(store), "--quiet", "--no-reuse"]) == 0
    assert len(passes) == 2  # --no-reuse quantizes again, and the export reads what that run kept
    weights = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).state_dict()
    ours = export_config(parse_config(BASE), "hf", tmp_path / "again", progress=False)
    assert len(passes) == 2 and ours.run_id == record.id
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).state_dict()
    assert all(torch.equal(again[name], t) for name, t in weights.items())
