"""Capture what enters the decoder layers: layer 0's hidden states and every layer's own arguments.

Each decoder layer's ``forward`` is replaced, for one pass of the model per calibration chunk, by a
recorder that keeps its positional and keyword arguments (attention masks and RoPE tables can differ per
layer type, as in Gemma2/3 and Qwen2) and returns its input unchanged; the last recorder stops the pass,
so the final norm and the LM head never run.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class _StopForwardError(Exception):
    """Raised by the last layer's recorder to end the capture pass."""


@dataclass
class LayerCall:
    """The arguments of one decoder-layer call besides the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class CapturedInputs:
    """Hidden states entering layer 0, per chunk, and each layer's arguments per chunk.

    Attributes:
        hidden: One tensor (batch, seq, hidden) per calibration chunk.
        calls: ``calls[layer][chunk]``: the other arguments of that layer's call.

    """

    hidden: list[torch.Tensor]
    calls: list[list[LayerCall]] = field(default_factory=list)


def _recorder(index: int, last: int, store: CapturedInputs) -> Callable[..., Any]:
    def record(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store.calls[index].append(LayerCall(tuple(args[1:]), dict(kwargs)))
        if index == 0:
            store.hidden.append(hidden)
        if index == last:
            raise _StopForwardError
        return hidden

    return record


@torch.inference_mode()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, chunks: list[torch.Tensor]) -> CapturedInputs:
    """Run the model's embedding part over each chunk of token ids and record the layer inputs.

    Args:
        model: The causal LM (its non-layer modules on the device of the chunks).
        layers: Its decoder layers.
        chunks: Token ids, one tensor (batch, seq) per chunk, without padding.

    Returns:
        The captured hidden states and per-layer calls.

    """
    store = CapturedInputs(hidden=[], calls=[[] for _ in layers])
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        layer.forward = _recorder(i, last, store)
    try:
        for ids in chunks:
            with contextlib.suppress(_StopForwardError):
                model(input_ids=ids, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    return store


class InputCache:
    """Captured layer inputs of one FP model, kept by calibration content for the runs that share them.

    Valid only while the model's part before layer 0 (embeddings, rotary tables) is the FP model's: the
    driver does not use it after a model transform (a rotation changes the embeddings). It keeps the last
    ``size`` captures.
    """

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self._entries: dict[tuple[Any, ...], CapturedInputs] = {}
        self.hits = 0

    def capture(self, model: nn.Module, layers: nn.ModuleList, chunks: list[torch.Tensor]) -> CapturedInputs:
        """What :func:`capture_inputs` returns, computed once per (chunks' tokens, device)."""
        key = (tuple(hashlib.sha256(c.cpu().numpy().tobytes()).hexdigest() for c in chunks), str(chunks[0].device))
        found = self._entries.get(key)
        if found is None:
            found = capture_inputs(model, layers, chunks)
            while self._entries and len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            if self.size > 0:
                self._entries[key] = found
        else:
            self.hits += 1
        return CapturedInputs(list(found.hidden), [list(calls) for calls in found.calls])


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, tuple | list) else out


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> tuple[torch.Tensor, bool]:
    """One decoder layer on ``hidden`` with its captured arguments.

    Returns its output hidden states, and whether it returned a tuple (what :func:`handing_over` must hand on
    in its place).
    """
    out = layer(hidden, *call.args, **call.kwargs)
    return layer_output(out), isinstance(out, tuple | list)


@contextlib.contextmanager
def handing_over(layers: nn.ModuleList, final: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """The decoder layers replaced: the first returns ``final``, the others pass their input on.

    Within the block a forward of the model runs its embedding part, hands ``final`` on as the last layer's
    output (a tuple when the layers return tuples) and runs the family's own final norm and head on it.
    """

    def wrap(h: torch.Tensor) -> Any:
        return (h,) if as_tuple else h

    def first(*_args: Any, **_kwargs: Any) -> Any:
        return wrap(final)

    def passing(*args: Any, **kwargs: Any) -> Any:
        return wrap(args[0] if args else kwargs["hidden_states"])

    for i, layer in enumerate(layers):
        layer.forward = first if i == 0 else passing
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
