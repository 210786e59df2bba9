"""Keep glibc from hoarding freed activation buffers during the threaded calibration pass.

glibc raises its mmap threshold dynamically after large blocks are freed, and gives each thread its own
arena: the chunk threads of :mod:`ptqlab.pipeline.sequential` then leave tens of MB each of freed
activations in arenas that are never returned to the OS (peak RSS measured at 4.1 GB instead of 1.5 GB
on four SmolLM2 layers). A fixed threshold makes every large tensor its own mapping, returned when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from functools import lru_cache

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 4 << 20


@lru_cache(maxsize=1)
def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 4 MiB (once per process); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
    log.debug("glibc mmap threshold fixed at %d bytes: %s", THRESHOLD_BYTES, ok)
    return ok
