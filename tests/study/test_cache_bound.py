"""The disk cache's size bound: least recently used results go first; downloads and live offloads never."""

from __future__ import annotations

import os
from pathlib import Path

from ptqlab.store import cache


def _entry(root: Path, kind: str, name: str, size: int, used: float) -> Path:
    path = root / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (used, used))
    return path


def test_the_bound_evicts_old_results_but_never_models_or_stream(tmp_path: Path) -> None:
    model = _entry(tmp_path, "models", "qwen.gguf", 5000, used=1.0)  # the oldest and the largest
    offload = _entry(tmp_path, "stream", "layer0.pt", 3000, used=2.0)
    old = _entry(tmp_path, "qmodels", "a.safetensors", 400, used=3.0)
    mid = _entry(tmp_path, "divergence", "b.npz", 400, used=4.0)
    new = _entry(tmp_path, "qmodels", "c.safetensors", 400, used=5.0)
    freed = cache.enforce_limit(limit=800, root=tmp_path)  # pinned folders not counted: 1200 bytes of results
    assert freed == 400
    assert not old.exists() and mid.exists() and new.exists()
    assert model.exists() and offload.exists()


def test_clear_keeps_downloads_unless_named(tmp_path: Path) -> None:
    model = _entry(tmp_path, "models", "qwen.gguf", 10, used=1.0)
    result = _entry(tmp_path, "perplexity", "p.json", 10, used=2.0)
    assert cache.clear(root=tmp_path) == 10
    assert model.exists() and not result.exists()
    assert cache.clear("models", root=tmp_path) == 10
    assert not model.exists()
