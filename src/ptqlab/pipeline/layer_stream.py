"""Where a streamed model's layers come from while the layer loop works on them, and where they go.

The layer driver (:mod:`ptqlab.pipeline.driver`) asks a :class:`LayerStream` for each decoder layer it
works on: the layer is read from the checkpoint's shards, worked on, written to the output directory as
its own shard and released (see :mod:`ptqlab.pipeline.stream`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.adapter import Adapter
from ..models.shards import Checkpoint, ShardWriter, materialize, module_prefix, outer_modules, release, resident


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

    def finish(self, replaced: dict[str, torch.Tensor] | None = None) -> None:
        """Copy, shard to shard, the layers not written and the tensors outside the layers.

        Args:
            replaced: Tensors outside the layers written instead of the checkpoint's (a rounded embedding), by name.

        """
        prefixes = [module_prefix(self.model, layer) for layer in self.adapter.layers(self.model)]
        for li, prefix in enumerate(prefixes):
            if li not in self.written:
                self.out.write(f"layer-{li:05d}.safetensors", self.source.load(self.source.names(prefix)))
        outer = [n for n in self.source.names() if not n.startswith(tuple(prefixes))]
        replaced = {n: t for n, t in (replaced or {}).items() if n in outer}
        tensors = self.source.load([n for n in outer if n not in replaced])
        self.out.write("outer.safetensors", {**tensors, **replaced})
