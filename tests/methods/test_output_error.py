"""``output_error`` (the Hessian form of a weight change's output error) against its definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptqlab.methods.base import output_error, relative_output_error

EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize(("rows", "cols", "tokens"), [(40, 300, 600), (24, 700, 900), (16, 1000, 600)])
def test_output_error_is_the_squared_output_change_on_the_inputs(rows: int, cols: int, tokens: int) -> None:
    """tr(D H D^T) = ||X D^T||^2 for H = X^T X, below and above the half-Hessian sum's threshold of 512 columns,
    for a column count that is not a multiple of its blocks and for a rank-deficient H (fewer tokens than columns)."""
    g = torch.Generator().manual_seed(cols)
    # correlated channels (a shared component) and a change of one sign per row: the blocks off H's diagonal
    # carry most of the sum, so a block counted once instead of twice shows
    shared = torch.randn(tokens, 1, generator=g, dtype=torch.float64)
    X = shared + 0.5 * torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    D = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 1e-2
    H = X.T @ X
    exact = float(((X @ D.T) ** 2).sum())
    got = float(output_error(D.float(), H.float()))
    # float32 error: the inputs' rounding (a relative eps on each of D, D, H) and dot products of at most `cols`
    # terms, each bounded by |D| |H| |D|^T; well above the last bit, far below a missing or doubled block
    bound = (3 + 2 * cols) * EPS32 * float((D.abs() @ H.abs() * D.abs()).sum())
    assert abs(got - exact) <= bound
    assert bound < 1e-3 * exact


def test_relative_output_error_of_a_scaled_weight() -> None:
    """Wq = (1 + c) W changes the output by c X W^T: the relative error is |c| exactly (to float32)."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(800, 640, generator=g)
    W = torch.randn(32, 640, generator=g)
    assert relative_output_error(W, 1.01 * W, X.T @ X) == pytest.approx(0.01, rel=1e-3)
