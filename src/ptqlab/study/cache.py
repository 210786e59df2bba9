"""The disk cache under ``$PTQLAB_CACHE``: what is in it, emptying it, an LRU size bound, quantized models.

Every kind of cached result lives in its own folder (``perplexity``, ``divergence``, ``lm_eval``, ``gguf``,
``qmodels``). Entries are files (a GGUF's dequantized copy is a folder) written to a temporary name and
renamed, so a crash never leaves half an entry. A hit touches the entry's modification time, so the size
bound (``PTQLAB_CACHE_MAX_GB``, default 20) evicts the least recently used entries first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MAX_GB = 20.0


@dataclass(frozen=True)
class CacheEntry:
    """One entry: its kind (folder), path, size in bytes and last use (epoch seconds)."""

    kind: str
    path: Path
    size: int
    used: float


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache, least recently used first."""
    base = root or cache_root()
    out = []
    if base.is_dir():
        for kind in sorted(p for p in base.iterdir() if p.is_dir()):
            for item in kind.iterdir():
                if item.name.endswith(".tmp"):
                    continue
                out.append(CacheEntry(kind.name, item, _size(item), item.stat().st_mtime))
    return sorted(out, key=lambda e: e.used)


def clear(kind: str | None = None, root: Path | None = None) -> int:
    """Remove every entry (of one kind); returns the bytes freed."""
    freed = 0
    for e in entries(root):
        if kind is None or e.kind == kind:
            _remove(e.path)
            freed += e.size
    return freed


def max_bytes() -> int:
    """The size bound: ``PTQLAB_CACHE_MAX_GB`` (default 20) in bytes."""
    try:
        gb = float(os.environ.get("PTQLAB_CACHE_MAX_GB", DEFAULT_MAX_GB))
    except ValueError:
        gb = DEFAULT_MAX_GB
    return int(gb * 1024**3)


def enforce_limit(limit: int | None = None, root: Path | None = None, keep: Path | None = None) -> int:
    """Evict least recently used entries until the cache fits ``limit`` bytes; returns the bytes freed."""
    bound = max_bytes() if limit is None else limit
    listed = entries(root)
    total = sum(e.size for e in listed)
    freed = 0
    for e in listed:
        if total - freed <= bound:
            break
        if keep is not None and e.path == keep:
            continue
        _remove(e.path)
        freed += e.size
        log.info("cache over %.1f GB: evicted %s (%.1f MB)", bound / 1024**3, e.path, e.size / 1e6)
    return freed


def touch(path: Path) -> None:
    """Mark an entry as just used."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class QModelCache:
    """Quantized models on disk by their qmodel key: the tensors quantization changed, and its report.

    Only a model whose structure is the FP model's (the same state-dict names, no hooks a model transform
    installed) is kept; rotated models with online hooks are quantized again when needed.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "qmodels"

    def path(self, key: str, device: str) -> Path:
        """The entry of a quantized model (by qmodel key and device type)."""
        return self.root / f"{key}-{device}.safetensors"

    def load(self, key: str, device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The kept tensors and report of a quantized model, or None."""
        path = self.path(key, device)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["ptqlab"])
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # noqa: BLE001 - an unreadable entry is recomputed
            log.warning("unreadable cached quantized model %s (%s): quantizing again", path, exc)
            return None
        touch(path)
        return tensors, meta

    def save(self, key: str, device: str, fp_state: dict[str, torch.Tensor], model: nn.Module,
             report: dict[str, Any], hooks: bool) -> bool:
        """Keep the tensors of ``model`` that differ from ``fp_state``; False when the model cannot be kept."""
        state = model.state_dict()
        if hooks or set(state) != set(fp_state):
            return False
        changed = {k: v.detach().cpu().contiguous() for k, v in state.items()
                   if not torch.equal(v.cpu(), fp_state[k])}
        path = self.path(key, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(_untied(changed), str(tmp), metadata={"ptqlab": json.dumps(report), "saved": str(time.time())})
        tmp.replace(path)
        enforce_limit(keep=path)
        return True


def _untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors that share memory copied apart (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out
