"""``scheme.embedding``: the input embedding matrix rounded to nearest on its grid, after the layer loop.

One rounding for both residencies: :func:`ptqlab.pipeline.quantize.quantize` rounds the resident matrix in
place, :func:`ptqlab.pipeline.stream.quantize_streamed` rounds the checkpoint's tensor and writes it (and a tied
head's name, where the checkpoint stores one) into the quantized checkpoint's shard of the outer modules.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..methods.rtn import RTN
from .driver import QuantizeReport
from .plan import EmbeddingTarget


def round_embedding(weight: torch.Tensor, target: EmbeddingTarget, module: nn.Module, report: QuantizeReport,
                    keep_grid: bool) -> torch.Tensor:
    """``weight`` (the embedding matrix) rounded to nearest on ``target.spec``, in its own dtype.

    The calibrated layer loop has seen the FP embeddings. Rounding to nearest is what llama.cpp does to its
    embedding tensor. With ``keep_grid`` the grid is recorded in ``report`` for ``module`` (for the exports);
    the time goes to ``report.timings["embedding_s"]``.
    """
    t0 = time.perf_counter()
    result = RTN().quantize(weight.detach(), target.spec)
    if keep_grid:
        report.keep_grid(target.name, module, target.spec, result)
    report.timings["embedding_s"] = time.perf_counter() - t0
    return result.weight.to(weight.dtype)
