"""A sweep worker frees each run's model copy when the run ends, not at the next full garbage collection."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from torch import nn

from ptqlab.memory import reset_peak, resident_bytes
from ptqlab.study.config import parse_config
from ptqlab.study.worker import Worker

BASE = {
    "model": "stories260k",
    "scheme": {"weight": {"bits": 4}},
    "evaluate": {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 1, "sensitivity": None, "sample": None},
    "calibration": {"samples": 2, "seqlen": 64, "batch_size": 2},
}


def _models_alive() -> int:
    """Whole causal LMs reachable or not yet collected (no collection is run here)."""
    kinds = (type(o) for o in gc.get_objects())
    return sum(1 for kind in kinds if issubclass(kind, nn.Module) and kind.__name__.endswith("ForCausalLM"))


@pytest.mark.parametrize("extra", [{}, {"activation": {"bits": 8}}, {"kv_cache": {"bits": 4}}],
                         ids=["weights", "activations", "kv-cache"])
def test_only_the_fp_model_outlives_a_run(tmp_path: Path, monkeypatch, extra: dict) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    gc.collect()
    before = _models_alive()
    worker = Worker(progress=False)
    for _ in range(2):
        record = worker.run(parse_config({**BASE, "scheme": {**BASE["scheme"], **extra}}))
        assert record.status == "done", record.error
        assert _models_alive() == before + 1  # the worker's FP model; each run's quantized copy is gone


def test_each_run_records_its_own_peak(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    if not reset_peak():
        pytest.skip("no /proc/self/clear_refs: the peak cannot be reset on this system")
    worker = Worker(progress=False)
    worker.run(parse_config(BASE))  # the model loaded and every lazy import done before the measured run
    spike = torch.ones(768 * 2**20 // 4)  # 768 MiB touched, then freed: a peak from before the run
    del spike
    before = resident_bytes(peak=True) or 0
    record = worker.run(parse_config({**BASE, "scheme": {"weight": {"bits": 3, "granularity": "channel"}}}))
    peak = record.timings["peak_rss_bytes"]
    assert 0 < peak < before - 512 * 2**20  # the run's own peak (a small model), not the earlier spike's
