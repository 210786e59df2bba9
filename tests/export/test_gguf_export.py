"""GGUF export, read back by transformers' GGUF loader (gguf-py's dequantizers) and gguf-py's reader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from ptqlab.errors import ConfigError
from ptqlab.export.run import export_config
from ptqlab.models.loading import load_model
from ptqlab.study.config import parse_config
from ptqlab.testing import tiny_model

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


def _tiny_llama(out: Path, tokenizer: object) -> Path:
    """A random Llama whose widths are whole Q4_K super-blocks, saved with ``tokenizer``."""
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with stories260K's SentencePiece tokenizer."""
    tokenizer = load_model("stories260k", "float32", "cpu").tokenizer
    return _tiny_llama(tmp_path_factory.mktemp("spm"), tokenizer)


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a GPT-2-style byte-level BPE tokenizer trained here, and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Once upon a time there was a little robot.", "The robot liked numbers: 1, 2, 3."] * 50,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    return _tiny_llama(tmp_path_factory.mktemp("bpe"), fast)


def _config(model: Path | str, weight: dict | None, recipe: list | None = None, **scheme: object) -> dict:
    return {"model": str(model), "device": "cpu", "scheme": {"weight": weight, **scheme},
            "recipe": [{"gptq": {}}] if recipe is None else recipe, "calibration": {"samples": 4, "seqlen": 64}}


