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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapter import Adapter
from ..models.shards import Checkpoint, ShardWriter, materialize, module_prefix, outer_modules, release, resident
from .driver import QuantizeReport, quantize_weights
from .plan import QuantizationPlan

log = logging.getLogger(__name__)


@dataclass
class LayerStream:
    """Where a skeleton model's layers come from, where they run and where the quantized ones go.

    Attributes:
        model: The skeleton (parameters on the meta device).
        adapter: Its family adapter.
        source: The checkpoint its tensors are read from.
        device: Where each layer runs.
        dtype: The dtype its floating tensors are read in.
        out: Where the quantized model is written.

    """

    model: nn.Module
    adapter: Adapter
    source: Checkpoint
    device: torch.device
    dtype: torch.dtype
    out: ShardWriter
    written: set[int] = field(default_factory=set)
    load_s: float = 0.0

    @contextmanager
    def outer(self) -> Iterator[None]:
        """The modules outside the layers resident for the block (for capturing layer 0's inputs)."""
        with resident(self.model, outer_modules(self.model, self.adapter), self.source, self.device, self.dtype):
            yield

    @contextmanager
    def layer(self, li: int) -> Iterator[nn.Module]:
        """Layer ``li`` resident for the block; then written and released."""
        layer = self.adapter.layers(self.model)[li]
        t0 = time.perf_counter()
        materialize(self.model, layer, self.source, self.device, self.dtype)
        self.load_s += time.perf_counter() - t0
        try:
            yield layer
            prefix = module_prefix(self.model, layer)
            self.out.write(f"layer-{li:05d}.safetensors", {prefix + k: v for k, v in layer.state_dict().items()})
            self.written.add(li)
        finally:
            release(layer)

    def finish(self) -> None:
        """Copy, shard to shard, the layers not written and the tensors outside the layers (unchanged)."""
        prefixes = [module_prefix(self.model, layer) for layer in self.adapter.layers(self.model)]
        for li, prefix in enumerate(prefixes):
            if li not in self.written:
                self.out.write(f"layer-{li:05d}.safetensors", self.source.load(self.source.names(prefix)))
        outer = [n for n in self.source.names() if not n.startswith(tuple(prefixes))]
        self.out.write("outer.safetensors", self.source.load(outer))


def check_streamable(plan: QuantizationPlan) -> None:
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


def quantize_streamed(
    model: nn.Module,
    plan: QuantizationPlan,
    source: Checkpoint,
    out: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize the weights of a skeleton ``model`` layer by layer from ``source`` into the directory ``out``.

    Args:
        model: The skeleton (from :func:`ptqlab.models.shards.skeleton`) the plan was made for.
        plan: The quantization plan (see :func:`check_streamable` for what it may not contain).
        source: The FP checkpoint.
        out: The directory of the quantized model (created complete, with its index and config).
        device: Where each layer runs.
        dtype: The compute dtype.
        progress: Show a progress bar.

    Returns:
        The report (records and timings; ``timings["stream_load_s"]`` is the time spent reading shards).

    Raises:
        ConfigError: The plan cannot be streamed.

    """
    check_streamable(plan)
    stream = LayerStream(model, plan.adapter, source, device, dtype, ShardWriter(out, config_from=source.directory))
    report = QuantizeReport()
    t0 = time.perf_counter()
    try:
        quantize_weights(model, plan, report, progress, stream=stream)
        stream.finish()
        stream.out.close()
    except BaseException:
        stream.out.abort()
        raise
    report.timings["quantize_s"] = time.perf_counter() - t0
    report.timings["stream_load_s"] = stream.load_s
    log.info("streamed quantization written to %s (%.1f s reading shards)", out, stream.load_s)
    return report
