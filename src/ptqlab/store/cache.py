"""The disk cache under ``$PTQLAB_CACHE``: what is in it, emptying it, an LRU size bound.

Every kind of cached result lives in its own folder (``perplexity``, ``divergence``, ``lm_eval``, ``gguf``,
``qmodels``). Entries are files (a GGUF's dequantized copy is a folder) written to a temporary name and
renamed, so a crash never leaves half an entry. A hit touches the entry's modification time, so the size
bound (``PTQLAB_CACHE_MAX_GB``, default 20) evicts the least recently used entries first. Quantized
models are kept by :mod:`ptqlab.study.qmodels`.

Two folders are not results and the bound never evicts them (nor counts them): ``models``, the checkpoints
``make models`` downloaded (gone, they cost a download), and ``stream``, the offload folder of a streamed run
in progress. ``clear()`` without a kind leaves ``models`` too; ``clear("models")`` removes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MAX_GB = 20.0
PINNED_KINDS = frozenset({"models", "stream"})  # never evicted by the size bound
DOWNLOADS = "models"  # left by clear() unless named


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
    """Remove every entry (of one kind; without one, all but the downloaded models); returns the bytes freed."""
    freed = 0
    for e in entries(root):
        if (kind is None and e.kind != DOWNLOADS) or e.kind == kind:
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
    """Evict least recently used entries until the cache fits ``limit`` bytes; returns the bytes freed.

    The pinned folders (:data:`PINNED_KINDS`: downloaded models, a streamed run's offload) are neither counted
    nor evicted.
    """
    bound = max_bytes() if limit is None else limit
    listed = [e for e in entries(root) if e.kind not in PINNED_KINDS]
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
