"""Memory budgets: sizes written as ``8GiB`` or ``512MB``, what the machine has free, what a model needs."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Bytes of a size: an integer, or a number with a unit (``8GiB``, ``512MB``, ``1.5gb``).

    Raises:
        ValueError: Not a size.

    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"a size must be positive, got {value}")
        return value
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size (use bytes, or a number with B, KB, MB, GB, KiB, MiB, GiB)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return size


def format_size(n: float) -> str:
    """``n`` bytes as a short human size (``1.2 GiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _proc_bytes(path: str, key: str) -> int | None:
    """The ``key:  N kB`` line of a Linux ``/proc`` file in bytes, or None where there is none."""
    file = Path(path)
    if file.is_file():
        for line in file.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def physical_memory() -> int:
    """Bytes of physical memory (``sysconf``; ValueError or OSError where the platform has no such names)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``, else the physical total)."""
    found = _proc_bytes("/proc/meminfo", "MemAvailable")
    return found if found is not None else physical_memory()


@lru_cache(maxsize=1)
def libc() -> Any:
    """The C library (glibc) through ctypes, or None (another platform or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def return_freed() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``); False where there is no glibc.

    Large transient work (tokenizing a whole corpus) leaves its freed buffers in the heap, counted in the
    process's resident memory until something reuses them.
    """
    lib = libc()
    return bool(lib is not None and lib.malloc_trim(0))


def reset_peak() -> bool:
    """Start this process's peak resident memory (``VmHWM``) again from its current size; False where Linux can't.

    Writes ``5`` to ``/proc/self/clear_refs`` (Linux 4.0 and later), so a long-lived worker can read each
    run's own peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def resident_bytes(peak: bool = False) -> int | None:
    """Resident memory of this process (Linux ``VmRSS``; ``peak``: its high-water mark ``VmHWM``), or None."""
    return _proc_bytes("/proc/self/status", "VmHWM" if peak else "VmRSS")
