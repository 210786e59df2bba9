"""Rotation matrices (QuaRot-style): structured orthogonal matrices that spread outliers.

A width ``d = 2^k * m`` (m odd) gets ``Q = (H_{2^k} D) kron R_m``: a Sylvester Hadamard matrix with random
signs ``D`` (normalised), times a random orthogonal ``R_m`` (QR of a Gaussian) for the odd factor; a
power of two is a plain randomised Hadamard, a width with no power-of-two factor a random orthogonal
matrix. ``Q`` is orthogonal, so rotating the residual stream (and the input of ``down_proj`` online)
keeps the float function exactly where the norms allow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..threads import single_thread


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``n`` (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"no Sylvester Hadamard matrix of order {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def split_power_of_two(d: int) -> tuple[int, int]:
    """``(2^k, m)`` with ``d = 2^k * m`` and m odd."""
    p = d & -d
    return p, d // p


@dataclass(frozen=True)
class Rotation:
    """A structured orthogonal matrix ``Q = A kron B`` with ``A`` (p, p) and ``B`` (m, m).

    ``x @ Q`` for x (..., p*m) is computed as ``A^T``/``B`` products on the (p, m) view, never forming Q.
    """

    A: torch.Tensor
    B: torch.Tensor

    @property
    def size(self) -> int:
        """The width d."""
        return int(self.A.shape[0] * self.B.shape[0])

    def matrix(self) -> torch.Tensor:
        """The dense (d, d) matrix Q (float64)."""
        return torch.kron(self.A, self.B)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` for x (..., d), in x's dtype."""
        p, m = self.A.shape[0], self.B.shape[0]
        A, B = self.A.to(x.device, x.dtype), self.B.to(x.device, x.dtype)
        v = x.reshape(-1, p, m)  # (N, p, m); row-major kron: (x @ (A kron B)) viewed (p, m) = A^T V B
        if m > 1:
            v = v @ B
        w = v.transpose(1, 2).reshape(-1, p) @ A  # (N*m, p): one GEMM for A^T V, all tokens at once
        return w.reshape(-1, m, p).transpose(1, 2).reshape(x.shape)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal (n, n) matrix (QR of a Gaussian, signs fixed), float64."""
    G = torch.randn(n, n, generator=generator, dtype=torch.float64)
    with single_thread():  # LAPACK's result would depend on the thread count
        Qm, R = torch.linalg.qr(G)
    return (Qm * torch.sign(torch.diagonal(R))[None, :]).contiguous()


def random_rotation(d: int, seed: int) -> Rotation:
    """The randomised Hadamard (times a random orthogonal odd factor) rotation of width ``d``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + d)
    p, m = split_power_of_two(d)
    signs = torch.randint(0, 2, (p,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    A = hadamard(p) * signs[:, None] / p**0.5  # D H / sqrt(p): orthogonal
    B = random_orthogonal(m, g) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    return Rotation(A, B)
