"""One forward pass of a decoder layer over all calibration chunks, pausing before each linear group.

True-sequential GPTQ wants each group's Hessian from inputs that already went through the quantized
groups before it (q/k/v, then o_proj's inputs through the quantized q/k/v, and so on). Running the layer
once per group costs a forward pass per group. Instead, each chunk runs in its own thread, one thread at a
time (a turnstile lock): when a chunk reaches a group, its input is observed, then the thread waits at a
barrier; when every chunk has arrived, one action quantizes the group, and the chunks go on through the
quantized group. The single pass yields the quantized layer and the next layer's inputs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .capture import LayerCall, layer_output

Observe = Callable[[int, torch.Tensor], None]
Apply = Callable[[int], None]


class _GroupGate:
    """Synchronises the chunk threads at each linear group."""

    def __init__(self, n_chunks: int, apply: Apply) -> None:
        self.turn = threading.Lock()
        self.current = -1
        self.barrier = threading.Barrier(n_chunks, action=lambda: apply(self.current))
        self.seen: dict[int, set[int]] = {}

    def arrive(self, chunk: int, group: int) -> None:
        """Called with the turn held, after observing; returns with the turn held again."""
        self.current = group
        self.turn.release()
        try:
            self.barrier.wait()
        finally:
            self.turn.acquire()


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
        observe: ``observe(group, x)`` is called with each chunk's input to the group.
        apply: ``apply(group)`` is called once per group after every chunk was observed.
        input_map: Functions ``apply`` may register per group: each chunk's input to the group's linears
            is replaced by ``input_map[group](x)`` (a transform folded into the op before the group).

    Returns:
        The layer's outputs, one tensor per chunk (computed with the quantized groups).

    """
    gate = _GroupGate(len(hidden), apply)
    thread_group: dict[int, int] = {}
    outputs: list[torch.Tensor | None] = [None] * len(hidden)
    errors: list[BaseException] = []

    maps = input_map if input_map is not None else {}

    def pre_hook(group: int) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...] | None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            chunk = thread_group[threading.get_ident()]
            done = gate.seen.setdefault(chunk, set())
            if group not in done:
                done.add(group)
                observe(group, args[0])
                gate.arrive(chunk, group)
            fn = maps.get(group)
            return None if fn is None else (fn(args[0]), *args[1:])

        return hook

    def work(chunk: int) -> None:
        thread_group[threading.get_ident()] = chunk
        with gate.turn:
            try:
                with torch.inference_mode():
                    x, hidden[chunk] = hidden[chunk], None  # the caller's reference goes: inputs die early
                    out = layer(x, *calls[chunk].args, **calls[chunk].kwargs)
                    del x
                outputs[chunk] = layer_output(out)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)
                gate.barrier.abort()

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
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return [o for o in outputs if o is not None]
