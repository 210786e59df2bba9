"""Perplexity of a causal LM over token windows, under the GPTQ protocol.

Each window is one independent sequence: the model predicts tokens ``1 .. seqlen-1`` of the window from
the tokens before them (no context carried over between windows). A window's NLL is the mean token
cross-entropy, in float32, of the shifted logits; ``ppl = exp(mean over windows of the window NLL)``,
which equals the reference's ``exp(sum(nll * seqlen) / (windows * seqlen))``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..memory import return_freed
from ..threads import fit_threads

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over a set of windows.

    Attributes:
        ppl: ``exp`` of the mean over windows of each window's mean token NLL (inf past float range).
        nll: Mean token NLL of each window, in nats, in window order.
        tokens: Tokens run through the model (``windows * seqlen``).
        seconds: Wall time of the forward passes and losses.
        tokens_per_second: ``tokens / seconds``.

    """

    ppl: float
    nll: list[float]
    tokens: int
    seconds: float
    tokens_per_second: float


def perplexity_of(mean_nll: float) -> float:
    """The perplexity of a mean negative log-likelihood (nats per token): ``exp(mean_nll)``.

    Unlike ``math.exp`` it returns inf instead of raising on overflow (a diverged model's perplexity);
    nan stays nan.
    """
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _check_inputs(input_ids: torch.Tensor, batch_size: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
        raise ConfigError(
            f"input_ids must have shape (windows >= 1, seqlen >= 2), got {tuple(input_ids.shape)}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
        raise ConfigError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> list[float]:
    """Mean token NLL of each window from its logits, one window at a time in float32.

    Args:
        logits: Model output, shape ``(batch, seqlen, vocab)``, any float dtype.
        input_ids: The windows, shape ``(batch, seqlen)``, on the logits' device.

    Returns:
        One mean NLL (nats) per window: position ``t`` predicts token ``t + 1``.

    """
    out = []
    for row in range(input_ids.shape[0]):
        losses = F.cross_entropy(logits[row, :-1].float(), input_ids[row, 1:], reduction="none")
        out.append(float(losses.double().mean()))
    return out


class HeadTap:
    """Captures the LM head's input and lets only the last position through the head.

    The loss is then computed from the captured hidden states in chunks of positions, so the full
    (batch, seqlen, vocab) float32 logits never exist (400 MB per 2048-token window at vocab 49152).
    The model's own post-processing of logits that ptqlab knows (``final_logit_softcapping``) is applied
    to each chunk; tests check the chunked NLL equals the full-logits NLL for every family adapter.
    """

    def __init__(self, model: nn.Module, chunk: int) -> None:
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        self.head: nn.Module | None = head if isinstance(head, nn.Module) else None
        config = getattr(model, "config", None)
        self.softcap = getattr(config, "final_logit_softcapping", None) if config is not None else None
        self.chunk = chunk
        self.hidden: torch.Tensor | None = None

    @property
    def usable(self) -> bool:
        """Whether the model has an output-embedding module to tap."""
        return isinstance(self.head, nn.Module) and self.chunk > 0

    def __enter__(self) -> HeadTap:
        assert isinstance(self.head, nn.Module)
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.hidden = args[0]
        return (args[0][:, -1:],)

    def chunks(self, row: int, end: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(s, e, logits)`` of positions ``s..e-1`` of window ``row`` (float32, soft-capped), up to ``end``."""
        assert self.hidden is not None and isinstance(self.head, nn.Module)
        for s in range(0, end, self.chunk):
            e = min(s + self.chunk, end)
            logits = self.head(self.hidden[row : row + 1, s:e]).float()[0]  # (e - s, vocab)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            yield s, e, logits

    def window_nll(self, input_ids: torch.Tensor) -> list[float]:
        """Mean token NLL of each window from the captured hidden states, chunk by chunk."""
        assert self.hidden is not None
        out = []
        for row in range(input_ids.shape[0]):
            total = torch.zeros((), dtype=torch.float64, device=self.hidden.device)
            for s, e, logits in self.chunks(row, input_ids.shape[1] - 1):
                total += F.cross_entropy(logits, input_ids[row, s + 1 : e + 1], reduction="sum").double()
            out.append(float(total / (input_ids.shape[1] - 1)))
        self.hidden = None
        return out


def batch_nll(model: nn.Module, batch: torch.Tensor, chunk: int) -> list[float]:
    """Window NLLs of one batch, through the head tap when the model has one."""
    tap = HeadTap(model, chunk)
    if not tap.usable:
        logits = model(input_ids=batch, use_cache=False).logits
        return window_nll(logits, batch)
    with tap:
        model(input_ids=batch, use_cache=False)
    return tap.window_nll(batch)


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "ppl",
    chunk: int = 256,
) -> PerplexityResult:
    """Evaluate the perplexity of ``model`` over token windows (GPTQ protocol).

    The model runs under ``torch.inference_mode()`` in eval mode (its training flag is restored after),
    with ``use_cache=False``, ``batch_size`` windows per forward pass. The LM head's input is captured
    and the logits and loss are computed ``chunk`` positions at a time, so full logits never exist.

    Args:
        model: A causal LM whose forward takes ``input_ids`` and ``use_cache`` and returns an object
            with ``.logits`` of shape ``(batch, seqlen, vocab)``.
        input_ids: Token windows, shape ``(windows, seqlen)``, e.g. ``eval_windows(...).input_ids``.
        batch_size: Windows per forward pass; the result does not depend on it.
        device: Where to run the windows; None means the device of the model's first parameter.
        progress: Show a tqdm bar with the running perplexity.
        desc: Label of the bar.
        chunk: Positions per logits chunk (0: let the model compute the full logits).

    Returns:
        The perplexity, the NLL of each window and the throughput.

    Raises:
        ConfigError: ``input_ids`` is not a 2-D integer tensor of at least one window of 2 tokens, or
            ``batch_size`` is below 1.

    """
    _check_inputs(input_ids, batch_size)
    dev = torch.device(device) if device is not None else model_device(model)
    n, seqlen = input_ids.shape
    was_training = model.training
    model.eval()
    nll: list[float] = []
    start = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, unit="win", disable=not progress) as bar:
            for first in range(0, n, batch_size):
                fit_threads()
                return_freed()  # the last window's freed buffers: peaks do not pile up on them
                batch = input_ids[first : first + batch_size].to(dev, dtype=torch.int64)
                nll.extend(batch_nll(model, batch, chunk))
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{perplexity_of(sum(nll) / len(nll)):.4g}")
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    tokens = n * seqlen
    ppl = perplexity_of(sum(nll) / n)
    log.debug("%s: ppl %.4f over %d windows of %d (%.1f s)", desc, ppl, n, seqlen, seconds)
    return PerplexityResult(ppl, nll, tokens, seconds, tokens / seconds if seconds > 0 else math.inf)