def _load(out: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()


@pytest.mark.parametrize("fmt", ["gguf_q8_0", "gguf_q4_0", "gguf_q4_1", "gguf_q5_0", "gguf_q5_1", "gguf_q4_k"])
def test_transformers_reads_back_every_weight_of_the_run(tmp_path: Path, spm_llama: Path, fmt: str,
                                                         quantized_here) -> None:
    data = _config(spm_llama, {"format": fmt})
    out = tmp_path / "gguf"
    export_config(parse_config(data), "gguf", out, progress=False)
    reader = gguf.GGUFReader(out / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == fmt.removeprefix("gguf_").upper()
    assert types["token_embd.weight"] == types["output.weight"] == "F32" and types["output_norm.weight"] == "F32"
    theirs = _load(out)
    ours = quantized_here(data)
    mine = ours.state_dict()
    assert sorted(theirs.state_dict()) == sorted(mine)
    assert not [k for k, v in theirs.state_dict().items() if not torch.equal(v, mine[k])]
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("fmt", "weighting"), [("gguf_q4_0", "diagonal"), ("gguf_q5_1", "block")])
def test_searched_steps_are_written_and_read_back(tmp_path: Path, spm_llama: Path, fmt: str, weighting: str,
                                                 quantized_here) -> None:
    """imatrix's refitted FP16 steps (and minimums) are what the file's blocks hold: every weight reads back."""
    data = _config(spm_llama, {"format": fmt}, [{"imatrix": {"weighting": weighting}}])
    out = tmp_path / "gguf"
    export_config(parse_config(data), "gguf", out, progress=False)
    theirs, mine = _load(out).state_dict(), quantized_here(data).state_dict()
    assert not [k for k, v in theirs.items() if not torch.equal(v, mine[k])]


def test_sentencepiece_vocabulary_round_trips(tmp_path: Path, spm_llama: Path) -> None:
    out = tmp_path / "gguf"
    export_config(parse_config(_config(spm_llama, {"format": "gguf_q8_0"}, recipe=[])), "gguf", out, progress=False)
    fields = gguf.GGUFReader(out / "model.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(fields["tokenizer.ggml.scores"].contents()) == 512
    theirs = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    ours = AutoTokenizer.from_pretrained(spm_llama)
    text = "Once upon a time, Lily saw 3 big dogs."
    assert theirs(text).input_ids == ours(text).input_ids
    assert theirs.decode(ours(text).input_ids, skip_special_tokens=True) == text


def test_bpe_vocabulary_merges_and_chat_template_round_trip(tmp_path: Path, bpe_llama: Path) -> None:
    out = tmp_path / "gguf"
    export_config(parse_config(_config(bpe_llama, {"format": "gguf_q4_0"}, recipe=[])), "gguf", out, progress=False)
    fields = gguf.GGUFReader(out / "model.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.chat_template"].contents() == TEMPLATE
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    merges = json.loads((bpe_llama / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(m) if isinstance(m, list) else m for m in merges]
    theirs = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    ours = AutoTokenizer.from_pretrained(bpe_llama)
    text = "The little robot liked 123 numbers."
    assert theirs(text, add_special_tokens=False).input_ids == ours(text, add_special_tokens=False).input_ids
    assert theirs.chat_template == TEMPLATE


def test_the_export_is_recorded_in_the_card_and_manifest(tmp_path: Path, spm_llama: Path) -> None:
    out = tmp_path / "gguf"
    result = export_config(parse_config(_config(spm_llama, {"format": "gguf_q4_k"}, recipe=[])), "gguf", out,
                           progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.gguf", "ptqlab-export.json"]
    card = (out / "README.md").read_text()
    assert result.run_id in card and "format: gguf_q4_k" in card and "llama.cpp" in card


@pytest.mark.parametrize(("change", "message"), [
    ({"weight": {"bits": 4, "granularity": "group", "group_size": 32, "symmetric": True}}, "set format: gguf_q4_0"),
    ({"weight": {"bits": 8}}, "set format: gguf_q8_0"),
    ({"activation": {"bits": 8}}, "scheme.activation"),
    ({"kv_cache": {"bits": 4}}, "--cache-type-k"),
    ({"recipe": [{"gptq": {"act_order": True}}]}, "act_order"),
    ({"recipe": [{"rtn": {}}, {"lorc": {"rank": 4}}]}, "--format hf"),
    ({"recipe": [{"rotation": {"online_down": True}}, {"rtn": {}}]}, "online_down"),
    ({"recipe": [{"awq": {}}, {"rtn": {}}]}, "o_proj into v_proj, down_proj into up_proj"),
])
def test_what_gguf_cannot_hold_is_refused_before_anything_is_written(tmp_path: Path, spm_llama: Path, change: dict,
                                                                     message: str) -> None:
    data = _config(spm_llama, {"format": "gguf_q4_0"})
    for key, value in change.items():
        if key == "recipe":
            data["recipe"] = value
        else:
            data["scheme"][key] = value
    out = tmp_path / "gguf"
    with pytest.raises(ConfigError, match=message):
        export_config(parse_config(data), "gguf", out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_other_architectures_and_partial_blocks_are_refused(tmp_path: Path, tmp_path_factory) -> None:
    gpt2 = tmp_path_factory.mktemp("gpt2")
    tiny_model("gpt2").save_pretrained(gpt2)
    load_model("stories260k", "float32", "cpu").tokenizer.save_pretrained(gpt2)
    with pytest.raises(ConfigError, match="llama architecture"):
        export_config(parse_config(_config(gpt2, {"format": "gguf_q8_0"}, recipe=[])), "gguf",
                      tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="blocks of 32.*172"):  # stories260K's MLP width is 172
        export_config(parse_config(_config("stories260k", {"format": "gguf_q4_0"}, recipe=[])), "gguf",
                      tmp_path / "b", progress=False)
    assert not list(tmp_path.iterdir())


def test_a_weight_off_its_block_grid_is_an_error_not_a_requantization() -> None:
    from ptqlab.formats.gguf import _quantized
    from ptqlab.pipeline.driver import WeightGrid
    from ptqlab.quant.core import choose_qparams, fake_quantize
    from ptqlab.quant.spec import QuantSpec

    spec = QuantSpec(format="gguf_q4_1")
    linear = torch.nn.Linear(64, 4, bias=False)
    qp = choose_qparams(linear.weight.detach(), spec)
    with torch.no_grad():
        linear.weight.copy_(fake_quantize(linear.weight, spec))
    grid = WeightGrid(linear, spec, qp.scale, qp.zero)
    data, raw = _quantized("x", linear, grid, "blk.0.ffn_up.weight", None)
    assert raw.name == "Q4_1" and data.shape == (4, 2 * 20)
    with torch.no_grad():
        linear.weight[0, 0] += 1e-3
    with pytest.raises(ConfigError, match="not on its GGUF block grid"):
        _quantized("x", linear, grid, "blk.0.ffn_up.weight", None)


def test_a_mixed_run_holds_a_block_type_per_tensor(tmp_path: Path, spm_llama: Path, quantized_here) -> None:
    # a searched allocation: Q4_0 base, value projections at Q8_0, layer 1's down projection at Q5_0
    data = _config(spm_llama, {"format": "gguf_q4_0"}, recipe=[],
                   overrides=[{"match": r".*v_proj", "weight": {"format": "gguf_q8_0"}},
                              {"match": r".*layers\.1\.mlp\.down_proj", "weight": {"format": "gguf_q5_0"}}])
    out = tmp_path / "mixed"
    export_config(parse_config(data), "gguf", out, progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q5_0"
    assert types["blk.0.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "Q4_0"
    theirs, mine = _load(out).state_dict(), quantized_here(data).state_dict()
    assert not [k for k, v in theirs.items() if not torch.equal(v, mine[k])]


def test_a_quantized_embedding_is_written_as_its_block_type(tmp_path: Path, spm_llama: Path, quantized_here) -> None:
    # llama.cpp's own files hold the embedding at Q8_0; the run rounds it there and evaluates that model
    data = _config(spm_llama, {"format": "gguf_q4_0"}, recipe=[], embedding={"format": "gguf_q8_0"})
    out = tmp_path / "emb"
    export_config(parse_config(data), "gguf", out, progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["output.weight"] == "F32"  # an untied head stays
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    theirs, ours = _load(out).state_dict(), quantized_here(data)
    mine = ours.state_dict()
    assert not [k for k, v in theirs.items() if not torch.equal(v, mine[k])]
    fp = AutoModelForCausalLM.from_pretrained(spm_llama).state_dict()["model.embed_tokens.weight"]
    assert not torch.equal(mine["model.embed_tokens.weight"], fp)  # the evaluated model's embedding is rounded
