"""Results of the FP model kept on disk, keyed by content, so a sweep computes each of them once.

Each entry is one file named by a hash of what decides its content (the model's fingerprint, the device
type it ran on, its dtype, the exact tokens or settings). It is written to a temporary name and renamed,
so a crash never leaves a half-written entry. A model without a fingerprint has no entry: its results
are computed and not kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")


def content_key(**parts: Any) -> str:
    """A 24-hex key of the given parts (tensors by a hash of their values, the rest as JSON)."""
    plain = {k: _plain(v) for k, v in parts.items()}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:24]


def tokens_digest(ids: torch.Tensor) -> str:
    """A short hash of token ids (as int64), for keys."""
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tokens_digest(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if isinstance(value, int | float | str | bool) or value is None else str(value)


def entry(root: Path, suffix: str, model: nn.Module | str, fingerprint: str | None, **parts: Any) -> Path | None:
    """The file of an FP result of ``model`` (keyed by its fingerprint, device type and ``parts``), or None.

    ``model`` is the model, or the device type (``cpu``, ``cuda``) it will run on.
    """
    if fingerprint is None:
        return None
    device = model if isinstance(model, str) else next(model.parameters()).device.type
    return root / f"{content_key(fingerprint=fingerprint, device=device, **parts)}{suffix}"


def load_or_compute(
    path: Path | None,
    load: Callable[[Path], T | None],
    compute: Callable[[], T],
    save: Callable[[T, Path], None],
) -> tuple[T, bool]:
    """The entry at ``path``: read back, or computed and written atomically.

    Args:
        path: The entry's file (None: compute, keep nothing).
        load: Reads the file; returns None when its content does not fit (then it is recomputed).
        compute: Computes the value.
        save: Writes the value to a file.

    Returns:
        The value, and whether it was computed now.

    """
    if path is None:
        return compute(), True
    if path.is_file():
        value = load(path)
        if value is not None:
            with contextlib.suppress(OSError):
                os.utime(path)  # last use, for the cache's LRU bound
            return value, False
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save(value, tmp)
    tmp.replace(path)
    log.info("computed once and cached: %s", path)
    return value, True
