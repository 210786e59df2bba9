"""The one store of quantized models, by weights key: what runs keep and what export reads.

A quantized model is kept in one of two layouts, with the same record of how it was made:

- *resident* (a run on a model in memory): a directory under ``$PTQLAB_CACHE/qmodels`` of the tensors
  quantization changed (every tensor when the FP model was not kept to compare with);
- *checkpoint* (a streamed run): a complete Hugging Face directory written layer by layer under
  ``runtime.offload_dir``, named by the weights key.

Both hold the quantization report (layer records, the refiners' losses, the methods' metrics, the outlier
columns) and the grid of every quantized linear (its scales, zero points and column groups), so an
exporter writes a stored model's codes without quantizing again. An entry is complete or absent: a
resident entry is written beside its place and renamed; a checkpoint's record is written last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..metrics import Metric
from ..models.shards import Checkpoint
from ..paths import cache_root
from ..pipeline.driver import LayerRecord, QuantizeReport, WeightGrid
from ..pipeline.outliers import outlier_masks
from ..quant.spec import QuantSpec
from .cache import enforce_limit, touch

log = logging.getLogger(__name__)

RECORD = "ptqlab-qmodel.json"
"""A checkpoint entry's record (written last: its presence marks a finished model)."""
GRIDS = "ptqlab-grids.safetensors"
"""An entry's grids."""
CHUNK_BYTES = 256 * 1024**2
"""The most bytes of tensors in one file of a resident entry."""
_GRID = "ptqlab.grid."


@dataclass
class StoredModel:
    """A quantized model read from the store.

    Attributes:
        report: Its quantization report, grids included (size metrics are measured again where it is used).
        chunks: The files of tensors to put into the FP model (resident layout), or None.
        checkpoint: The complete quantized checkpoint (checkpoint layout), or None.

    """

    report: QuantizeReport
    chunks: list[Path] | None = None
    checkpoint: Checkpoint | None = None

    def restore_into(self, model: nn.Module) -> None:
        """Copy a resident entry's tensors into ``model`` (the FP model), one chunk at a time.

        Raises:
            ValueError: A tensor the model does not have, or of another shape.

        """
        state = model.state_dict()
        for chunk in self.chunks or []:
            tensors = load_file(str(chunk))
            for name, tensor in tensors.items():
                if name not in state or state[name].shape != tensor.shape:
                    raise ValueError(f"kept quantized weight {name!r} does not fit the model")
                with torch.no_grad():
                    state[name].copy_(tensor)


def _record(report: QuantizeReport, sizes: set[str]) -> dict[str, Any]:
    return {"records": [dataclasses.asdict(r) for r in report.records], "distill": report.distill,
            "metrics": [dataclasses.asdict(m) for m in report.metrics if m.name not in sizes],
            "outliers": {n: m.nonzero().flatten().tolist() for n, m in report.outliers.items()}}


def _grid_tensors(grids: Mapping[str, WeightGrid]) -> dict[str, torch.Tensor]:
    out = {}
    for name, g in grids.items():
        out[f"{_GRID}{name}.scale"] = g.scale.detach().cpu().contiguous()
        out[f"{_GRID}{name}.zero"] = g.zero.detach().cpu().contiguous()
        if g.g_idx is not None:
            out[f"{_GRID}{name}.g_idx"] = g.g_idx.detach().cpu().contiguous()
    return out


def _report(record: Mapping[str, Any], grids: Mapping[str, torch.Tensor], model: nn.Module,
            specs: Mapping[str, QuantSpec]) -> QuantizeReport:
    """The report a kept model was stored with; its grids bound to ``model``'s linears and their ``specs``."""
    report = QuantizeReport(records=[LayerRecord(**r) for r in record["records"]], distill=record["distill"],
                            metrics=[Metric(**m) for m in record["metrics"]],
                            outliers=outlier_masks(record.get("outliers", {}), model))
    for key in grids:
        if key.startswith(_GRID) and key.endswith(".scale"):
            name = key[len(_GRID):-len(".scale")]
            report.grids[name] = WeightGrid(model.get_submodule(name), specs[name], grids[key],
                                            grids[f"{_GRID}{name}.zero"], grids.get(f"{_GRID}{name}.g_idx"))
    return report


