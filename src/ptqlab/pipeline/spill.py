"""Calibration hidden states past the memory budget: kept in memory-mapped files instead of anonymous RAM.

Between two decoder layers calibration holds every chunk's hidden states (tokens x hidden width, the
inputs of the next layer). For a 7B model and 128 x 2048 calibration tokens that is 4.3 GB in float32, as
much again while a layer's outputs are made. Past the budget each layer's outputs are copied into one
file-backed buffer (``MAP_SHARED``): the kernel writes its pages out and reads them back when the next
layer asks, so they leave the process's anonymous memory. The file is unlinked as soon as it is mapped,
so nothing is left behind on any exit; its space is freed when the last view of it goes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class HiddenSpill:
    """Copies lists of CPU tensors into unlinked memory-mapped files under ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory

    def keep(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """File-backed copies of ``tensors`` (views of one buffer; same values, shapes and dtype).

        Raises:
            ValueError: Tensors of several dtypes, or not on the CPU.

        """
        if not tensors:
            return []
        dtype = tensors[0].dtype
        if any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
            raise ValueError("hidden states to spill must be CPU tensors of one dtype")
        fd, name = tempfile.mkstemp(prefix="ptqlab-hidden-", suffix=".bin", dir=self.directory)
        os.close(fd)
        try:
            flat = torch.from_file(name, shared=True, size=sum(t.numel() for t in tensors), dtype=dtype)
        finally:
            os.unlink(name)  # the mapping stays valid until its last view is gone
        out, offset = [], 0
        for t in tensors:
            view = flat[offset : offset + t.numel()].view(t.shape)
            view.copy_(t)
            out.append(view)
            offset += t.numel()
        return out
