"""GPTQ (Frantar et al., 2023): column-by-column quantization with error feedback.

Each column's quantization error is spread over the columns not yet quantized through the inverse
Hessian of the layer's inputs.

The class reads like the paper: ``H`` is the Hessian 2/n X X^T of the layer inputs, ``Hinv`` the upper
Cholesky factor of its (damped) inverse, ``err`` a column's scaled quantization error. Lazy batch updates
(blocks of ``block_size`` columns) change only the order of the floating-point work, not the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..quant.core import choose_qparams, to_codes, values
from ..quant.formats import MX_FORMATS
from ..quant.gguf import BLOCK_TYPES
from ..quant.integer import QParams
from ..quant.spec import QuantSpec
from .base import WeightResult


@dataclass(frozen=True)
class GPTQConfig:
    """Knobs of GPTQ.

    Attributes:
        damp: Fraction of the mean Hessian diagonal added to the diagonal (0.01 in the paper).
        block_size: Columns per lazy batch update (128 in the paper).
        act_order: Quantize columns in order of decreasing Hessian diagonal.
        static_groups: With act-order and groups, fix each group's range from the original weight
            before any update, in the natural column order (else groups follow the permuted order).
        min_tokens: Fewest calibration tokens a linear's Hessian must come from; a linear that saw fewer
            (an expert of a mixture-of-experts layer the router sent too few tokens) is rounded to nearest
            (RTN) instead, and its layer record says so. 1 (the default): only an expert that saw no token,
            whose Hessian is zero, falls back.

    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    min_tokens: int = 1

    def __post_init__(self) -> None:
        """Validate the knobs."""
        from ..errors import ConfigError

        if not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"recipe.gptq.damp={self.damp} must be in [0, 1)")
        if self.block_size < 1:
            raise ConfigError(f"recipe.gptq.block_size={self.block_size} must be positive")
        if self.min_tokens < 1:
            raise ConfigError(f"recipe.gptq.min_tokens={self.min_tokens} must be at least 1 (no token: a zero Hessian)")


