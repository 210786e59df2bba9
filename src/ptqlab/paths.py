"""Where ptqlab keeps what it computes once and reuses (GGUF conversions, FP references)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$PTQLAB_CACHE``, or ~/.cache/ptqlab."""
    return Path(os.environ.get("PTQLAB_CACHE") or Path.home() / ".cache" / "ptqlab")
