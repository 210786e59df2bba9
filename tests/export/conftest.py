"""Shared by the export tests: a private cache, and the run's quantized model made here the run's way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

from ptqlab.compile import bind, compile_config
from ptqlab.models.loading import load_model
from ptqlab.pipeline.quantize import quantize
from ptqlab.study.config import parse_config


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def quantized_here() -> Callable[[dict], nn.Module]:
    """Quantize a configuration's model by the run's path (compile, bind, quantize), in this process."""

    def make(data: dict) -> nn.Module:
        cfg = parse_config(data)
        loaded = load_model(cfg.model, cfg.dtype, "cpu")
        plan = bind(compile_config(cfg), loaded.model, loaded.tokenizer)
        quantize(loaded.model, plan.quantization, progress=False, options=plan.options)
        return loaded.model.eval()

    return make
