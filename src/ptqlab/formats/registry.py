"""The export formats, registered like methods: each a check before any work and a write.

A new format is one module with its check and its write, and one :func:`register_exporter` line below.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..pipeline.driver import WeightGrid
from ..pipeline.plan import QuantizationPlan
from .common import save_checkpoint
from .compressed import check_compressed, write_compressed
from .gguf import check_gguf, write_gguf
from .hf import check_hf

GGUF_FILE = "model.gguf"


@dataclass(frozen=True)
class Written:
    """What a write gets: the quantized model, its tokenizer and grids, the directory to fill.

    Attributes:
        model: The quantized model in memory (None when the run was streamed: see ``checkpoint``).
        tokenizer: Its tokenizer.
        out: The directory to create and fill.
        grids: Each quantized linear's grid, by module name.
        layout: What the check returned (compressed-tensors' own format name).
        source: Where the FP model was loaded from.
        checkpoint: The quantized model as a Hugging Face directory on disk (a streamed run's), or None.

    """

    model: nn.Module | None
    tokenizer: Any
    out: Path
    grids: dict[str, WeightGrid]
    layout: str
    source: str | None = None
    checkpoint: Path | None = None


@dataclass(frozen=True)
class Exporter:
    """One export format.

    Attributes:
        name: The ``--format`` value.
        check: Refuse, naming the field, what the format cannot hold (before any work); returns its layout.
        write: Write the quantized model (in memory) to ``Written.out``.
        write_checkpoint: Write it from a quantized checkpoint on disk, layer by layer (a streamed run's);
            None when the format does not do that yet.
        grids: The write needs the quantized linears' grids (packed codes).

    """

    name: str
    check: Callable[[QuantizationPlan, Any], str]
    write: Callable[[Written], None]
    write_checkpoint: Callable[[Written], None] | None = None
    grids: bool = True


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> None:
    """Make ``exporter`` a ``--format`` (replacing one of the same name)."""
    EXPORTERS[exporter.name] = exporter


def exporter_for(fmt: str) -> Exporter:
    """The registered exporter of ``fmt``.

    Raises:
        ConfigError: ``fmt`` is not a registered format (the known ones are named).

    """
    if fmt not in EXPORTERS:
        raise ConfigError(f"--format {fmt!r} is not an export format; use one of {', '.join(EXPORTERS)}")
    return EXPORTERS[fmt]


def _check_hf(plan: QuantizationPlan, config: Any) -> str:
    check_hf(plan)
    return "hf"


def _check_gguf(plan: QuantizationPlan, config: Any) -> str:
    check_gguf(plan, config)
    return "gguf"


def _write_hf(w: Written) -> None:
    assert w.model is not None
    save_checkpoint(w.model, w.tokenizer, w.out)


def _copy_checkpoint(w: Written) -> None:
    """The quantized checkpoint's own files (shards, index, config), and the tokenizer's."""
    assert w.checkpoint is not None
    w.out.mkdir(parents=True)
    for f in sorted(w.checkpoint.iterdir()):
        if f.is_file() and not f.name.startswith("ptqlab-"):
            shutil.copy2(f, w.out / f.name)
    if w.tokenizer is not None:
        w.tokenizer.save_pretrained(w.out)


def _write_gguf(w: Written) -> None:
    assert w.model is not None
    w.out.mkdir(parents=True)
    write_gguf(w.model, w.tokenizer, w.out / GGUF_FILE, w.grids, w.source)


def _write_compressed(w: Written) -> None:
    assert w.model is not None
    write_compressed(w.model, w.tokenizer, w.out, w.grids, w.layout)


register_exporter(Exporter("hf", _check_hf, _write_hf, _copy_checkpoint, grids=False))
register_exporter(Exporter("compressed-tensors", lambda plan, _config: check_compressed(plan), _write_compressed))
register_exporter(Exporter("gguf", _check_gguf, _write_gguf))
