"""Non-uniform per-row codebooks: 1-D k-means (SqueezeLLM-style) with ``2**bits`` centroids per row.

Format ``kmeans`` quantizes each output row of a weight to the nearest of its own ``2**bits`` centroids.
The centroids minimise ``sum_j w_j (W_ij - c(W_ij))**2`` over the row, with weights ``w_j`` per input
column: all ones without data, the Hessian diagonal (the inputs' mean square) when a calibrated method
passes it (SqueezeLLM weighs by the Fisher diagonal; the Hessian's is its second-order analogue here).
The weighted iterations start from the plain solution, so they only lower the weighted loss from it.
Each row stores its codes and its FP16 codebook, ``2**bits * 16`` bits per row, counted in the size.

Lloyd's algorithm in one dimension: each row is sorted once, so a cluster is a run of the sorted row
between two of the centroids' midpoints, and its weighted mean comes from prefix sums (float64) at the
run's ends; an empty cluster keeps its centroid. The first and last centroids stay at the row's minimum
and maximum, as the uniform grid's ends do: plain MSE-optimal k-means gives the few large weights of a
row (the ones a language model is most sensitive to) a centroid shared with the bulk, and on SmolLM2 a
row's largest error grew to several times the uniform grid's. It starts from the row's evenly spaced
quantiles and stops when no assignment changes or after :data:`MAX_ITERATIONS`. A value on a midpoint
goes to the lower centroid. Everything is deterministic.
"""

from __future__ import annotations

import torch

MAX_ITERATIONS = 100
"""Upper bound on Lloyd iterations per weight."""

_CHUNK = 1 << 24  # elements x midpoints compared at once when assigning codes


def _mids(centroids: torch.Tensor) -> torch.Tensor:
    return (centroids[:, 1:] + centroids[:, :-1]) * 0.5


def _assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each value of ``w`` (rows, n); ``centroids`` (rows, K) ascending."""
    mids = _mids(centroids)
    step = max(1, _CHUNK // max(1, w.shape[1] * mids.shape[1]))
    parts = [(w[r : r + step, :, None] > mids[r : r + step, None, :]).sum(dim=-1) for r in range(0, w.shape[0], step)]
    return torch.cat(parts) if parts else torch.zeros_like(w, dtype=torch.long)


def _initial(w: torch.Tensor, k: int) -> torch.Tensor:
    """The row's values at the quantiles (i + 0.5) / k, sorted."""
    cols = w.shape[1]
    ranks = ((torch.arange(k, dtype=torch.float64) + 0.5) * cols / k).long().clamp(max=cols - 1)
    return torch.sort(w, dim=1).values[:, ranks]


def _pinned(centroids: torch.Tensor, ordered: torch.Tensor) -> torch.Tensor:
    """The first and last centroids at the row's minimum and maximum (sorted rows in ``ordered``)."""
    out = centroids.clone()
    out[:, 0] = ordered[:, 0]
    out[:, -1] = ordered[:, -1]
    return out


def kmeans_codebook(w: torch.Tensor, bits: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row codebooks of ``2**bits`` sorted centroids for ``w`` (rows, cols).

    Args:
        w: The weight, float.
        bits: Bits per code.
        weights: Non-negative importance of each input column (cols,), or None for equal weights.

    Returns:
        Float32 centroids (rows, 2**bits), ascending within each row, FP16-representable.

    """
    w = w.float()
    ordered, idx = torch.sort(w, dim=1)
    centroids = _lloyd(ordered, torch.ones_like(ordered, dtype=torch.float64), _pinned(_initial(w, 1 << bits), ordered))
    if weights is not None:  # from the plain solution, so the weighted loss only goes down from it
        importance = weights.float().clamp(min=0).to(w.device)[idx].double()
        centroids = _lloyd(ordered, importance, centroids)
    return centroids.to(torch.float16).to(torch.float32)


def _lloyd(ordered: torch.Tensor, importance: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Lloyd iterations on sorted rows with per-value importance, from ``centroids`` (ends pinned)."""
    zero = torch.zeros(ordered.shape[0], 1, dtype=torch.float64, device=ordered.device)
    mass_sum = torch.cat([zero, importance.cumsum(dim=1)], dim=1)
    value_sum = torch.cat([zero, (importance * ordered.double()).cumsum(dim=1)], dim=1)
    ends = torch.full((ordered.shape[0], 1), ordered.shape[1], dtype=torch.long, device=ordered.device)
    bounds = None
    for _ in range(MAX_ITERATIONS):
        cut = torch.searchsorted(ordered, _mids(centroids).contiguous(), right=True)  # values <= mid go below
        new = torch.cat([torch.zeros_like(ends), cut, ends], dim=1)
        if bounds is not None and torch.equal(new, bounds):
            break
        bounds = new
        mass = mass_sum.gather(1, bounds[:, 1:]) - mass_sum.gather(1, bounds[:, :-1])
        total = value_sum.gather(1, bounds[:, 1:]) - value_sum.gather(1, bounds[:, :-1])
        moved = (total / mass.clamp(min=torch.finfo(torch.float64).tiny)).float()
        centroids = _pinned(torch.sort(torch.where(mass > 0, moved, centroids), dim=1).values, ordered)
    return centroids


def nearest_codes(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Codes of ``x`` (rows, n) or (rows,) against each row's sorted ``centroids`` (rows, K), as floats."""
    flat = x.reshape(x.shape[0], -1)
    codes = _assign(flat.float(), centroids.float())
    return codes.reshape(x.shape).to(x.dtype if x.is_floating_point() else torch.float32)


def codebook_values(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The centroid of each code: ``codes`` (rows, n) or (rows,) against ``centroids`` (rows, K)."""
    flat = codes.reshape(codes.shape[0], -1).long()
    return torch.gather(centroids, 1, flat).reshape(codes.shape)
