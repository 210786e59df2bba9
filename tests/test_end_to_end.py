"""End to end on the real tiny stories260K model: quantize, evaluate, store, reload; bad input stores nothing."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import pytest
import yaml

from ptqlab.cli import main
from ptqlab.store import Store
from ptqlab.threads import thread_ceiling

STORIES = {
    "model": "stories260k",
    "scheme": {"weight": {"bits": 4, "granularity": "channel"}},
    "recipe": [{"gptq": {"damp": 0.01}}],
    "calibration": {"dataset": "c4local", "samples": 4, "seqlen": 64, "seed": 0},
    "evaluate": {"perplexity": ["wikitext2"], "seqlen": 128, "max_windows": 2, "sample": {}, "sensitivity": {}},
}


def _write(tmp_path: Path, cfg: dict, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_store_show_and_resume(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    cfg = _write(tmp_path, STORIES)
    code, out, _ = _cli(capsys, "--store", db, "run", cfg, "--json", "--quiet")
    assert code == 0
    run = json.loads(out)
    assert run["status"] == "done" and run["architecture"] == "LlamaForCausalLM"
    ppl = run["metrics"]["ppl.wikitext2.s128.w2"]["value"]
    assert 1.0 < ppl < 1e4
    assert len(run["layers"]) == 5 * 7 and all(r["rel_error"] > 0 for r in run["layers"])
    assert run["versions"]["torch"] and run["model_fingerprint"].split("-")[0].isdigit()
    assert run["texts"]["sample"].startswith("Once upon a time") and len(run["texts"]["sample"]) > 20
    assert run["threads"] == thread_ceiling()
    assert run["machine"]["cores"] == os.cpu_count() and run["machine"]["arch"] == platform.machine()
    window = run["windows"]["ppl.wikitext2.s128.w2"]  # each window's NLL beside the FP model's
    assert math.exp(sum(window["nll"]) / 2) == pytest.approx(ppl) and len(window["fp_nll"]) == 2
    assert sum(window["fp_nll"]) < sum(window["nll"])

    code, out, _ = _cli(capsys, "--store", db, "show", run["id"][:6], "--json")
    shown = json.loads(out)
    assert shown["metrics"] == run["metrics"] and shown["config"] == run["config"]
    assert shown["texts"] == run["texts"]
    code, out, _ = _cli(capsys, "--store", db, "show", run["id"][:6])
    if shown["timings"].get("peak_rss_bytes"):  # Linux: the run's own peak, printed with its times
        assert "peak memory" in out and (" GiB" in out or " MiB" in out)
    assert "\nmachine: " in out

    code, out, _ = _cli(capsys, "--store", db, "run", cfg, "--quiet")  # resumes: not recomputed
    assert code == 0 and "already in the store" in out
    code, out, _ = _cli(capsys, "--store", db, "ls")
    assert out.count("\n") == 1 and run["id"] in out
    code, after, _ = _cli(capsys, "ls", "--store", db)  # global options after the subcommand, as typed
    assert code == 0 and after == out
    code, out, _ = _cli(capsys, "run", cfg, "--quiet", "--store", db)
    assert code == 0 and "already in the store" in out


def test_fp_run_has_same_ppl_as_bits16(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    fp = {**STORIES, "scheme": {}, "recipe": []}
    b16 = {**STORIES, "scheme": {"weight": {"bits": 16}}}
    a = json.loads(_cli(capsys, "--store", db, "run", _write(tmp_path, fp, "a.yaml"), "--json", "--quiet")[1])
    b = json.loads(_cli(capsys, "--store", db, "run", _write(tmp_path, b16, "b.yaml"), "--json", "--quiet")[1])
    assert a["metrics"] == b["metrics"] and b["layers"] == []


def _checkpoint_dir(tmp_path: Path, name: str, weights_file: str, content: bytes) -> str:
    """A directory with the real stories260k config and one weights file holding ``content``."""
    d = tmp_path / name
    d.mkdir()
    src = Path(__file__).resolve().parents[1] / "src/ptqlab/assets/models/stories260k/config.json"
    (d / "config.json").write_text(src.read_text())
    (d / weights_file).write_bytes(content)
    return str(d)


def _corrupt_dir(tmp_path: Path) -> str:
    return _checkpoint_dir(tmp_path, "corrupt", "model.safetensors", b"this is not a safetensors file")


def _pickle_dir(tmp_path: Path) -> str:
    return _checkpoint_dir(tmp_path, "pickled", "pytorch_model.bin", b"\x80\x04K\x01.")


def _unsupported_dir(tmp_path: Path) -> str:
    from transformers import AutoModelForCausalLM, XGLMConfig

    d = tmp_path / "xglm"
    cfg = XGLMConfig(vocab_size=64, d_model=16, ffn_dim=32, num_layers=1, attention_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return str(d)


BAD = [
    ("missing model path", lambda t: {**STORIES, "model": str(t / "nope")}, "model path not found"),
    ("corrupt checkpoint", lambda t: {**STORIES, "model": _corrupt_dir(t)}, "model.safetensors"),
    ("pickle checkpoint", lambda t: {**STORIES, "model": _pickle_dir(t)}, "safetensors"),
    ("unknown alias", lambda t: {**STORIES, "model": "tinyllama-9b"}, "stories260k"),
    ("unsupported class", lambda t: {**STORIES, "model": _unsupported_dir(t)}, "XGLMForCausalLM"),
    ("unknown key", lambda t: {**STORIES, "calibraton": {}}, "calibraton: unknown key"),
    ("bits out of range", lambda t: {**STORIES, "scheme": {"weight": {"bits": 9}}}, "bits=9 is out of range"),
    ("group size", lambda t: {**STORIES, "scheme": {"weight": {"bits": 4, "granularity": "group", "group_size": 32}}},
     "does not divide the input width 172 of module model.layers.0.mlp.down_proj"),
    ("empty calibration", lambda t: {**STORIES, "calibration": {"dataset": "file", "path": str(_empty(t))}},
     "empty"),
    ("missing calibration file", lambda t: {**STORIES, "calibration": {"dataset": "file", "path": str(t / "x.txt")}},
     "x.txt"),
]


def _empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty.txt"
    p.write_text("  \n\n ")
    return p


@pytest.mark.parametrize(("label", "make", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_clear_error_and_nothing_stored(tmp_path, capsys, label, make, message):
    db = tmp_path / "s.db"
    code, out, err = _cli(capsys, "--store", str(db), "run", _write(tmp_path, make(tmp_path)), "--quiet")
    assert code == 2, (label, out, err)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message.lower() in lines[0].lower(), err
    assert "Traceback" not in err
    assert not db.exists() or Store(db).list_runs() == []


def test_failure_while_running_is_stored_with_reason(tmp_path, capsys, monkeypatch):
    import ptqlab.study.resident as resident

    def boom(*_args, **_kwargs):
        raise RuntimeError("simulated crash in layer 3")

    monkeypatch.setattr(resident, "quantize_or_restore", boom)
    db = str(tmp_path / "s.db")
    code, out, _ = _cli(capsys, "--store", db, "run", _write(tmp_path, STORIES), "--json", "--quiet")
    run = json.loads(out)
    assert code == 1 and run["status"] == "failed" and "simulated crash in layer 3" in run["error"]
    assert run["metrics"] == {} and run["layers"] == []
    monkeypatch.undo()
    code, out, _ = _cli(capsys, "--store", db, "run", _write(tmp_path, STORIES), "--json", "--quiet")
    assert code == 0 and json.loads(out)["status"] == "done"  # a failed run is retried, then replaced
    assert [r.status for r in Store(db).list_runs()] == ["done"]


def test_weight_activation_kv_run_stores_effective_bits(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    cfg = {
        **STORIES,
        "scheme": {
            "weight": {"format": "nf4", "granularity": "group", "group_size": 4},
            "activation": {"bits": 8, "dynamic": False, "granularity": "tensor"},
            "kv_cache": {"bits": 4, "granularity": "head"},
        },
        "recipe": [],
    }
    code, out, _ = _cli(capsys, "--store", db, "run", _write(tmp_path, cfg), "--json", "--quiet")
    assert code == 0
    metrics = json.loads(out)["metrics"]
    assert metrics["bits.weight"]["value"] == pytest.approx(4 + 16 / 4)
    assert metrics["bits.kv"]["value"] == pytest.approx(4 + 20 / 8)  # head_dim 8: a scale and a zero per 8
    assert metrics["bits.activation"]["value"] > 8
    assert 0 < metrics["size.model_bytes"]["value"] < 260_000 * 2
    assert metrics["ppl.wikitext2.s128.w2"]["value"] > 1


def test_recipe_of_many_methods_runs_end_to_end(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    cfg = {
        **STORIES,
        "scheme": {"weight": {"bits": 4, "granularity": "channel"}, "activation": {"bits": 8}},
        "recipe": [{"rotation": {}}, {"smoothquant": {"alpha": 0.5}}, {"gptq": {}},
                   {"zeroquant_local": {"steps": 3}}, {"lorc": {"rank": 2}}],
    }
    code, out, _ = _cli(capsys, "--store", db, "run", _write(tmp_path, cfg), "--json", "--quiet")
    assert code == 0
    run = json.loads(out)
    assert run["status"] == "done"
    assert 0 < run["metrics"]["zeroquant.local.loss_ratio"]["value"] <= 1
    assert run["metrics"]["bits.weight"]["value"] > 4


def test_long_context_accuracy_by_length_is_stored(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    cfg = {**STORIES, "scheme": {"kv_cache": {"bits": 4}}, "recipe": [],
           "evaluate": {"perplexity": [], "long_context": {"lengths": [256, 400], "samples": 2}}}
    code, out, _ = _cli(capsys, "--store", db, "run", _write(tmp_path, cfg), "--json", "--quiet")
    assert code == 0
    run = json.loads(out)
    for n in (256, 400):
        assert 0 <= run["metrics"][f"retrieval.len{n}.p4.n2"]["value"] <= 1
        assert len(json.loads(run["texts"][f"retrieval.len{n}.p4.n2"])) == 2
    too_long = {**cfg, "evaluate": {"perplexity": [], "long_context": {"lengths": [100_000]}}}
    code, _, err = _cli(capsys, "--store", db, "run", _write(tmp_path, too_long, "t.yaml"), "--quiet")
    assert code == 2 and "exceed the model's context" in err
    too_short = {**cfg, "evaluate": {"perplexity": [], "long_context": {"lengths": [40], "pairs": 8}}}
    code, _, err = _cli(capsys, "--store", db, "run", _write(tmp_path, too_short, "s.yaml"), "--quiet")
    assert code == 2 and "too short for 8 records" in err


def test_sensitivity_is_stored_per_module(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    code, out, _ = _cli(capsys, "--store", db, "run", _write(tmp_path, STORIES), "--json", "--quiet")
    run = json.loads(out)
    sens = run["sensitivity"]
    assert len(sens) == 5 * (7 + 1)  # every linear and every decoder layer
    assert all(s["rel_error"] > 0 for s in sens)
    code, out, _ = _cli(capsys, "--store", db, "show", run["id"], "--json")
    assert json.loads(out)["sensitivity"] == sens


def test_lm_eval_tasks_with_paired_measures(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    db = str(tmp_path / "s.db")
    evaluate = {"perplexity": [], "tasks": ["piqa"], "limit": 6, "sample": None, "sensitivity": None}
    runs = []
    for bits in (8, 3):
        cfg = {**STORIES, "scheme": {"weight": {"bits": bits, "granularity": "channel"}}, "recipe": [],
               "evaluate": evaluate}
        code, out, _ = _cli(capsys, "--store", db, "run", _write(tmp_path, cfg, f"c{bits}.yaml"), "--json", "--quiet")
        assert code == 0
        runs.append(json.loads(out)["metrics"])
    for m in runs:
        assert 0 <= m["lm_eval.piqa.acc"]["value"] <= 1 and m["lm_eval.piqa.acc"]["stderr"] is not None
        assert 0 <= m["lm_eval.piqa.agree_fp"]["value"] <= 1
        assert m["lm_eval.piqa.lost"]["value"] + m["lm_eval.piqa.gained"]["value"] <= 1
    cached = list((tmp_path / "cache" / "lm_eval").glob("*.json"))
    assert len(cached) == 1  # FP computed once for both
    fp = json.loads(cached[0].read_text())
    assert len(fp["correct"]["piqa"]) == 6
    fp_acc = fp["metrics"]["piqa"]["acc"][0]
    for m in runs:  # paired identity on the same items: acc(Q) = acc(FP) - lost + gained
        paired = fp_acc - m["lm_eval.piqa.lost"]["value"] + m["lm_eval.piqa.gained"]["value"]
        assert m["lm_eval.piqa.acc"]["value"] == pytest.approx(paired)


def test_python_evaluate_honours_every_key_with_the_run_names(tmp_path, capsys, monkeypatch):
    """``ptqlab.evaluate`` runs divergence and tasks too, and names them as ``ptqlab run`` does."""
    import ptqlab

    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    evaluate = {"perplexity": ["wikitext2"], "seqlen": 128, "max_windows": 2, "divergence": {"seqlen": 128,
                "windows": 2}, "tasks": ["piqa"], "limit": 4, "sensitivity": {}}
    cfg = {**STORIES, "scheme": {"weight": {"bits": 3, "granularity": "channel"}}, "recipe": [], "evaluate": evaluate}
    code, out, _ = _cli(capsys, "--store", str(tmp_path / "s.db"), "run", _write(tmp_path, cfg), "--json", "--quiet")
    assert code == 0
    run = json.loads(out)

    lm = ptqlab.load_model("stories260k")
    fp = ptqlab.evaluate(lm.model, lm.tokenizer, evaluate, progress=False)  # FP: its own reference
    by_name = {m.name: m.value for m in fp.metrics}
    assert by_name["kl.wikitext2.s128.w2"] == pytest.approx(0.0, abs=1e-6) and by_name["lm_eval.piqa.agree_fp"] == 1
    ref = ptqlab.reference(lm.model, lm.tokenizer, evaluate, fingerprint=lm.info.fingerprint, progress=False)
    assert "tasks" not in ref.computed and "divergence" not in ref.computed  # the run's FP side, from the cache
    ptqlab.quantize(lm.model, cfg["scheme"], [], progress=False)
    with pytest.raises(ptqlab.ConfigError, match="divergence compares against the FP model"):
        ptqlab.evaluate(lm.model, lm.tokenizer, evaluate, progress=False)
    with pytest.raises(ptqlab.ConfigError, match="already quantized"):
        ptqlab.reference(lm.model, lm.tokenizer, evaluate, progress=False)
    bare = ptqlab.evaluate(lm.model, lm.tokenizer, {k: evaluate[k] for k in ("seqlen", "max_windows")},
                           progress=False)  # no reference: the default sensitivity and the FP NLLs are left out
    assert bare.sensitivity == [] and bare.windows["ppl.wikitext2.s128.w2"].fp_nll is None
    q = ptqlab.evaluate(lm.model, lm.tokenizer, evaluate, reference=ref, progress=False)
    names = {m.name for m in q.metrics}
    assert names == {n for n in run["metrics"] if not n.startswith(("size.", "bits."))}
    assert names == set(by_name)
    for m in q.metrics:  # the same numbers as the run, through the same path
        assert m.value == pytest.approx(run["metrics"][m.name]["value"], rel=1e-6, abs=1e-9), m.name
    assert len(q.sensitivity) == len(run["sensitivity"]) > 0
    window = run["windows"]["ppl.wikitext2.s128.w2"]
    assert len(window["nll"]) == len(window["fp_nll"]) == 2 and window["nll"] != window["fp_nll"]
