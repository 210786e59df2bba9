"""Non-uniform k-means codebooks (format kmeans) and SqueezeLLM: against their definitions."""

from __future__ import annotations

import pytest
import torch

from ptqlab.compile import bind, compile_config
from ptqlab.errors import ConfigError
from ptqlab.methods.gptq import GPTQ
from ptqlab.methods.rtn import RTN
from ptqlab.methods.squeezellm import SqueezeLLM
from ptqlab.models.loading import load_model
from ptqlab.quant.codebook import codebook_values, kmeans_codebook, nearest_codes
from ptqlab.quant.core import fake_quantize, params_from_range
from ptqlab.quant.size import weight_storage_bits
from ptqlab.quant.spec import QuantSpec
from ptqlab.study.config import parse_config


def test_well_separated_clusters_are_found_exactly() -> None:
    row = torch.tensor([-1.0] * 10 + [0.0] * 10 + [2.0] * 10 + [5.0] * 10)
    w = torch.stack([row, row.flip(0) * 0.5])
    c = kmeans_codebook(w, 2)
    assert c.tolist() == [[-1.0, 0.0, 2.0, 5.0], [-0.5, 0.0, 1.0, 2.5]]
    assert torch.equal(codebook_values(nearest_codes(w, c), c), w)


def test_the_weights_pull_a_centroid_to_the_weighted_mean() -> None:
    """Lloyd from the quantiles [0, 10, 20, 30]: 10 and 11 share a centroid, (10*1 + 11*3) / 4 weighted."""
    w = torch.tensor([[0.0, 10.0, 11.0, 20.0, 30.0]])
    assert kmeans_codebook(w, 2, torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0])).tolist() == [[0.0, 10.75, 20.0, 30.0]]
    assert kmeans_codebook(w, 2).tolist() == [[0.0, 10.5, 20.0, 30.0]]


def test_the_rows_extremes_stay_centroids() -> None:
    """A lone outlier keeps its own centroid, as the uniform grid keeps its range's ends."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 256, generator=g) * 0.02
    w[:, 7] = 0.9
    w[:, 9] = -0.7
    c = kmeans_codebook(w, 3)
    assert torch.equal(c[:, 0], w.min(dim=1).values.half().float())
    assert torch.equal(c[:, -1], w.max(dim=1).values.half().float())


def test_codes_are_the_nearest_centroid_and_a_midpoint_goes_below() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 300, generator=g)
    c = kmeans_codebook(w, 3)
    codes = nearest_codes(w, c).long()
    brute = (w[:, :, None] - c[:, None, :]).abs().argmin(dim=-1)
    assert torch.equal((w - codebook_values(codes, c)).abs(), (w - codebook_values(brute, c)).abs())
    mid = torch.tensor([[0.5]])
    assert nearest_codes(mid, torch.tensor([[0.0, 1.0, 2.0, 3.0]])).item() == 0
    assert torch.equal(c, c.half().float()) and bool((c[:, 1:] >= c[:, :-1]).all())


def test_kmeans_beats_the_uniform_grid_and_counts_its_codebook() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 512, generator=g) * 0.05
    for bits in (3, 4):
        km = fake_quantize(w, QuantSpec(format="kmeans", bits=bits))
        uniform = fake_quantize(w, QuantSpec(bits=bits))
        assert (km - w).pow(2).mean() < (uniform - w).pow(2).mean()
        codebooks = 64 * 16 * 2**bits  # an FP16 centroid per code, per row
        assert weight_storage_bits(QuantSpec(format="kmeans", bits=bits), 64, 512) == 64 * 512 * bits + codebooks


def test_squeezellm_weighs_columns_by_the_hessian_and_gptq_rounds_to_the_codebook() -> None:
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2048, 128, generator=g) * torch.linspace(0.05, 4.0, 128)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(32, 128, generator=g) * 0.05
    spec = QuantSpec(format="kmeans", bits=3)

    def diag_loss(Q: torch.Tensor) -> float:
        return float(((Q - W) ** 2 * torch.diag(H)).sum())

    def loss(Q: torch.Tensor) -> float:
        E = Q - W
        return float(torch.einsum("ij,jk,ik->", E, H, E))

    rtn = RTN().quantize(W, spec)
    squeeze = SqueezeLLM().quantize(W, spec, H)
    gptq = GPTQ().quantize(W, spec, H)
    assert diag_loss(squeeze.weight) < diag_loss(rtn.weight)
    assert loss(gptq.weight) < loss(squeeze.weight)
    for res in (squeeze, gptq):  # every weight is a centroid of its row's codebook
        assert torch.equal(codebook_values(res.codes, res.qparams.scale), res.weight)
    assert torch.equal(gptq.qparams.scale, kmeans_codebook(W, 3, torch.diag(H)))


def test_what_a_codebook_cannot_do_is_refused() -> None:
    with pytest.raises(ConfigError, match="granularity channel"):
        QuantSpec(format="kmeans", bits=4, granularity="group", group_size=32)
    with pytest.raises(ConfigError, match="clipping"):
        QuantSpec(format="kmeans", bits=4, clipping="mse")
    with pytest.raises(ConfigError, match="format: kmeans"):
        SqueezeLLM().quantize(torch.zeros(2, 4), QuantSpec(bits=4), torch.eye(4))
    with pytest.raises(ConfigError, match="codebooks, not ranges"):
        params_from_range(torch.zeros(2, 1), torch.ones(2, 1), QuantSpec(format="kmeans", bits=4))
    data = {"model": "stories260k", "scheme": {"weight": {"format": "kmeans", "bits": 4}},
            "recipe": [{"awq": {}}], "calibration": {"samples": 2, "seqlen": 32}}
    cfg = parse_config(data)
    lm = load_model(cfg.model, cfg.dtype, "cpu")
    with pytest.raises(ConfigError, match="format kmeans.*awq"):
        bind(compile_config(cfg), lm.model, lm.tokenizer)
