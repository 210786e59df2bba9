"""Quantize a model that is not resident: one decoder layer in memory at a time, written out as it is done.

The model is a skeleton on the meta device (:func:`ptqlab.models.shards.skeleton`). The layer driver asks a
:class:`LayerStream` for each layer it works on: the layer is read from the checkpoint's shards, quantized,
written to the output directory as its own shard and released. The modules outside the layers (embeddings,
final norm, head) are resident only while the layer-0 inputs are captured; at the end their tensors, and
the layers after the last one with a target, are copied shard to shard unchanged. The output directory
appears only when complete (:class:`ptqlab.models.shards.ShardWriter`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.shards import Checkpoint, ShardWriter, tied_embedding_names
from .driver import QuantizeReport, quantize_weights
from .embedding import round_embedding
from .layer_stream import LayerStream
from .plan import QuantizationPlan, RunOptions

log = logging.getLogger(__name__)


def check_quantization_streamable(plan: QuantizationPlan) -> None:
    """Raise when a recipe or scheme needs the whole model resident.

    Raises:
        ConfigError: A model transform (rotation), a model refiner (ZeroQuant-Global), static activation
            ranges, outlier decomposition or a KV-cache scheme.

    """
    recipe = plan.recipe
    if plan.adapter.experts is not None:
        raise ConfigError(f"runtime.stream: family {plan.adapter.family} stores its experts fused, and checkpoints "
                          "name them per expert; streaming mixture-of-experts models is not written yet; use "
                          "runtime.stream: off")
    if recipe.model_transforms:
        raise ConfigError(f"runtime.stream: {recipe.name} transforms the whole model (embeddings and head) and "
                          "cannot run one layer at a time; use runtime.stream: off")
    if recipe.model_refiners:
        raise ConfigError(f"runtime.stream: {recipe.name} refines the whole model after the layer loop and cannot "
                          "run one layer at a time; use runtime.stream: off")
    if any(not a.dynamic for _, _, a in plan.activations):
        raise ConfigError("runtime.stream: static activation ranges need whole-model passes; use dynamic "
                          "activations or runtime.stream: off")
    if plan.kv is not None:
        raise ConfigError("runtime.stream: KV-cache quantization is not streamed yet; use runtime.stream: off")
    if plan.outliers is not None:
        raise ConfigError("runtime.stream: scheme.outliers chooses its columns in a whole-model pass; use "
                          "runtime.stream: off")


def _rounded_embedding(model: nn.Module, plan: QuantizationPlan, source: Checkpoint, report: QuantizeReport,
                       dtype: torch.dtype, keep_grid: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's embedding tensor rounded (``scheme.embedding``), under each name it is stored as.

    A head tied to the embedding is the same tensor in the model: where the checkpoint stores it too, it is
    written with the same values.
    """
    target = plan.embedding
    if target is None:
        return {}
    module = model.get_submodule(target.name)
    names = tied_embedding_names(model) or [f"{target.name}.weight"]  # the embedding's name first
    stored = [n for n in names if n in source.where]
    if not stored:
        raise ConfigError(f"scheme.embedding: the checkpoint {source.directory} holds no {names[0]}")
    weight = source.load(stored[:1])[stored[0]].to(dtype)
    rounded = round_embedding(weight, target, module, report, keep_grid)
    return dict.fromkeys(stored, rounded)


def quantize_streamed(
    model: nn.Module,
    plan: QuantizationPlan,
    source: Checkpoint,
    out: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    options: RunOptions = RunOptions(),
) -> QuantizeReport:
    """Quantize the weights of a skeleton ``model`` layer by layer from ``source`` into the directory ``out``.

    Args:
        model: The skeleton (from :func:`ptqlab.models.shards.skeleton`) the plan was made for.
        plan: The quantization plan (see :func:`check_quantization_streamable` for what it may not contain).
        source: The FP checkpoint.
        out: The directory of the quantized model (created complete, with its index and config).
        device: Where each layer runs.
        dtype: The compute dtype.
        progress: Show a progress bar.
        options: How to run it (layer pass, memory budget, offload directory, kept grids).

    Returns:
        The report (records and timings; ``timings["stream_load_s"]`` is the time spent reading shards).

    Raises:
        ConfigError: The plan cannot be streamed.

    """
    check_quantization_streamable(plan)
    stream = LayerStream(model, plan.adapter, source, device, dtype, ShardWriter(out, config_from=source.directory))
    report = QuantizeReport()
    t0 = time.perf_counter()
    try:
        quantize_weights(model, plan, report, progress, stream=stream, options=options)
        stream.finish(_rounded_embedding(model, plan, source, report, dtype, options.keep_grids))
        stream.out.close()
    except BaseException:
        stream.out.abort()
        raise
    report.timings["quantize_s"] = time.perf_counter() - t0
    report.timings["stream_load_s"] = stream.load_s
    log.info("streamed quantization written to %s (%.1f s reading shards)", out, stream.load_s)
    return report