class QuantizedModels:
    """Quantized models on disk by weights key (and device type), in either layout.

    A resident entry is a directory ``{key}-{device}`` under ``root`` of safetensors chunks (each at most
    :data:`CHUNK_BYTES`, so neither writing nor restoring holds a second copy of the model), the grids
    and the record, written beside it and renamed.

    Args:
        root: Where resident entries live (default ``$PTQLAB_CACHE/qmodels``).

    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "qmodels"

    def path(self, key: str, device: str) -> Path:
        """The resident entry of a quantized model (by weights key and device type)."""
        return self.root / f"{key}-{device}"

    def load(self, key: str, device: str, model: nn.Module, specs: Mapping[str, QuantSpec]) -> StoredModel | None:
        """The resident entry's report (bound to ``model``, the FP model) and tensor chunks, or None."""
        path = self.path(key, device)
        if not (path / RECORD).is_file():
            return None
        try:
            grids = load_file(str(path / GRIDS))
            report = _report(json.loads((path / RECORD).read_text()), grids, model, specs)
        except Exception as exc:  # noqa: BLE001 - an unreadable entry is recomputed
            log.warning("unreadable stored quantized model %s (%s): quantizing again", path, exc)
            return None
        touch(path)
        return StoredModel(report, chunks=sorted(path.glob("tensors-*.safetensors")))

    def save(self, key: str, device: str, model: nn.Module, report: QuantizeReport, sizes: set[str],
             fp_state: Mapping[str, torch.Tensor] | None = None) -> bool:
        """Keep ``model`` as a resident entry: the tensors that differ from ``fp_state`` (all without it).

        Returns:
            False when the model cannot be kept: a model transform installed hooks, or its tensors are not
            the FP model's (the structure changed).

        """
        state = model.state_dict()
        if report.hooks or (fp_state is not None and set(state) != set(fp_state)):
            return False
        kept = _untied({k: v for k, v in state.items() if fp_state is None or not torch.equal(v.cpu(), fp_state[k])})
        path = self.path(key, device)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, chunk in enumerate(_chunks(kept)):
            save_file({k: v.detach().cpu().contiguous() for k, v in chunk.items()},
                      str(tmp / f"tensors-{i:05d}.safetensors"))
        save_file(_grid_tensors(report.grids), str(tmp / GRIDS))
        (tmp / RECORD).write_text(json.dumps(_record(report, sizes)))
        shutil.rmtree(path, ignore_errors=True)
        tmp.replace(path)
        enforce_limit(keep=path)
        return True

    @staticmethod
    def load_checkpoint(out: Path, model: nn.Module, specs: Mapping[str, QuantSpec]) -> StoredModel | None:
        """The checkpoint entry in ``out`` (finished: its record is there), bound to the skeleton ``model``."""
        marker = out / RECORD
        if not marker.is_file():
            return None
        grids = load_file(str(out / GRIDS)) if (out / GRIDS).is_file() else {}
        return StoredModel(_report(json.loads(marker.read_text()), grids, model, specs), checkpoint=Checkpoint(out))

    @staticmethod
    def clear_checkpoint(out: Path) -> None:
        """Remove a checkpoint entry (it is written anew in its place)."""
        shutil.rmtree(out, ignore_errors=True)

    @staticmethod
    def finish_checkpoint(out: Path, report: QuantizeReport, sizes: set[str]) -> Checkpoint:
        """Mark the checkpoint written in ``out`` finished: its grids, then its record."""
        save_file(_grid_tensors(report.grids), str(out / GRIDS))
        (out / RECORD).write_text(json.dumps(_record(report, sizes)))
        return Checkpoint(out)


def _chunks(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in order, cut into groups of at most :data:`CHUNK_BYTES` (a larger tensor alone)."""
    out: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if out[-1] and size + n > CHUNK_BYTES:
            out.append({})
            size = 0
        out[-1][name] = t
        size += n
    return out


def _untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor once (safetensors refuses shared storage).

    A tied name (the same storage, offset and shape as one kept) is left out: restoring the one kept
    restores both. Other tensors that share storage are copied apart.
    """
    seen: set[int] = set()
    aliases: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        alias = (ptr, int(t.storage_offset()), tuple(t.shape))
        if alias in aliases:
            continue
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
        aliases.add(alias)
    return out
