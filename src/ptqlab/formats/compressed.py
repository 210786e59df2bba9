"""compressed-tensors, the format vLLM loads, with ptqlab's own codes and scales.

Formats: ``pack-quantized`` (INT weights of 1-8 bits, weight-only), ``int-quantized`` (INT8 weights with
dynamic per-token INT8 activations, W8A8), ``naive-quantized`` (FP8 E4M3 weights, weight-only) and
``float-quantized`` (FP8 weights with dynamic FP8 activations). In ``pack-quantized``:

Each quantized linear ``X`` becomes ``X.weight_packed`` (int32, out x ceil(in * bits / 32): the codes offset
into the signed range, ``bits`` bits each, element ``i`` of a row at bit ``i * bits`` of the row's
little-endian bit stream), ``X.weight_scale`` (out x groups), ``X.weight_shape`` and, when asymmetric,
``X.weight_zero_point`` (signed, packed the same way along the output rows). The codes are read off the
run's weights with the grid the quantizer chose (:class:`ptqlab.pipeline.driver.WeightGrid`) and checked:
``scale * (code - zero)`` must give every weight back bit for bit, so a weight a later step moved off its
grid (a low-rank correction, a refiner) is an error, never a silent re-quantization.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.weights import in_features, weight_matrix
from ..pipeline.driver import WeightGrid
from ..pipeline.plan import QuantizationPlan
from ..quant.spec import QuantSpec
from .common import refuse_off_grid_recipe, save_checkpoint

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"
LIBRARY_VERSION = "0.20.1"  # the compressed-tensors release the round-trip tests load exports with


def check_compressed(plan: QuantizationPlan) -> str:
    """The compressed-tensors format of ``plan``; refuse what none holds, naming the field, before any work.

    Raises:
        ConfigError: Attention-input or KV quantization (not written yet), activations other than dynamic
            per-token INT8 beside INT8 weights or FP8 beside FP8 weights, an online rotation, a weight spec
            that is not INT (1-8 bits) or FP8 E4M3 per channel or group, a float zero point, act-order, a
            quantized embedding.

    """
    if plan.adapter.experts is not None:
        raise ConfigError(f"family {plan.adapter.family}: compressed-tensors export of fused mixture-of-experts "
                          "parameters is not written yet; use --format hf")
    if plan.attention is not None or plan.kv is not None:
        raise ConfigError("scheme.kv_cache / scheme.activation.attention: ptqlab does not write compressed-tensors "
                          "KV-cache or attention-input schemes yet; remove them to export")
    if plan.embedding is not None:
        raise ConfigError("scheme.embedding: compressed-tensors quantizes linears; vLLM has no quantized embedding "
                          "to load. Export the run with --format gguf or hf, or drop scheme.embedding")
    fmt = _format_of(plan)
    refuse_off_grid_recipe(plan, "compressed-tensors 0.20", "vLLM")
    for t in plan.targets:
        _check_spec(t.spec, t.name, fmt)
    if any(not t.spec.symmetric and t.spec.nbits not in (4, 8) for t in plan.targets):
        log.warning("vLLM loads asymmetric (zero-point) INT weights only at 4 and 8 bits; this export will "
                    "load in compressed-tensors but not in vLLM")
    return fmt


def _format_of(plan: QuantizationPlan) -> str:
    """``pack-quantized`` / ``naive-quantized`` weight-only, ``int-quantized`` / ``float-quantized`` W8A8."""
    fp8 = bool(plan.targets) and all(t.spec.format == "fp8_e4m3" for t in plan.targets)
    if not plan.activations:
        return "naive-quantized" if fp8 else FORMAT
    specs = [a for _, _, a in plan.activations]
    want = "fp8_e4m3" if fp8 else "int"
    if any(a.spec.format != want or a.spec.nbits != 8 or a.spec.granularity != "token" or not a.dynamic
           or (not fp8 and not a.spec.symmetric) for a in specs):
        raise ConfigError(f"scheme.activation: compressed-tensors holds dynamic, symmetric per-token 8-bit "
                          f"activations ({'FP8 E4M3' if fp8 else 'INT8'}, as the weights) beside "
                          f"{'FP8' if fp8 else 'INT8'} weights; set bits: 8, granularity: token, dynamic: true"
                          + ("" if fp8 else ", symmetric: true"))
    if not fp8 and any(t.spec.nbits != 8 or not t.spec.symmetric for t in plan.targets):
        raise ConfigError("scheme.weight: W8A8 in compressed-tensors (int-quantized) takes symmetric 8-bit INT "
                          "weights; set bits: 8, symmetric: true, or drop the activation section")
    return "float-quantized" if fp8 else "int-quantized"


def _check_spec(spec: QuantSpec, name: str, fmt: str) -> None:
    where = f"scheme.weight (module {name})"
    fp8 = fmt in ("naive-quantized", "float-quantized")
    if not fp8 and (spec.format != "int" or not 1 <= spec.nbits <= 8):
        raise ConfigError(f"{where}: compressed-tensors holds INT weights of 1-8 bits or FP8 E4M3, not "
                          f"{spec.format} {spec.nbits}-bit")
    if spec.granularity not in ("channel", "group"):
        raise ConfigError(f"{where}: granularity {spec.granularity!r}; pack-quantized holds channel or group")
    if not spec.symmetric and spec.zero_point != "int":
        raise ConfigError(f"{where}: zero_point: float has no place in compressed-tensors (integer zero "
                          "points only); use zero_point: int")


def pack_codes(signed: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit integers (rows, cols) into int32 words along the columns.

    Each value is offset by ``2 ** (bits - 1)``; element ``i`` of a row starts at bit ``i * bits`` of the row's
    bit stream (least significant first), split across two words where it straddles one.
    """
    rows, cols = signed.shape
    values = (signed.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    words = -(-cols * bits // 32)
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    out.index_add_(1, word, (values << shift) & 0xFFFFFFFF)
    spill = shift + bits > 32
    if bool(spill.any()):
        out.index_add_(1, word[spill] + 1, values[:, spill] >> (32 - shift[spill]))
    out = out[:, :words]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def _columns(grid: WeightGrid, cols: int) -> torch.Tensor:
    """Each input column's group index."""
    if grid.g_idx is not None:
        return grid.g_idx.long()
    if grid.spec.granularity == "group" and grid.spec.group_size:
        return torch.arange(cols) // grid.spec.group_size
    return torch.zeros(cols, dtype=torch.long)


def _off_grid(name: str) -> ConfigError:
    return ConfigError(f"the weight of {name} is not on its quantization grid (a low-rank correction or a "
                       "refiner changed it after quantization); compressed-tensors cannot hold it")


def linear_tensors(name: str, module: nn.Module, grid: WeightGrid, fmt: str = FORMAT) -> dict[str, torch.Tensor]:
    """The compressed tensors of one linear in format ``fmt``, after checking its weight is on its grid.

    Raises:
        ConfigError: The weight is not ``scale * (code - zero)`` for codes of the grid.

    """
    stored = weight_matrix(module).detach()
    W = stored.float()
    cols = _columns(grid, W.shape[1])
    scale, zero = grid.scale.float().to(W.device), grid.zero.float().to(W.device)
    s, z = scale[:, cols], zero[:, cols]
    if fmt in ("naive-quantized", "float-quantized"):  # FP8: the codes are the E4M3 values themselves
        values = (W / s).to(torch.float8_e4m3fn)
        if not torch.equal(s * values.float(), W):
            raise _off_grid(name)
        return {f"{name}.weight": values, f"{name}.weight_scale": scale.to(stored.dtype).contiguous()}
    codes = torch.round(W / s) + z
    half = 1 << (grid.spec.nbits - 1)
    if not torch.equal(s * (codes - z), W) or codes.min() < 0 or codes.max() > 2 * half - 1:
        raise _off_grid(name)
    if fmt == "int-quantized":
        return {f"{name}.weight": (codes - half).to(torch.int8).contiguous(),
                f"{name}.weight_scale": scale.to(stored.dtype).contiguous()}
    out = {
        f"{name}.weight_packed": pack_codes((codes - half).to(torch.int8), grid.spec.nbits),
        f"{name}.weight_scale": scale.to(stored.dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor([W.shape[0], in_features(module)], dtype=torch.int64),
    }
    if not grid.spec.symmetric:
        out[f"{name}.weight_zero_point"] = pack_codes((zero - half).to(torch.int8).T.contiguous(),
                                                      grid.spec.nbits).T.contiguous()
    return out


def quantization_config(grids: dict[str, WeightGrid], linears: list[str], fmt: str = FORMAT) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``: one config group per distinct weight spec."""
    fp8 = fmt in ("naive-quantized", "float-quantized")
    acts = None
    if fmt in ("int-quantized", "float-quantized"):
        acts = {"num_bits": 8, "type": "float" if fp8 else "int", "symmetric": True, "strategy": "token",
                "dynamic": True, "observer": None}
    by_spec: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for name, grid in grids.items():
        spec = grid.spec
        by_spec[(spec.nbits, spec.symmetric, spec.granularity, spec.group_size)].append(name)
    groups = {}
    for i, ((bits, symmetric, granularity, group_size), names) in enumerate(sorted(by_spec.items())):
        weights = {"num_bits": bits, "type": "float" if fp8 else "int", "symmetric": symmetric, "strategy": granularity,
                   "group_size": group_size if granularity == "group" else None, "dynamic": False,
                   "actorder": None, "observer": "minmax"}
        groups[f"group_{i}"] = {"targets": sorted(names), "weights": weights, "input_activations": acts,
                                "output_activations": None, "format": fmt}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(n for n in linears if n not in grids),
            "kv_cache_scheme": None, "version": LIBRARY_VERSION}


def write_compressed(model: nn.Module, tokenizer: Any, out: Path, grids: dict[str, WeightGrid],
                     fmt: str = FORMAT) -> None:
    """Write ``model`` (quantized in place, its grids in ``grids``) as a ``fmt`` checkpoint to ``out``."""
    modules = dict(model.named_modules())
    state = dict(model.state_dict())
    for name, grid in grids.items():
        state.pop(f"{name}.weight")
        state.update(linear_tensors(name, modules[name], grid, fmt))
    save_checkpoint(model, tokenizer, out, state)
    config = json.loads((out / "config.json").read_text())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    config["quantization_config"] = quantization_config(grids, linears, fmt)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
