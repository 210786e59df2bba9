"""GGUF for llama.cpp, with the run's own codes and FP16 block parameters.

A linear quantized in one of the GGUF weight formats (``gguf_q4_0``, ... see :mod:`ptqlab.quant.gguf`) is
written as that llama.cpp block type from its codes; every other tensor in full precision (F32, F16 or
BF16 as the model holds it, or as ``float_type`` sets it; 1-D tensors such as norms F32). Before writing,
each packed tensor is read back with gguf-py's own dequantizer and must give the run's weight bit for bit,
so the file llama.cpp runs is the model the study measured (with ``float_type`` set, the full-precision
tensors are rounded to it).

The file follows llama.cpp's ``llama`` architecture: its tensor names, the query and key rows permuted the
way llama.cpp's converter does (rotary halves interleaved per head), the hyperparameters under ``llama.*``,
and the tokenizer: GPT-2-style BPE (tokens, merges) or SentencePiece (tokens, scores, types), the special
token ids and the chat template (read with gguf-py's vocabulary readers from the tokenizer's saved files).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..eval.measures import RuntimeFiles
from ..models.weights import weight_matrix
from ..pipeline.driver import WeightGrid
from ..pipeline.plan import QuantizationPlan
from ..quant.gguf import BLOCK, BLOCK_TYPES, block_codes
from ..quant.spec import QuantSpec
from ..schema import KVCacheScheme
from .common import refuse_off_grid_recipe, refuse_runtime_quantizers
from .gguf_blocks import pack

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
"""Hugging Face ``model_type`` -> the GGUF architecture written."""

_FLOAT_TYPES = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
                torch.bfloat16: gguf.GGMLQuantizationType.BF16}

FLOAT_TYPES: dict[str, torch.dtype | None] = {"auto": None, "f32": torch.float32, "f16": torch.float16,
                                              "bf16": torch.bfloat16}
"""``float_type`` of :func:`write_gguf` -> the dtype of the 2-D tensors kept in full precision (None: the model's)."""


def check_gguf(plan: QuantizationPlan, config: Any) -> None:
    """Refuse what a llama.cpp GGUF cannot hold, naming the field and what would hold it, before any work.

    Args:
        plan: The run's quantization plan.
        config: The model's transformers config.

    Raises:
        ConfigError: A model type other than the llama family, a RoPE scaling, activation or KV-cache
            quantization, a recipe whose weights leave their grid, a weight format that is not a GGUF block
            type.

    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"GGUF export writes llama.cpp's llama architecture (model types "
                          f"{', '.join(ARCHITECTURES)}), not {model_type!r}; use --format hf or compressed-tensors")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        raise ConfigError(f"rope_type {rope!r}: the GGUF writer handles plain RoPE only; use --format hf")
    refuse_runtime_quantizers(plan, "a GGUF file", "llama.cpp quantizes activations by its own kernels; remove "
                              "the activation section to export (or use --format compressed-tensors)",
                              "llama.cpp's KV cache type is a run option (--cache-type-k / --cache-type-v): remove "
                              "kv_cache to export and pass the option")
    refuse_off_grid_recipe(plan, "GGUF", "llama.cpp")
    _refuse_rows_folded_after_quantization(plan)
    for t in plan.targets:
        if t.spec.enabled and t.spec.format not in BLOCK_TYPES:
            raise ConfigError(f"scheme.weight (module {t.name}): GGUF holds the run's codes only in llama.cpp's "
                              f"block types, and {_describe(t.spec)} is not one; set format: {_closest(t.spec)} "
                              f"(or another of {', '.join(BLOCK_TYPES)}) and run again")


def _refuse_rows_folded_after_quantization(plan: QuantizationPlan) -> None:
    """Refuse scaling transforms that divide rows of a linear quantized earlier in the layer.

    AWQ and SmoothQuant fold the scale of a group whose input is another linear's output (``o_proj`` after
    ``v_proj``, ``down_proj`` after ``up_proj``) into that linear's rows, which the true-sequential pass has
    quantized already: its block scales become FP16 scales divided by a float, which a GGUF block cannot hold.
    """
    if not plan.recipe.layer_transforms:
        return
    quantized = {t.relative for t in plan.targets if t.spec.enabled}
    folded = [g for g in plan.adapter.groups if g.fold == "linear" and g.prev_op in quantized]
    if folded:
        pairs = ", ".join(f"{g.linears[0].rsplit('.', 1)[-1]} into {str(g.prev_op).rsplit('.', 1)[-1]}"
                          for g in folded)
        raise ConfigError(f"recipe {plan.recipe.name}: its scales fold into the rows of linears quantized before "
                          f"them ({pairs}), so their block scales are no longer FP16 values and GGUF cannot hold "
                          "them; use --format compressed-tensors or hf (or a recipe without awq / smoothquant)")


def _describe(spec: QuantSpec) -> str:
    grain = f"group {spec.group_size}" if spec.granularity == "group" else str(spec.granularity)
    return f"{spec.format} {spec.nbits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} per {grain}"


def _closest(spec: QuantSpec) -> str:
    """The GGUF format nearest to a spec, for the error message."""
    if spec.nbits >= 8:
        return "gguf_q8_0"
    bits = 5 if spec.nbits == 5 else 4
    return f"gguf_q{bits}_0" if spec.symmetric else f"gguf_q{bits}_1"


def gguf_runtime_files(model: nn.Module, tokenizer: Any, grids: dict[str, WeightGrid], source: str | None = None,
                       kv_cache: KVCacheScheme | None = None) -> RuntimeFiles:
    """How a run's model is written for llama.cpp's speed measure: :func:`write_gguf` from its grids."""
    def write(path: Path, float_type: str) -> None:
        write_gguf(model, tokenizer, path, grids, source, float_type=float_type)

    return RuntimeFiles(write, kv_cache)


def write_gguf(model: nn.Module, tokenizer: Any, path: Path, grids: dict[str, WeightGrid],
               source: str | None = None, float_type: str = "auto") -> None:
    """Write ``model`` (quantized in place, its grids in ``grids``) to the GGUF file ``path``.

    Args:
        model: A llama-family transformers model.
        tokenizer: Its tokenizer.
        path: The file to create.
        grids: The quantized linears' grids, by module name.
        source: Where the model was loaded from: a GGUF source's pre-tokenizer name is kept.
        float_type: The GGUF type of the 2-D tensors kept in full precision (the embedding, the output
            head, every linear without a grid): ``auto`` (the model's own dtype), ``f32``, ``f16`` or
            ``bf16`` (an FP model written as ``f16`` is llama.cpp's F16 file). The quantized linears keep
            their block types and 1-D tensors (norms) are F32 whatever it says.

    Raises:
        ConfigError: A weight not on its grid, a tokenizer gguf-py cannot read, an unknown ``float_type``,
            or a tensor whose values exceed the range of ``float_type``.

    """
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"float_type={float_type!r} is not a GGUF float type; use one of {', '.join(FLOAT_TYPES)}")
    config: Any = model.config
    writer = gguf.GGUFWriter(str(path), ARCHITECTURES[config.model_type])
    _hyperparameters(writer, config, path.stem)
    _vocabulary(writer, tokenizer, int(config.vocab_size), _source_pre(source))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    modules = dict(model.named_modules())
    for name, tensor in _tensors(model):
        key = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if key is None:
            raise ConfigError(f"tensor {name} has no llama.cpp name; the GGUF writer handles the llama family")
        module = name.removesuffix(".weight")
        grid = grids.get(module)
        if grid is None:
            data, raw = _float(tensor, key, config, FLOAT_TYPES[float_type])
        else:
            data, raw = _quantized(module, modules[module], grid, key, config)
        writer.add_tensor(key, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state dict's tensors, without a tied output head (llama.cpp reuses the embedding)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return [(n, t) for n, t in model.state_dict().items()
            if not (tied and n == "lm_head.weight") and not n.endswith("rotary_emb.inv_freq")]


def _hyperparameters(writer: gguf.GGUFWriter, config: Any, name: str) -> None:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if head_dim * heads != int(config.hidden_size):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _source_pre(source: str | None) -> str | None:
    """The pre-tokenizer name of a GGUF source file, if the model came from one."""
    if not source or not source.endswith(".gguf") or not Path(source).is_file():
        return None
    field = gguf.GGUFReader(source).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def _vocabulary(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, pre: str | None) -> None:
    """Tokens, scores, types, merges, special ids and chat template, read back from the saved tokenizer."""
    with tempfile.TemporaryDirectory(prefix="ptqlab-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        base = Path(tmp)
        vocab = _read_vocab(base)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        for i in range(len(tokens), vocab_size):  # an embedding larger than the vocabulary: padding tokens
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        elif vocab.tokenizer_model == "gpt2":
            log.warning("GGUF: no llama.cpp pre-tokenizer name is known for this tokenizer; llama.cpp will use "
                        "its default pre-tokenizer")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(base, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)


def _read_vocab(base: Path) -> Any:
    """gguf-py's reader for the saved tokenizer: GPT-2 BPE, Llama BPE with byte fallback, or SentencePiece."""
    for kind in (gguf.BpeVocab, gguf.LlamaHfVocab, gguf.SentencePieceVocab):
        try:
            return kind(base)
        except (FileNotFoundError, TypeError, ValueError):
            continue
    raise ConfigError("the tokenizer is neither GPT-2-style BPE nor SentencePiece (what llama.cpp's llama "
                      "vocabulary holds); it cannot be written to GGUF")


def _permute(rows: np.ndarray | torch.Tensor, key: str, config: Any) -> Any:
    """llama.cpp's query/key row order: per head, the rotary halves interleaved."""
    if ".attn_q." not in key and ".attn_k." not in key:
        return rows
    heads = int(config.num_attention_heads)
    if ".attn_k." in key:
        heads = int(getattr(config, "num_key_value_heads", None) or heads)
    n = rows.shape[0]
    order = np.arange(n).reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(-1)
    return rows[order]


def _float(tensor: torch.Tensor, key: str, config: Any,
           dtype: torch.dtype | None = None) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor kept in full precision: F32 for 1-D ones, else ``dtype`` (None: the model's own float type)."""
    t = tensor.detach().cpu()
    if t.dim() > 1 and dtype is not None and t.dtype != dtype:
        converted = t.to(dtype)
        if not torch.isfinite(converted).all() and torch.isfinite(t).all():
            raise ConfigError(f"tensor {key} has values beyond the range of {str(dtype).removeprefix('torch.')}; "
                              "write it as f32 or bf16")
        t = converted
    t = t.float() if t.dim() == 1 or t.dtype not in _FLOAT_TYPES else t
    t = _permute(t, key, config)
    raw = _FLOAT_TYPES[t.dtype]
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint8), raw
    return t.contiguous().numpy(), raw


def _quantized(name: str, module: nn.Module, grid: WeightGrid, key: str,
               config: Any) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A quantized linear as its block type, checked against gguf-py's dequantizer (in the model's dtype)."""
    fmt = grid.spec.format
    block = BLOCK_TYPES[fmt]
    stored = weight_matrix(module).detach()
    W = stored.float()
    cols = torch.arange(W.shape[1]) // BLOCK
    scale, zero = grid.scale.float(), grid.zero.float()
    codes = block_codes(W, scale[:, cols], zero[:, cols], fmt)  # the nearest codes: equal only if on the grid
    raw = getattr(gguf.GGMLQuantizationType, block.ggml)
    try:
        data = pack(block.ggml, codes, scale, zero)
    except ValueError as e:
        raise _off_grid(name) from e
    back = torch.from_numpy(gguf.quants.dequantize(data, raw))
    if not torch.equal(back.to(stored.dtype), stored):
        raise _off_grid(name)
    return _permute(data, key, config), raw


def _off_grid(name: str) -> ConfigError:
    return ConfigError(f"the weight of {name} is not on its GGUF block grid (a step after quantization changed "
                       "it, or its scales are not FP16); GGUF cannot hold it")