class GPTQ:
    """Quantize one weight matrix with GPTQ given the Hessian of its inputs (a quantizer)."""

    kind: ClassVar[str] = "quantizer"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: GPTQConfig | None = None) -> None:
        self.config = config or GPTQConfig()

    @property
    def permutes_columns(self) -> bool:
        """Whether columns are quantized in order of decreasing Hessian diagonal (``act_order: true``)."""
        return self.config.act_order

    @property
    def min_tokens(self) -> int:
        """Fewest calibration tokens a Hessian must come from (the driver rounds to nearest below it)."""
        return self.config.min_tokens

    def check_spec(self, spec: QuantSpec) -> None:
        """Every weight format (a ``kmeans`` codebook is fitted with the Hessian's diagonal)."""

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        """Quantize ``W`` (out, in) against the input Hessian ``H`` (in, in).

        Args:
            W: Weight matrix (out_features, in_features), any float dtype; computed in W's dtype
                promoted to at least float32.
            spec: Weight quantization spec.
            H: Hessian 2/n X^T X of the inputs (in, in).

        Returns:
            The dequantized weight, integer codes, per-group parameters and each column's group index,
            all in the natural column order.

        """
        if H is None:
            raise ValueError("GPTQ needs the Hessian of the layer inputs")
        dtype = torch.promote_types(W.dtype, torch.float32)
        W = W.detach().to(dtype).clone()
        H = H.detach().to(dtype).clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        static = self._static_params(W, spec, H)
        perm = torch.argsort(torch.diag(H), descending=True) if self.config.act_order else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]
        Hinv = self.inverse_cholesky(H)
        codes, scale, zero, group_of = self._quantize_columns(W, Hinv, spec, static, perm)
        if perm is not None:
            inv = torch.argsort(perm)
            codes, scale, zero, group_of = codes[:, inv], scale[:, inv], zero[:, inv], group_of[inv]
        if spec.is_codebook and static is not None:  # one codebook per row, fixed before the loop
            return WeightResult(weight=values(codes, static.scale, static.zero, spec), codes=codes, qparams=static)
        weight = values(codes, scale, zero, spec)
        return WeightResult(weight=weight, codes=codes, qparams=_per_group(scale, zero, group_of), g_idx=group_of)

    def _static_params(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor) -> QParams | None:
        """Ranges fixed before any update: per tensor/row always, per group when static_groups.

        A ``kmeans`` codebook is fitted to the weight with the Hessian diagonal as column importance
        (SqueezeLLM's weighting), and GPTQ then rounds each column to it.
        """
        if spec.is_codebook:
            return choose_qparams(W, spec, torch.diag(H))
        if spec.granularity != "group" or self.config.static_groups:
            return choose_qparams(W, spec)
        return None

    def inverse_cholesky(self, H: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of the inverse of the damped Hessian.

        With ``J`` the order reversal and ``J H J = L L^T``, ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` where ``J L^-1 J``
        is upper triangular with a positive diagonal: the factor itself, from one Cholesky factorization and
        one triangular solve (forming ``H^-1`` and factoring it again took 4.7x as long at 8960 columns: 32.3 s
        against 6.9 s on two threads beside a sweep).
        """
        damp = self.config.damp * torch.mean(torch.diag(H))
        H = H + damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        L = torch.linalg.cholesky(H.flip(0, 1))
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)

    def _block_size(self, spec: QuantSpec) -> int:
        """Lazy-batch width aligned so that no dynamic group straddles two blocks."""
        bs = self.config.block_size
        if spec.granularity == "group" and spec.group_size and not self.config.static_groups:
            span = _span(spec)
            return span * max(1, bs // span)
        return bs

    def _quantize_columns(
        self,
        W: torch.Tensor,
        Hinv: torch.Tensor,
        spec: QuantSpec,
        static: QParams | None,
        perm: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the column loop; return codes, per-column scale and zero, and each column's group.

        The block being worked on is held transposed (a column a contiguous row), so each column's rank-1
        update of the block's later columns is one contiguous ``addr_`` (a strided update of the
        row-major block took most of the time on wide layers).
        """
        rows, cols = W.shape
        codes = torch.zeros_like(W)
        scale = torch.zeros_like(W)
        zero = torch.zeros_like(W)
        group_of = torch.zeros(cols, dtype=torch.long, device=W.device)
        bs = self._block_size(spec)
        natural = perm if perm is not None else torch.arange(cols, device=W.device)
        held: QParams | None = None
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            W1 = W[:, i1:i2].T.contiguous()  # (block columns, rows)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                held, k, group_of[j] = self._column_params(W1, i, j, natural, spec, static, held)
                s_col, z_col = (held.scale, held.zero) if spec.is_codebook else (held.scale[:, k], held.zero[:, k])
                w = W1[i]
                q = to_codes(w, s_col, z_col, spec)
                codes[:, j] = q
                if not spec.is_codebook:
                    scale[:, j], zero[:, j] = s_col, z_col
                err = (w - values(q, s_col, z_col, spec)) / Hinv1[i, i]
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
                Err1[i] = err
            W[:, i2:].addmm_(Err1.T, Hinv[i1:i2, i2:], alpha=-1)
        return codes, scale, zero, group_of

    @staticmethod
    def _column_params(
        W1: torch.Tensor,
        i: int,
        j: int,
        natural: torch.Tensor,
        spec: QuantSpec,
        static: QParams | None,
        held: QParams | None,
    ) -> tuple[QParams, int, int]:
        """Parameters for processed column ``j`` (``i`` within the current block ``W1``, held transposed).

        Returns the parameters holding its range, the column of them it uses, and its group index.
        Dynamic groups get their parameters when the loop reaches their first column, from the columns
        as updated so far; a K-quant super-block's (eight groups chosen together) at its first column.
        """
        if static is not None:
            g = int(natural[j]) // spec.group_size if spec.granularity == "group" and spec.group_size else 0
            return static, g, g
        gs = spec.group_size or 1
        span = _span(spec)
        if j % span == 0 or held is None:
            held = choose_qparams(W1[i : i + span].T, _as_channel(spec))
        return held, (j % span) // gs, j // gs


def _span(spec: QuantSpec) -> int:
    """Columns whose parameters are chosen together: a group, or a GGUF K-quant super-block."""
    block = BLOCK_TYPES.get(spec.format)
    return block.span if block is not None else spec.group_size or 1


def _as_channel(spec: QuantSpec) -> QuantSpec:
    """The same grid with one range per row (used on a group's slice of columns)."""
    if spec.format in MX_FORMATS or spec.format in BLOCK_TYPES:  # the slice is whole blocks of each row
        return spec
    return spec.replace(granularity="channel", group_size=None)


def _per_group(scale: torch.Tensor, zero: torch.Tensor, group_of: torch.Tensor) -> QParams:
    """Collapse per-column parameters (rows, cols) into per-group ones (rows, groups)."""
    groups = int(group_of.max()) + 1
    first = torch.zeros(groups, dtype=torch.long, device=group_of.device)
    first[group_of] = torch.arange(len(group_of), device=group_of.device)  # any column of the group
    return QParams(scale[:, first], zero[:, first])
