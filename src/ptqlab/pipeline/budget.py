"""How calibration fits the memory it is given: one pass or a pass per group, hidden states in RAM or mapped.

Both choices are made once per run, after the first layer's inputs are captured, from the run's budget
(``runtime.max_memory`` less what the process holds, or the memory the machine has available) and what the
calibration would hold; neither changes a number (see :mod:`ptqlab.pipeline.sequential` and
:mod:`ptqlab.pipeline.spill`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..memory import available_memory, format_size, resident_bytes
from ..paths import cache_root
from .plan import RunOptions
from .spill import HiddenSpill

log = logging.getLogger(__name__)


def hidden_spill(options: RunOptions, hidden: list[torch.Tensor | None]) -> HiddenSpill | None:
    """A spill for the hidden states, when a layer's inputs and outputs would take over half the memory left.

    Only for CPU hidden states; the files go to ``runtime.offload_dir`` (default ``$PTQLAB_CACHE/stream``).
    """
    kept = [h for h in hidden if h is not None]
    if not kept or kept[0].device.type != "cpu":
        return None
    both = 2 * sum(h.numel() * h.element_size() for h in kept)
    left = _memory_left(options)
    if both <= left // 2:
        return None
    directory = Path(options.offload_dir) if options.offload_dir else cache_root() / "stream"
    log.info("calibration hidden states (%s per layer, inputs and outputs) go to memory-mapped files in %s (%s left)",
             format_size(both), directory, format_size(max(left, 0)))
    return HiddenSpill(directory)


def _memory_left(options: RunOptions) -> int:
    """``max_memory`` less what the process holds, or what the machine has available."""
    rss = resident_bytes()
    return available_memory() if options.max_memory is None or rss is None else options.max_memory - rss


def held_bytes(layer: nn.Module, hidden: list[torch.Tensor | None]) -> int:
    """About what the one pass holds while every chunk waits at a group.

    Per token: the widest linear input of the layer and four hidden-width tensors (the residual, the normed
    input, attention's q / k / v), at the hidden states' dtype (measured on SmolLM2: 51 MB per 4096 tokens
    at the MLP's down projection).
    """
    tokens = sum(h.shape[:-1].numel() for h in hidden if h is not None)
    first = next(h for h in hidden if h is not None)
    widest = max((m.in_features for m in layer.modules() if isinstance(m, nn.Linear)), default=first.shape[-1])
    return tokens * (widest + 4 * first.shape[-1]) * first.element_size()


def per_group_passes(options: RunOptions, layer: nn.Module, hidden: list[torch.Tensor | None]) -> bool:
    """Whether calibration runs a pass per group.

    ``options.layer_pass`` says so, or for ``auto``: whether the held chunks would take more than half the memory
    left (``max_memory`` less what the process holds, or what the machine has available).
    """
    if options.layer_pass != "auto" or len(hidden) < 2:
        return options.layer_pass == "per_group"
    held = held_bytes(layer, hidden)
    left = _memory_left(options)
    per_group = held > left // 2
    log.info("calibration holds about %s of intermediate tensors in one pass per layer (%s left): %s",
             format_size(held), format_size(max(left, 0)), "a pass per linear group" if per_group else "one pass")
    return per_group
