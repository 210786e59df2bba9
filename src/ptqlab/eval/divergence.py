"""Divergence of a quantized model from its FP model: per-token KL and top-k agreement.

The FP side is computed once per (model, data, k) and cached on disk as the top-k log-probabilities
(and their token ids) of every position; full-vocabulary logits would not fit (40 x 2048 x 49152 floats
is 16 GB). KL(FP || Q) is computed over the top-k tokens plus one tail bucket holding the rest of the
probability mass of both distributions:

    KL = sum_{i in topk} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

which is a lower bound of the full KL (merging outcomes never increases a divergence) and equals it
when the tail carries no mass. ``top1`` is the fraction of positions where both models rank the same
token first (llama.cpp's "same top p"); ``top5`` the fraction where FP's first token is among the
quantized model's top 5.

The per-token values are kept (float32, one per position: 40 windows of 2048 are 330 KB), so the
statistics that ``llama-perplexity --kl-divergence`` reports are exact, not sketched: the KL's mean and
standard error, median, 90/95/99/99.9th percentiles and maximum, and Δp, the change of the probability
of the correct next token (Q's minus FP's; the reference also keeps FP's log-probability of each next
token), by its mean, RMS, extremes and percentiles. Percentiles interpolate linearly between order
statistics (llama.cpp's and ``torch.quantile``'s definition). Δp exists at every position but the last
of each window (which has no next token in the window); the KL at every position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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
REFERENCE_FORMAT = 2
"""What a cached reference holds; part of its key (2: FP's log-probability of each next token too)."""


class WindowTop(NamedTuple):
    """The FP side of one window (T positions).

    Attributes:
        top_logp: (T, k) FP's top-k log-probabilities, most probable first.
        top_ids: (T, k) their token ids (int32).
        target_logp: (T,) FP's log-probability of the next token of the window (``ids[t + 1]``); NaN at
            the last position, which has none.

    """

    top_logp: torch.Tensor
    top_ids: torch.Tensor
    target_logp: torch.Tensor


@dataclass
class TopKReference:
    """The FP model's top-k log-probabilities at every position of some windows.

    Attributes:
        ids: Token ids (windows, seqlen), the inputs.
        top_ids: (windows, seqlen, k) ids of FP's top-k tokens, most probable first.
        top_logp: (windows, seqlen, k) their log-probabilities.
        target_logp: (windows, seqlen) FP's log-probability of the next token (NaN at each window's end).

    """

    ids: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    target_logp: torch.Tensor

    def window(self, w: int) -> WindowTop:
        """The FP side of window ``w``."""
        return WindowTop(self.top_logp[w], self.top_ids[w], self.target_logp[w])

    @classmethod
    def stack(cls, ids: torch.Tensor, windows: list[WindowTop]) -> TopKReference:
        """The reference of ``ids`` (windows, seqlen) from each window's FP side, in order."""
        return cls(ids, torch.stack([t.top_ids for t in windows]), torch.stack([t.top_logp for t in windows]),
                   torch.stack([t.target_logp for t in windows]))


def percentile(values: torch.Tensor, q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, linear between order statistics (``torch.quantile``'s default).

    The same definition as ``llama-perplexity``'s percentiles (its median averages the two middle values,
    which is this at q = 0.5). Computed by sorting, so any size works (``torch.quantile`` stops at 2^24).
    """
    v = values.double().flatten().sort().values
    if v.numel() == 0:
        return math.nan
    pos = q * (v.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    frac = pos - lo
    return float((1 - frac) * v[lo] + frac * v[hi])


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample standard deviation over sqrt(n)), in float64.

    As ``llama-perplexity`` computes it, this treats the tokens as independent; neighbouring tokens are
    correlated, so it understates the uncertainty of a mean over few windows.
    """
    v = values.double().flatten()
    n = v.numel()
    if n == 0:
        return math.nan, math.nan
    mean = float(v.mean())
    return mean, float(v.std(correction=1) / math.sqrt(n)) if n > 1 else 0.0


KL_PERCENTILES = {"kl_p50": 0.5, "kl_p90": 0.9, "kl_p95": 0.95, "kl_p99": 0.99, "kl_p999": 0.999}
DP_PERCENTILES = {"dp_p1": 0.01, "dp_p5": 0.05, "dp_p50": 0.5, "dp_p95": 0.95, "dp_p99": 0.99}


@dataclass
class Divergence:
    """KL(FP || Q) (nats) per token and its statistics, agreement with FP's top token, and Δp.

    Attributes:
        kl: Mean per-token KL.
        top1: Fraction of positions where Q's first token is FP's (llama.cpp's same-top rate).
        top5: Fraction where FP's first token is among Q's top 5.
        tokens: Positions the KL was measured at.
        kl_values: (tokens,) the per-token KL, float32, in window order.
        dp_values: Δp = p_Q(next token) - p_FP(next token) at every position with a next token, float32.

    """

    kl: float
    top1: float
    top5: float
    tokens: int
    kl_values: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    dp_values: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def statistics(self) -> dict[str, float]:
        """The KL and Δp statistics beyond the means (the kinds of :data:`ptqlab.metrics.FIDELITY_KINDS`)."""
        out = {"kl_se": mean_se(self.kl_values)[1]}
        out.update({kind: percentile(self.kl_values, q) for kind, q in KL_PERCENTILES.items()})
        out["kl_max"] = float(self.kl_values.max()) if self.kl_values.numel() else math.nan
        dp = self.dp_values.double()
        out["dp_mean"] = mean_se(dp)[0]
        out["dp_rms"] = float(dp.square().mean().sqrt()) if dp.numel() else math.nan
        out["dp_min"] = float(dp.min()) if dp.numel() else math.nan
        out.update({kind: percentile(dp, q) for kind, q in DP_PERCENTILES.items()})
        out["dp_max"] = float(dp.max()) if dp.numel() else math.nan
        return out

    def by_kind(self) -> dict[str, float]:
        """Every measure by its kind in :data:`ptqlab.metrics.DIVERGENCE_KINDS`."""
        values = {"kl": self.kl, "top1": self.top1, "top5": self.top5, **self.statistics()}
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
    # inference mode around each step only, never across a yield: a generator suspended (or dropped) inside
    # the block would leave the caller in inference mode
    with torch.inference_mode():
        if not tap.usable:
            logits = model(input_ids=ids.to(device), use_cache=False).logits.float()[0]
            whole = torch.log_softmax(logits, dim=-1).cpu()
        else:
            with tap:
                model(input_ids=ids.to(device), use_cache=False)
            whole = None
    if whole is not None:
        yield 0, whole.shape[0], whole
        return
    chunks = tap.chunks(0, ids.shape[1])
    while True:
        with torch.inference_mode():
            step = next(chunks, None)
            if step is None:
                break
            s, e, logits = step
            logp = torch.log_softmax(logits, dim=-1).cpu()
        yield s, e, logp
    tap.hidden = None


def compute_reference(model: nn.Module, ids: torch.Tensor, k: int = TOP_K) -> TopKReference:
    """Run the FP model over ``ids`` (windows, seqlen), one window at a time, keeping the top-k log-probs."""
    windows = []
    for row in ids.split(1):
        fit_threads()
        return_freed()  # the last window's freed buffers: peaks do not pile up on them
        windows.append(window_reference(logprob_chunks(model, row), row[0], k))
    return TopKReference.stack(ids, windows)


def next_tokens(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each position of a window (T,) and whether it has one (all but the last), on the CPU."""
    ids = ids.cpu()
    nxt = torch.cat([ids[1:], ids[:1]]).long()
    has = torch.ones(ids.shape[0], dtype=torch.bool)
    has[-1:] = False
    return nxt, has


def window_reference(chunks: Iterable[tuple[int, int, torch.Tensor]], ids: torch.Tensor, k: int) -> WindowTop:
    """FP's side of one window (T,) from its log-probability chunks: top-k, and each next token's log-prob."""
    nxt, has = next_tokens(ids)
    vals, idxs, targets = [], [], []
    for s, e, logp in chunks:
        val, idx = top_k(logp, k)
        vals.append(val)
        idxs.append(idx)
        targets.append(logp.gather(-1, nxt[s:e, None]).squeeze(-1).float())
    target = torch.cat(targets).masked_fill(~has, math.nan)
    return WindowTop(torch.cat(vals), torch.cat(idxs), target)


def _tail(logp_top: torch.Tensor) -> torch.Tensor:
    """Log of the probability mass outside the given top-k log-probs (clamped away from log 0)."""
    mass = logp_top.exp().sum(dim=-1).clamp(max=1.0 - 1e-7)
    return torch.log1p(-mass)


def top_k(logp: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities (T, k) and their ids (T, k, int32) of log-probabilities (T, V)."""
    val, idx = logp.topk(k, dim=-1)
    return val, idx.to(torch.int32)


def topk_kl(q: torch.Tensor, p_top: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """Per-position KL(FP || Q) over FP's top-k plus the tail bucket (T,), from Q's log-probabilities (T, V)."""
    q_top = q.gather(-1, top_ids.long())
    p_tail, q_tail = _tail(p_top), _tail(q_top)
    kl = (p_top.exp() * (p_top - q_top)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
    return kl.clamp_min(0)


@dataclass
class DivergenceSum:
    """The per-token KL and Δp, and the top-k agreement counts, over windows."""

    top1: int = 0
    top5: int = 0
    kl_parts: list[torch.Tensor] = field(default_factory=list)
    dp_parts: list[torch.Tensor] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Positions added."""
        return sum(int(t.numel()) for t in self.kl_parts)

    def add(self, q: torch.Tensor, p_top: torch.Tensor, top_ids: torch.Tensor, target: torch.Tensor | None = None,
            p_target: torch.Tensor | None = None) -> None:
        """Add positions: Q's log-probabilities (T, V), FP's top-k log-probabilities and ids (T, k) there.

        With ``target`` (T,), the next token of each position, and ``p_target`` (T,), FP's log-probability
        of it (NaN where a position has no next token), Δp is added too.
        """
        idx = top_ids.long()
        self.kl_parts.append(topk_kl(q, p_top, idx).float().cpu())
        q_best = q.topk(5, dim=-1).indices
        self.top1 += int((q_best[:, 0] == idx[:, 0]).sum())
        self.top5 += int((q_best == idx[:, :1]).any(-1).sum())
        if target is not None and p_target is not None:
            keep = ~torch.isnan(p_target)
            q_target = q.gather(-1, target.long()[:, None]).squeeze(-1)
            self.dp_parts.append((q_target.exp() - p_target.exp())[keep].float().cpu())

    def add_full(self, p: torch.Tensor, q: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Add positions from both models' full log-probabilities (T, V): the exact KL over the vocabulary.

        ``target`` (T,): the next token of each position, for Δp (every position must have one).
        """
        self.kl_parts.append((p.exp() * (p - q)).sum(-1).clamp_min(0).float().cpu())
        q_best = q.topk(5, dim=-1).indices
        p_best = p.argmax(-1)
        self.top1 += int((q_best[:, 0] == p_best).sum())
        self.top5 += int((q_best == p_best[:, None]).any(-1).sum())
        if target is not None:
            idx = target.long()[:, None]
            self.dp_parts.append((q.gather(-1, idx).exp() - p.gather(-1, idx).exp()).squeeze(-1).float().cpu())

    def add_window(self, chunks: Iterable[tuple[int, int, torch.Tensor]], fp: WindowTop, ids: torch.Tensor) -> None:
        """Add one window (T,) from Q's log-probability chunks and FP's side of the whole window."""
        nxt, _ = next_tokens(ids)
        for s, e, q in chunks:
            self.add(q, fp.top_logp[s:e], fp.top_ids[s:e], nxt[s:e], fp.target_logp[s:e])

    def result(self) -> Divergence:
        """The means over every token added, with the per-token values."""
        kl = torch.cat(self.kl_parts) if self.kl_parts else torch.zeros(0)
        dp = torch.cat(self.dp_parts) if self.dp_parts else torch.zeros(0)
        n = int(kl.numel())
        return Divergence(float(kl.double().sum()) / n, self.top1 / n, self.top5 / n, n, kl, dp)


def divergence(model: nn.Module, ref: TopKReference,
               logprobs: Callable[[int], Iterator[tuple[int, int, torch.Tensor]]] | None = None) -> Divergence:
    """KL(FP || Q), top-k agreement and Δp of ``model`` against a reference computed on the FP model.

    ``logprobs(w)`` gives window ``w``'s log-probabilities as :func:`logprob_chunks` does (default: the
    model's whole forward on the window; the search's kl signal starts it at a layer).
    """
    acc = DivergenceSum()
    for w in range(ref.ids.shape[0]):
        fit_threads()
        return_freed()  # the last window's freed buffers: peaks do not pile up on them
        chunks = logprob_chunks(model, ref.ids[w : w + 1]) if logprobs is None else logprobs(w)
        acc.add_window(chunks, ref.window(w), ref.ids[w])
    return acc.result()


def full_divergence(fp_model: nn.Module, q_model: nn.Module, ids: torch.Tensor, start: int = 0,
                    chunk: int = CHUNK) -> Divergence:
    """The exact full-vocabulary KL(FP || Q), agreement and Δp of two models on the same windows (windows, T).

    Scores the positions ``start .. T - 2`` of each window (those with a next token in the window):
    ``llama-perplexity`` scores ``n_ctx // 2 .. n_ctx - 2`` of each chunk. Both models run once per
    window; their log-probabilities meet ``chunk`` positions at a time, so (T, V) logits never exist.
    """
    acc = DivergenceSum()
    for row in ids.split(1):
        fit_threads()
        nxt, _ = next_tokens(row[0])
        end = row.shape[1] - 1
        pairs = zip(logprob_chunks(fp_model, row, chunk), logprob_chunks(q_model, row, chunk), strict=True)
        for (s, e, p), (_, _, q) in pairs:
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                acc.add_full(p[lo - s : hi - s], q[lo - s : hi - s], nxt[lo:hi])
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
            if "target_logp" not in data or not torch.equal(data["ids"], ids.to(data["ids"].dtype)):
                return None
            return TopKReference(data["ids"], data["top_ids"], data["top_logp"], data["target_logp"])

        def save(ref: TopKReference, path: Path) -> None:
            save_file({"ids": ref.ids.contiguous(), "top_ids": ref.top_ids.contiguous(),
                       "top_logp": ref.top_logp.contiguous(), "target_logp": ref.target_logp.contiguous()},
                      str(path))

        path = entry(self.root, ".safetensors", model, fingerprint, dtype=dtype, ids=ids, k=k,
                     format=REFERENCE_FORMAT)
        ref, computed = load_or_compute(path, load, lambda: compute_reference(model, ids, k), save)
        self.computed += computed
        return ref
