"""torch's thread count fitted to the cores other programs leave free.

Two torch threads on two cores beside another busy program do not get two cores: each parallel region
waits for the thread that the operating system descheduled, and the work slows by more than the lost core
explains (``bench/bench_contention.py``: ZeroQuant-Local 2.9x, perplexity 2.6x beside another torch
program). At a few coarse points (each layer of the quantization loop, each training step of a layer
refiner, each perplexity batch, each divergence window and retrieval sample) :func:`fit_threads` reads how
busy the machine was since the last point, leaving out this process's own work (the first reading is
taken when ptqlab is imported), and sets torch's threads to the cores that were free, at least one and at
most the ceiling (torch's own default, or ``PTQLAB_THREADS``). ``PTQLAB_THREADS=N`` fixes the count at N
and turns the fitting off.

The thread count must not change the numbers, or fitting would make reruns differ. Two things see to it.
MKL (torch's BLAS on x86) splits some matrix products between threads in a way that changes their sums
(a (2048 x 2048) by (2048 x 256) product, a k or v projection of a 2048-wide model, differs between 1 and
2 threads); its strict reproducible mode (``MKL_CBWR=AUTO,STRICT``: the fastest code path of this
processor, the same bits whatever the thread count) does not. :mod:`ptqlab` sets that variable when it is
imported, unless it is already set, so child processes inherit it, and :func:`strict_blas` switches the
mode on in this process (it can only be switched before MKL's first product: import ptqlab before running
torch, or a warning says it could not). Factorisations (Cholesky, QR, SVD) are not covered by the strict
mode: they run on one thread (:func:`single_thread`).

Linux only (``/proc``); elsewhere the count stays as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_MIN_INTERVAL_S = 0.5


@dataclass
class _Reading:
    at: float
    busy: float  # clock ticks all CPUs spent working
    total: float  # clock ticks of all CPUs
    own: float  # clock ticks this process spent (every thread)


def _read() -> _Reading | None:
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])
    return _Reading(time.monotonic(), total - idle, total, float(parts[11]) + float(parts[12]))


class _Fitter:
    def __init__(self) -> None:
        self._ceiling: int | None = None  # torch's count at the first fit (after any executor set it)
        self.last: _Reading | None = _read()  # the first reading, when ptqlab is imported

    @property
    def ceiling(self) -> int:
        if self._ceiling is None:
            self._ceiling = torch.get_num_threads()
        return self._ceiling

    def fixed(self) -> int | None:
        value = os.environ.get("PTQLAB_THREADS", "auto").strip().lower()
        if value in ("", "auto"):
            return None
        try:
            n = int(value)
        except ValueError:
            log.warning("PTQLAB_THREADS=%r is not a number or 'auto'; fitting threads to free cores", value)
            return None
        return max(1, n)

    def fit(self) -> int:
        ceiling = self.ceiling  # read before a fixed count changes torch's
        fixed = self.fixed()
        if fixed is not None:
            if torch.get_num_threads() != fixed:
                torch.set_num_threads(fixed)
            return fixed
        last = self.last
        if last is not None and time.monotonic() - last.at < _MIN_INTERVAL_S:
            return torch.get_num_threads()
        now = _read()
        if now is None:
            return torch.get_num_threads()
        self.last = now
        if last is None or now.total <= last.total:
            return torch.get_num_threads()
        cpus = os.cpu_count() or 1
        busy_cores = (now.busy - last.busy) / (now.total - last.total) * cpus
        own_cores = (now.own - last.own) / (os.sysconf("SC_CLK_TCK") * (now.at - last.at))
        others = max(0.0, busy_cores - own_cores)
        threads = max(1, min(ceiling, round(_usable_cores() - others)))
        if threads != torch.get_num_threads():
            log.debug("other programs keep %.1f cores busy: %d torch threads", others, threads)
            torch.set_num_threads(threads)
        return threads


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_FITTER: _Fitter | None = _Fitter()


def _fitter() -> _Fitter:
    global _FITTER
    if _FITTER is None:
        _FITTER = _Fitter()
    return _FITTER


def fit_threads() -> int:
    """Set torch's threads to the cores other programs left free since the last call; returns the count.

    Cheap (two small reads of ``/proc``): call it between pieces of work of a second or more. A call less
    than half a second after the previous one changes nothing.
    """
    return _fitter().fit()


def thread_ceiling() -> int:
    """The most threads :func:`fit_threads` uses (``PTQLAB_THREADS`` when set)."""
    fitter = _fitter()
    ceiling = fitter.ceiling
    return fitter.fixed() or ceiling


@contextmanager
def single_thread() -> Iterator[None]:
    """Run a factorisation on one thread: its result then does not depend on the thread count.

    (A 2-thread Cholesky also collapses when another program holds a core.)
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_MKL_AUTO, _MKL_STRICT, _MKL_ALL = 2, 0x10000, -1


def _mkl() -> ctypes.CDLL | None:
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        mkl = ctypes.CDLL(str(lib))
        mkl.mkl_serv_cbwr_get.argtypes = mkl.mkl_serv_cbwr_set.argtypes = [ctypes.c_int]
        return mkl
    except (OSError, AttributeError):  # not Linux, or a torch without MKL (its BLAS does not split sums so)
        return None


def strict_blas() -> bool:
    """Switch MKL's matrix products to strict reproducible mode: the same bits whatever the thread count.

    Does nothing where torch has no MKL, or where the user set ``MKL_CBWR`` to a mode without STRICT.

    Returns:
        Whether MKL's products now give the same bits on any thread count (True without MKL).

    """
    mkl = _mkl()
    if mkl is None:
        return True
    if mkl.mkl_serv_cbwr_get(_MKL_ALL) & _MKL_STRICT:
        return True
    setting = os.environ.get("MKL_CBWR", "")
    if "STRICT" not in setting.upper():
        log.info("MKL_CBWR=%s: MKL's products may change with the thread count (reruns may differ)", setting)
        return False
    if mkl.mkl_serv_cbwr_set(_MKL_AUTO | _MKL_STRICT) == 0:
        return True
    log.warning("MKL ran before ptqlab was imported, so its strict reproducible mode is off: results may change "
                "with the thread count. Import ptqlab before running torch, or set MKL_CBWR=AUTO,STRICT.")
    return False


strict_blas()
