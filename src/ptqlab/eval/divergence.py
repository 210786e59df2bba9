"""Divergence of a quantized model from its FP model: per-token KL and top-k agreement.

The FP side is computed once per (model, data, k) and cached on disk as the top-k log-probabilities
(and their token ids) of every position; full-vocabulary logits would not fit (40 x 2048 x 49152 floats
is 16 GB). KL(FP || Q) is computed over the top-k tokens plus one tail bucket holding the rest of the
probability mass of both distributions:

    KL = sum_{i in topk} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

which is a lower bound of the full KL (merging outcomes never increases a divergence) and equals it
when the tail carries no mass. ``top1`` is the fraction of positions where both models rank the same
token first; ``top5`` the fraction where FP's first token is among the quantized model's top 5.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..memory import return_freed
from ..metrics import DIVERGENCE_KINDS
from ..paths import cache_root
from ..threads import fit_threads
from .cache import entry, load_or_compute
from .perplexity import HeadTap, model_device

TOP_K = 32


@dataclass
class TopKReference:
    """The FP model's top-k log-probabilities at every position of some windows.

    Attributes:
        ids: Token ids (windows, seqlen), the inputs.
        top_ids: (windows, seqlen, k) ids of FP's top-k tokens, most probable first.
        top_logp: (windows, seqlen, k) their log-probabilities.

    """

    ids: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor


@dataclass
class Divergence:
    """Mean per-token KL(FP || Q) (nats) and agreement with FP's top token."""

    kl: float
    top1: float
    top5: float
    tokens: int

    def by_kind(self) -> dict[str, float]:
        """The three measures by their kind in :data:`ptqlab.metrics.DIVERGENCE_KINDS`."""
        values = {"kl": self.kl, "top1": self.top1, "top5": self.top5}
        return {kind: values[kind] for kind in DIVERGENCE_KINDS}


CHUNK = 256
"""Positions whose log-probabilities exist at once (full-vocabulary logits of a window would not fit)."""


def logprob_chunks(model: nn.Module, ids: torch.Tensor, chunk: int = CHUNK) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(s, e, log-probabilities (e - s, V))`` of one window (1, T), float32 on the CPU, chunk by chunk.

    The model runs once; its head is applied ``chunk`` positions at a time (see
    :class:`~ptqlab.eval.perplexity.HeadTap`), so the (T, V) logits never exist.
    """
    device = model_device(model)
    tap = HeadTap(model, chunk)
    with torch.inference_mode():
        if not tap.usable:
            logits = model(input_ids=ids.to(device), use_cache=False).logits.float()[0]
            yield 0, logits.shape[0], torch.log_softmax(logits, dim=-1).cpu()
            return
        with tap:
            model(input_ids=ids.to(device), use_cache=False)
        for s, e, logits in tap.chunks(0, ids.shape[1]):
            yield s, e, torch.log_softmax(logits, dim=-1).cpu()
        tap.hidden = None


def compute_reference(model: nn.Module, ids: torch.Tensor, k: int = TOP_K) -> TopKReference:
    """Run the FP model over ``ids`` (windows, seqlen), one window at a time, keeping the top-k log-probs."""
    tops, logps = [], []
    for row in ids.split(1):
        fit_threads()
        return_freed()  # the last window's freed buffers: peaks do not pile up on them
        val, idx = window_top_k(logprob_chunks(model, row), k)
        tops.append(idx)
        logps.append(val)
    return TopKReference(ids, torch.stack(tops), torch.stack(logps))


def window_top_k(chunks: Iterable[tuple[int, int, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP's top-k log-probabilities (T, k) and ids (T, k) of one window from its log-probability chunks."""
    parts = [top_k(logp, k) for _, _, logp in chunks]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def _tail(logp_top: torch.Tensor) -> torch.Tensor:
    """Log of the probability mass outside the given top-k log-probs (clamped away from log 0)."""
    mass = logp_top.exp().sum(dim=-1).clamp(max=1.0 - 1e-7)
    return torch.log1p(-mass)


