"""torch's threads fitted to the cores other programs leave free (``ptqlab.threads``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from ptqlab import threads


@pytest.fixture
def fitter(monkeypatch):
    """A fresh fitter whose ceiling is this process's thread count; torch's count restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_FITTER", None)
    yield threads
    torch.set_num_threads(before)


def test_a_fixed_count_is_kept(fitter, monkeypatch) -> None:
    default = torch.get_num_threads()
    monkeypatch.setenv("PTQLAB_THREADS", "1")
    assert fitter.fit_threads() == 1 == torch.get_num_threads() and fitter.thread_ceiling() == 1
    monkeypatch.setenv("PTQLAB_THREADS", "many")  # not a number: fitted to the free cores, with a warning
    assert fitter.thread_ceiling() == default


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc")
def test_a_busy_core_elsewhere_takes_a_thread(fitter, monkeypatch) -> None:
    monkeypatch.delenv("PTQLAB_THREADS", raising=False)
    usable = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable)]
    try:
        time.sleep(0.5)
        fitter.fit_threads()  # the first reading
        time.sleep(1.0)
        assert fitter.fit_threads() == 1  # every core busy elsewhere: one thread
    finally:
        for p in busy:
            p.kill()
            p.wait()
