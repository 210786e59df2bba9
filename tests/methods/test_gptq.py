"""GPTQ against an independent, plain column-by-column implementation of the paper's update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptqlab.methods.base import HessianAccumulator, relative_output_error
from ptqlab.methods.gptq import GPTQ, GPTQConfig
from ptqlab.methods.rtn import RTN
from ptqlab.quant import QuantSpec, dequantize, quantize


def _grid(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric min-max grid containing 0, one range per row of ``w`` (rows, k)."""
    maxq = 2**bits - 1
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    scale = (hi - lo) / maxq
    scale[scale == 0] = 1.0
    return scale, np.round(-lo / scale)


def plain_gptq(W, H, bits, group=None, act_order=False, static=False, damp=0.01):
    """Paper's algorithm, float64, one column at a time, no blocks. Returns codes in natural order."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, cols = W.shape
    maxq = 2**bits - 1
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    if static or group is None:
        src = W
        params = {g: _grid(src[:, g * group:(g + 1) * group], bits) for g in range(cols // group)} if group \
            else {0: _grid(W, bits)}
    W, H = W[:, order], H[np.ix_(order, order)]
    H = H + damp * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1
    codes = np.zeros_like(W)
    for j in range(cols):
        if group is None:
            scale, zero = params[0]
        elif static:
            scale, zero = params[order[j] // group]
        elif j % group == 0:
            scale, zero = _grid(W[:, j:j + group], bits)
        q = np.clip(np.round(W[:, j] / scale) + zero, 0, maxq)
        codes[:, j] = q
        err = (W[:, j] - scale * (q - zero)) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
    out = np.zeros_like(codes)
    out[:, order] = codes
    return out


def _problem(rows=24, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(512, 8, generator=g, dtype=torch.float64)
    mix = torch.randn(8, cols, generator=g, dtype=torch.float64)
    X = base @ mix + 0.1 * torch.randn(512, cols, generator=g, dtype=torch.float64)  # correlated inputs
    X[:, 5] *= 10  # an outlier channel makes act-order matter
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    H = 2.0 / X.shape[0] * X.T @ X
    return W, H, X


@pytest.mark.parametrize(
    ("group", "act_order", "static", "block"),
    [(None, False, False, 128), (None, True, False, 16), (16, False, False, 128), (16, True, False, 128),
     (16, True, True, 128), (16, False, False, 24), (32, True, False, 8)],
)
def test_codes_equal_plain_reference(group, act_order, static, block):
    W, H, _ = _problem()
    spec = QuantSpec(bits=3, granularity="group" if group else "channel", group_size=group)
    res = GPTQ(GPTQConfig(act_order=act_order, static_groups=static, block_size=block)).quantize(W, spec, H)
    ref = plain_gptq(W.numpy(), H.numpy(), 3, group, act_order, static)
    assert res.weight.dtype == torch.float64
    mismatch = (res.codes.numpy() != ref).mean()
    assert mismatch == 0.0, f"{mismatch:.4%} codes differ"


def test_gptq_beats_rtn_on_correlated_inputs():
    W, H, X = _problem(rows=64, cols=64, seed=1)
    for spec in (QuantSpec(bits=3), QuantSpec(bits=4, granularity="group", group_size=16)):
        g = GPTQ().quantize(W.float(), spec, H.float()).weight.double()
        r = RTN().quantize(W.float(), spec).weight.double()
        err_g = torch.linalg.norm(X @ (g - W).T)
        err_r = torch.linalg.norm(X @ (r - W).T)
        assert err_g < 0.8 * err_r
        assert relative_output_error(W, g, H) < relative_output_error(W, r, H)


def test_qparams_and_g_idx_reconstruct_weight():
    W, H, _ = _problem()
    spec = QuantSpec(bits=4, granularity="group", group_size=16)
    res = GPTQ(GPTQConfig(act_order=True)).quantize(W, spec, H)
    g = res.g_idx
    rebuilt = res.qparams.scale[:, g] * (res.codes - res.qparams.zero[:, g])
    torch.testing.assert_close(rebuilt, res.weight)
    assert res.codes.min() >= 0 and res.codes.max() <= 15


def test_hessian_accumulator_matches_batch_formula():
    X = torch.randn(100, 12)
    acc = HessianAccumulator(12)
    for chunk in X.split(7):
        acc.add(chunk)
    torch.testing.assert_close(acc.H, 2 / 100 * X.T @ X, rtol=1e-5, atol=1e-6)


def test_dead_input_columns_are_zeroed():
    W, H, _ = _problem()
    H[3, :] = 0
    H[:, 3] = 0
    res = GPTQ().quantize(W, QuantSpec(bits=4), H)
    assert torch.all(res.weight[:, 3] == 0)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(format="nf4", granularity="group", group_size=16),
        QuantSpec(format="fp4_e2m1", granularity="channel"),
        QuantSpec(format="mxfp4"),
        QuantSpec(format="fp8_e4m3", granularity="group", group_size=32),
        QuantSpec(bits=3, granularity="channel", clipping="mse"),
    ],
)
def test_gptq_with_number_formats_beats_rtn_and_stays_on_the_grid(spec: QuantSpec) -> None:
    W, H, _ = _problem()
    gptq = GPTQ().quantize(W.float(), spec, H.float())
    rtn = RTN().quantize(W.float(), spec)
    err = relative_output_error(W.float(), gptq.weight, H.float())
    assert err < relative_output_error(W.float(), rtn.weight, H.float())
    again = dequantize(quantize(gptq.weight, gptq.qparams, spec), gptq.qparams, spec)
    torch.testing.assert_close(again, gptq.weight, rtol=0, atol=1e-5)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    _, H, _ = _problem(cols=96)
    U = GPTQ(GPTQConfig(damp=0.01)).inverse_cholesky(H.float())
    damped = H + 0.01 * torch.mean(torch.diag(H)) * torch.eye(96, dtype=H.dtype)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # float64, the definition
    assert torch.equal(U, torch.triu(U)) and bool((torch.diag(U) > 0).all())
    # float32 against float64: a factorization's relative error is bounded by about cond(H) float32 epsilons
    bound = float(torch.linalg.cond(damped)) * torch.finfo(torch.float32).eps * float(expected.abs().max())
    torch.testing.assert_close(U.double(), expected, rtol=0, atol=bound)