def top_k(logp: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities (T, k) and their ids (T, k, int32) of log-probabilities (T, V)."""
    val, idx = logp.topk(k, dim=-1)
    return val, idx.to(torch.int32)


@dataclass
class DivergenceSum:
    """Running sums of the per-token KL and top-k agreements over windows."""

    kl: float = 0.0
    top1: int = 0
    top5: int = 0
    tokens: int = 0

    def add(self, q: torch.Tensor, p_top: torch.Tensor, top_ids: torch.Tensor) -> None:
        """Add positions: Q's log-probabilities (T, V), FP's top-k log-probabilities and ids (T, k) there."""
        idx = top_ids.long()
        q_top = q.gather(-1, idx)
        p_tail, q_tail = _tail(p_top), _tail(q_top)
        kl = (p_top.exp() * (p_top - q_top)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
        self.kl += float(kl.clamp_min(0).sum())
        q_best = q.topk(5, dim=-1).indices
        self.top1 += int((q_best[:, 0] == idx[:, 0]).sum())
        self.top5 += int((q_best == idx[:, :1]).any(-1).sum())
        self.tokens += q.shape[0]

    def add_window(self, chunks: Iterable[tuple[int, int, torch.Tensor]], p_top: torch.Tensor,
                   top_ids: torch.Tensor) -> None:
        """Add one window from Q's log-probability chunks and FP's top-k of the whole window (T, k)."""
        for s, e, q in chunks:
            self.add(q, p_top[s:e], top_ids[s:e])

    def result(self) -> Divergence:
        """The means over every token added."""
        n = self.tokens
        return Divergence(self.kl / n, self.top1 / n, self.top5 / n, n)


def divergence(model: nn.Module, ref: TopKReference) -> Divergence:
    """KL(FP || Q) and top-k agreement of ``model`` against a reference computed on the FP model."""
    acc = DivergenceSum()
    for w in range(ref.ids.shape[0]):
        fit_threads()
        return_freed()  # the last window's freed buffers: peaks do not pile up on them
        acc.add_window(logprob_chunks(model, ref.ids[w : w + 1]), ref.top_logp[w], ref.top_ids[w])
    return acc.result()


def divergence_cache_dir() -> Path:
    """Where FP references are kept (``$PTQLAB_CACHE/divergence`` or ~/.cache/ptqlab/divergence)."""
    return cache_root() / "divergence"


class ReferenceCache:
    """FP top-k references on disk, keyed by the model's fingerprint, dtype, device type and the exact tokens.

    Attributes:
        computed: How many references this cache has computed (the rest were read from disk).

    """

    def __init__(self, root: Path | None = None) -> None:
        """Use ``root`` (default :func:`divergence_cache_dir`)."""
        self.root = root or divergence_cache_dir()
        self.computed = 0

    def get(
        self, model: nn.Module, fingerprint: str | None, dtype: str, ids: torch.Tensor, k: int = TOP_K
    ) -> TopKReference:
        """The FP reference of ``model`` on ``ids``: from disk, or computed now (and written, with a fingerprint)."""

        def load(path: Path) -> TopKReference | None:
            data = load_file(str(path))
            if not torch.equal(data["ids"], ids.to(data["ids"].dtype)):
                return None
            return TopKReference(data["ids"], data["top_ids"], data["top_logp"])

        def save(ref: TopKReference, path: Path) -> None:
            save_file({"ids": ref.ids.contiguous(), "top_ids": ref.top_ids.contiguous(),
                       "top_logp": ref.top_logp.contiguous()}, str(path))

        path = entry(self.root, ".safetensors", model, fingerprint, dtype=dtype, ids=ids, k=k)
        ref, computed = load_or_compute(path, load, lambda: compute_reference(model, ids, k), save)
        self.computed += computed
        return ref
