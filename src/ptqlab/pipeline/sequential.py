"""One forward pass of a decoder layer over all calibration chunks, pausing before each linear group.

True-sequential GPTQ wants each group's Hessian from inputs that already went through the quantized
groups before it (q/k/v, then o_proj's inputs through the quantized q/k/v, and so on). Running the layer
once per group costs a forward pass per group. Instead, each chunk runs in its own thread, one thread at a
time, in a fixed round: chunk 0 runs until it reaches the next group (its input is observed), then chunk
1, ..., then the last chunk, whose arrival applies the group (quantizes it); then chunk 0 goes on through
the quantized group to the next one. The single pass yields the quantized layer and the next layer's
inputs, and every group observes its chunks in chunk order, so statistics summed over the chunks (the
Hessian, AWQ's mean |x|) are the same floats in every run, whatever the operating system's scheduling.

The one pass holds every chunk's intermediate tensors while it waits at a group (about the widest linear
input plus four hidden-width tensors per token: 51 MB per 4096 tokens on SmolLM2, 24 GB for 128 x 2048
tokens of a 7B Llama). :func:`run_group_passes` trades time for that memory: one pass per group, each
chunk run alone from the layer's input up to the group and stopped there, so one chunk's intermediates
exist at a time. It observes the same tensors in the same order: both give the same floats.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..models.inputs import InputFn, InputSite, register_input_hook
from ..nn.capture import LayerCall, layer_output

Observe = Callable[[int, torch.Tensor], None]
Apply = Callable[[int], None]
Site = nn.Module | InputSite
"""Where a group member's input is seen: the linear, or an :class:`InputSite` (a linear the model does not call)."""


class _StopError(Exception):
    """Raised in a chunk's forward at the group a per-group pass works on (unwinds and frees the chunk)."""


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
    groups: Sequence[Sequence[Site]],
    hidden: list[torch.Tensor | None],
    calls: list[LayerCall],
    observe: Observe,
    apply: Apply,
    input_map: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Run ``layer`` over every chunk, observing and quantizing each group on the way.

    Args:
        layer: The decoder layer.
        groups: For each linear group, its modules (all read the same input), or where their input is seen.
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

    def at_input(group: int) -> InputFn:
        def hook(x: torch.Tensor) -> torch.Tensor | None:
            chunk = chunk_of[threading.get_ident()]
            done = seen.setdefault(chunk, set())
            if group not in done:  # the first linear of the group to run: observe, then wait for the round
                done.add(group)
                observe(group, x)
                rounds.arrive(chunk, group)
            fn = maps.get(group)
            return None if fn is None else fn(x)

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

    handles = [register_input_hook(m, at_input(g)) for g, mods in enumerate(groups) for m in mods]
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


def run_group_passes(
    layer: nn.Module,
    groups: Sequence[Sequence[Site]],
    hidden: list[torch.Tensor | None],
    calls: list[LayerCall],
    observe: Observe,
    apply: Apply,
    input_map: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """What :func:`run_layer_pass` does, holding one chunk's intermediates at a time instead of all.

    Each pass runs the chunks one after the other through the groups applied so far, up to the first group
    not applied yet, which observes the chunk's input there and stops it; after the last chunk the group is
    applied. The pass in which no chunk meets an unapplied group gives the outputs. A layer of ``G`` groups
    costs ``G`` partial forwards more than the one pass. Arguments and result as :func:`run_layer_pass`;
    ``input_map`` is not used: every pass starts at the layer's input, so a scale ``apply`` folded into the
    op before a group already acts there (the one pass maps the inputs of the chunks already past that op).
    Without folded scales the floats equal the one pass's; with them they differ by the rounding of
    ``op(x) / s`` against ``(op / s)(x)``, the latter being what the quantized model computes.
    """
    del input_map
    applied: set[int] = set()
    target: list[int] = []  # the group this pass works on, set by the first chunk that meets one

    def at_input(group: int) -> InputFn:
        def hook(x: torch.Tensor) -> None:
            if group not in applied:
                if not target:
                    target.append(group)
                if group == target[0]:
                    observe(group, x)
                raise _StopError  # a chunk that meets another unapplied group first cannot go further either
            return None

        return hook

    handles = [register_input_hook(m, at_input(g)) for g, mods in enumerate(groups) for m in mods]
    try:
        while True:
            target.clear()
            last = len(applied) == len(groups)  # nothing left to stop at: this pass gives the outputs
            outputs = _group_pass(layer, hidden, calls, consume=last)
            if not target:
                hidden[:] = [None] * len(hidden)
                return outputs
            del outputs
            with torch.inference_mode():  # as in the one pass, where the last chunk's hook applies the group
                apply(target[0])
            applied.add(target[0])
    finally:
        for h in handles:
            h.remove()


def _group_pass(
    layer: nn.Module, hidden: list[torch.Tensor | None], calls: list[LayerCall], consume: bool
) -> list[torch.Tensor]:
    """Run every chunk through ``layer`` in order; the outputs of those that were not stopped."""
    outputs = []
    for chunk, call in enumerate(calls):
        x = hidden[chunk]
        assert x is not None, "a per-group pass needs every chunk's input"
        if consume:
            hidden[chunk] = None
        try:
            with torch.inference_mode():
                out = layer(x, *call.args, **call.kwargs)
        except _StopError:
            continue
        finally:
            del x
        outputs.append(layer_output(out))
    return outputs
