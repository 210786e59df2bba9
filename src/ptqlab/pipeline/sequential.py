"""One forward pass of a decoder layer over all calibration chunks, pausing before each linear group.

True-sequential GPTQ wants each group's Hessian from inputs that already went through the quantized
groups before it (q/k/v, then o_proj's inputs through the quantized q/k/v, and so on). Running the layer
once per group costs a forward pass per group. Instead, each chunk runs in its own thread, one thread at a
time, in a fixed round: chunk 0 runs until it reaches the next group (its input is observed), then chunk
1, ..., then the last chunk, whose arrival applies the group (quantizes it); then chunk 0 goes on through
the quantized group to the next one. The single pass yields the quantized layer and the next layer's
inputs, and every group observes its chunks in chunk order, so statistics summed over the chunks (the
Hessian, AWQ's mean |x|) are the same floats in every run, whatever the operating system's scheduling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..nn.capture import LayerCall, layer_output

Observe = Callable[[int, torch.Tensor], None]
Apply = Callable[[int], None]


class _AbortedError(Exception):
    """Raised in a waiting chunk thread when another chunk failed."""


class _RoundRobin:
    """Lets one chunk thread run at a time, in chunk order, and applies each group after its last chunk."""

    def __init__(self, n_chunks: int, apply: Apply) -> None:
        self.n = n_chunks
        self.apply = apply
        self.cv = threading.Condition()
        self.turn = 0
        self.failed = False

    def wait_turn(self, chunk: int) -> None:
        """Block until it is ``chunk``'s turn (or raise when another chunk failed)."""
        with self.cv:
            self.cv.wait_for(lambda: self.turn == chunk or self.failed)
            if self.failed:
                raise _AbortedError

    def _hand_on(self, chunk: int) -> None:
        with self.cv:
            self.turn = (chunk + 1) % self.n
            self.cv.notify_all()

    def arrive(self, chunk: int, group: int) -> None:
        """``chunk`` observed its input to ``group``: the next chunk's turn (the last one applies the group)."""
        if chunk == self.n - 1:
            self.apply(group)
        self._hand_on(chunk)
        self.wait_turn(chunk)

    def finish(self, chunk: int) -> None:
        """``chunk`` ran through the whole layer: the next chunk's turn."""
        self._hand_on(chunk)

    def fail(self) -> None:
        """Wake every waiting chunk so that it stops."""
        with self.cv:
            self.failed = True
            self.cv.notify_all()


def run_layer_pass(
    layer: nn.Module,
    groups: Sequence[Sequence[nn.Module]],
    hidden: list[torch.Tensor | None],
    calls: list[LayerCall],
    observe: Observe,
    apply: Apply,
    input_map: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Run ``layer`` over every chunk, observing and quantizing each group on the way.

    Args:
        layer: The decoder layer.
        groups: For each linear group, its modules (all read the same input).
        hidden: Input hidden states, one tensor per chunk; consumed (each entry is set to None once its
            chunk has run, so inputs and outputs of the whole calibration set never coexist).
        calls: The layer's other arguments, one per chunk.
        observe: ``observe(group, x)`` is called with each chunk's input to the group, in chunk order.
        apply: ``apply(group)`` is called once per group after every chunk was observed.
        input_map: Functions ``apply`` may register per group: each chunk's input to the group's linears
            is replaced by ``input_map[group](x)`` (a transform folded into the op before the group).

    Returns:
        The layer's outputs, one tensor per chunk (computed with the quantized groups).

    """
    rounds = _RoundRobin(len(hidden), apply)
    chunk_of: dict[int, int] = {}
    seen: dict[int, set[int]] = {}
    outputs: list[torch.Tensor | None] = [None] * len(hidden)
    errors: list[BaseException] = []
    maps = input_map if input_map is not None else {}

    def pre_hook(group: int) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...] | None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            chunk = chunk_of[threading.get_ident()]
            done = seen.setdefault(chunk, set())
            if group not in done:  # the first linear of the group to run: observe, then wait for the round
                done.add(group)
                observe(group, args[0])
                rounds.arrive(chunk, group)
            fn = maps.get(group)
            return None if fn is None else (fn(args[0]), *args[1:])

        return hook

    def work(chunk: int) -> None:
        chunk_of[threading.get_ident()] = chunk
        try:
            rounds.wait_turn(chunk)
            with torch.inference_mode():
                x, hidden[chunk] = hidden[chunk], None  # the caller's reference goes: inputs die early
                out = layer(x, *calls[chunk].args, **calls[chunk].kwargs)
                del x
            outputs[chunk] = layer_output(out)
            rounds.finish(chunk)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            rounds.fail()

    handles = [m.register_forward_pre_hook(pre_hook(g)) for g, mods in enumerate(groups) for m in mods]
    try:
        threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in range(len(hidden))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for h in handles:
            h.remove()
    real = [e for e in errors if not isinstance(e, _AbortedError)]
    if real or errors:
        raise (real or errors)[0]
    return [o for o in outputs if o is not None]
