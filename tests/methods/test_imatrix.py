"""The importance-weighted scale search on llama.cpp's block types, against its definition."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ptqlab.errors import ConfigError
from ptqlab.methods import RTN, IMatrix, IMatrixConfig, build_recipe
from ptqlab.quant import gguf
from ptqlab.quant.spec import QuantSpec
from ptqlab.study.config import parse_config
from ptqlab.study.worker import Worker

FORMATS = ["gguf_q8_0", "gguf_q5_0", "gguf_q4_0", "gguf_q5_1", "gguf_q4_1"]


def _data(rows: int = 12, cols: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a few large entries and a Hessian of correlated inputs whose channels differ in scale."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[torch.rand(rows, cols, generator=g) < 0.02] *= 8.0
    X = torch.randn(512, cols, generator=g) * torch.rand(cols, generator=g).mul(3).add(0.2)
    X += 0.5 * torch.randn(512, 1, generator=g)
    return W, X.T @ X / 512


def _blocks(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy().reshape(t.shape[0], -1, gguf.BLOCK)


def _weighted(E: torch.Tensor, H: torch.Tensor, weighting: str) -> np.ndarray:
    """Per (row, block) weighted squared error of the change E, float64, as the module docstring defines it."""
    e, h = _blocks(E), H.double().numpy()
    out = np.zeros(e.shape[:2])
    for b in range(e.shape[1]):
        sl = slice(b * gguf.BLOCK, (b + 1) * gguf.BLOCK)
        M = h[sl, sl] if weighting == "block" else np.diag(np.diag(h[sl, sl]))
        out[:, b] = np.einsum("ri,ij,rj->r", e[:, b], M, e[:, b])
    return out


@pytest.mark.parametrize(("fmt", "weighting"), list(itertools.product(FORMATS, ["diagonal", "block"])))
def test_every_block_is_on_its_grid_and_no_worse_than_rtn(fmt: str, weighting: str) -> None:
    W, H = _data()
    spec = QuantSpec(format=fmt)
    res = IMatrix(IMatrixConfig(weighting=weighting)).quantize(W, spec, H)
    scale, zero = res.qparams.scale, res.qparams.zero
    t = gguf.BLOCK_TYPES[fmt]
    assert torch.equal(gguf.fp16(scale), scale) and bool((scale != 0).all())  # what a block stores
    if t.symmetric:
        assert bool((zero == 2 ** (t.bits - 1)).all())
    else:
        assert torch.equal(gguf.fp16(zero), zero)
    codes = res.codes.reshape(W.shape[0], -1, gguf.BLOCK)
    assert bool(((codes >= 0) & (codes <= t.maxq) & (codes == codes.round())).all())
    values = gguf.block_values(codes, scale[..., None], zero[..., None], fmt).reshape(W.shape)
    assert torch.equal(values, res.weight)
    ours = _weighted(res.weight - W, H, weighting)
    rtn = _weighted(RTN().quantize(W, spec).weight - W, H, weighting)
    # float32 search, float64 check: a tie may resolve either way by a few float32 roundings of the error
    assert (ours <= rtn * (1 + 1e-5) + 1e-12).all()
    assert ours.sum() < 0.98 * rtn.sum()  # the search finds better steps on most blocks


def _candidates(x: np.ndarray, fmt: str, factors: list[float], M: np.ndarray) -> float:
    """The least weighted error over the candidates, computed directly for one block, float64."""
    t = gguf.BLOCK_TYPES[fmt]
    xt = torch.tensor(x, dtype=torch.float32)
    s0, z0 = (float(v) for v in gguf.block_params(xt.amin()[None], xt.amax()[None], fmt))

    def err(s: float, z: float) -> float:
        st, zt = torch.tensor([s], dtype=torch.float32), torch.tensor([z], dtype=torch.float32)
        v = gguf.block_values(gguf.block_codes(xt, st, zt, fmt), st, zt, fmt).double().numpy()
        return float((v - x) @ M @ (v - x))

    best = err(s0, z0)
    for r in factors:
        s = float(gguf.fp16(torch.tensor([s0 * r]))[0]) or s0
        zt = torch.tensor([z0], dtype=torch.float32)
        q = gguf.block_codes(xt, torch.tensor([s], dtype=torch.float32), zt, fmt).double().numpy()
        best = min(best, err(s, z0))
        if t.symmetric:
            c = q - z0
            if c @ M @ c > 0:
                d = float(gguf.fp16(torch.tensor([(c @ M @ x) / (c @ M @ c)]))[0])
                if d != 0:
                    best = min(best, err(d, z0))
        else:
            A = np.stack([q, np.ones_like(q)], 1)
            sol = np.linalg.lstsq(np.linalg.cholesky(M + 1e-12 * np.eye(len(x))).T @ A,
                                  np.linalg.cholesky(M + 1e-12 * np.eye(len(x))).T @ x, rcond=None)[0]
            d, m = (float(gguf.fp16(torch.tensor([v]))[0]) for v in sol)
            if d > 0:
                best = min(best, err(d, m))
    return best


@pytest.mark.parametrize("fmt", ["gguf_q4_0", "gguf_q4_1"])
def test_the_search_keeps_the_least_error_candidate(fmt: str) -> None:
    W, H = _data(rows=4, cols=64, seed=1)
    cfg = IMatrixConfig(grid=9, weighting="block")
    res = IMatrix(cfg).quantize(W, QuantSpec(format=fmt), H)
    ours = _weighted(res.weight - W, H, "block")
    factors = IMatrix(cfg)._factors()
    h = H.double().numpy()
    for r, b in itertools.product(range(W.shape[0]), range(W.shape[1] // gguf.BLOCK)):
        sl = slice(b * gguf.BLOCK, (b + 1) * gguf.BLOCK)
        direct = _candidates(W[r, sl].double().numpy(), fmt, factors, h[sl, sl])
        assert ours[r, b] == pytest.approx(direct, rel=1e-4, abs=1e-12), (r, b)


def test_without_a_hessian_every_column_weighs_the_same() -> None:
    W, _ = _data()
    res = IMatrix().quantize(W, QuantSpec(format="gguf_q4_0"))
    assert ((res.weight - W) ** 2).sum() < ((RTN().quantize(W, QuantSpec(format="gguf_q4_0")).weight - W) ** 2).sum()


@pytest.mark.parametrize("options", [{"grid": 0}, {"span": 1.0}, {"weighting": "full"}])
def test_bad_options_are_named(options: dict) -> None:
    with pytest.raises(ConfigError, match="imatrix"):
        build_recipe([{"imatrix": options}])


def test_formats_it_cannot_search_are_refused_before_any_work() -> None:
    cfg = parse_config({"model": "stories260k", "scheme": {"weight": {"bits": 4, "granularity": "channel"}},
                        "recipe": [{"imatrix": {}}], "calibration": {"samples": 2, "seqlen": 32}})
    message = "recipe imatrix searches the steps of llama.cpp's 32-column block types"
    with pytest.raises(ConfigError, match=message):
        Worker(progress=False).prepare(cfg)  # when the plan is bound, before calibration or quantization
    with pytest.raises(ConfigError, match=message + ".*gguf_q4_k.*Q4_K's sub-block scales"):
        IMatrix().check_spec(QuantSpec(format="gguf_q4_k", where="scheme.weight"))
