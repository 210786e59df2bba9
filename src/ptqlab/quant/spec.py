"""QuantSpec: what a quantized tensor looks like (bits, format, granularity, symmetry, zero point)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .formats import FORMAT_BITS, MX_BLOCK, MX_FORMATS
from .gguf import BLOCK, BLOCK_TYPES, GGUF_BITS

Granularity = Literal["tensor", "channel", "group", "token", "head"]
ZeroPoint = Literal["int", "float"]
_BLOCKED = MX_FORMATS | frozenset(BLOCK_TYPES)
Clipping = Literal["minmax", "percentile", "mse"]

FULL_PRECISION_BITS = 16
INT_BITS = range(2, 9)
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group", "token", "head")
CODEBOOK = "kmeans"
FORMATS: tuple[str, ...] = ("int", *FORMAT_BITS, *GGUF_BITS, CODEBOOK)
FIXED_BITS: dict[str, int] = {**FORMAT_BITS, **GGUF_BITS}
CLIPPINGS: tuple[str, ...] = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        bits: 2..8, or 16 for full precision (no quantization at all). None: the format's own bits
            (16 for ``int``). A format other than ``int`` fixes its bits; a different value is an error.
        format: Number format: ``int`` (uniform integer grid), scaled minifloats (``fp8_e4m3``,
            ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1``), OCP microscaling formats (``mxfp8_e4m3``,
            ``mxfp8_e5m2``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4``, ``mxint8``: blocks of 32 sharing a
            power-of-two E8M0 scale), ``nf4`` (QLoRA's normal-float levels times an absmax per range) and
            llama.cpp's GGUF block types (``gguf_q8_0``, ``gguf_q4_0``, ``gguf_q5_0``, ``gguf_q4_1``,
            ``gguf_q5_1``, ``gguf_q4_k``: weights only, blocks of 32 with FP16 parameters; their symmetry
            is the type's; see :mod:`ptqlab.quant.gguf`) and ``kmeans`` (a non-uniform codebook of ``2**bits``
            k-means centroids per output row, weights only; see :mod:`ptqlab.quant.codebook`).
        symmetric: Symmetric signed grid around 0, or asymmetric min-max grid with a zero point (``int``
            only; the other formats are sign-magnitude grids scaled by the absolute maximum).
        granularity: ``tensor`` (one range), ``channel`` (one range per output row), ``group`` (one range
            per ``group_size`` consecutive input columns of each row), ``token`` (activations and KV: one
            range per token) or ``head`` (KV: one range per token and head). None: ``group`` for MX
            formats, else ``channel``.
        group_size: Width of a group along the input dimension (granularity ``group`` only; MX: 32).
        zero_point: ``int`` (GPTQ-style integer zero point; the grid contains 0) or ``float``
            (zero point kept in floating point; the grid spans exactly [min, max]).
        clip_ratio: Factor applied to the range before choosing the scale (1.0 = plain min-max).
        clipping: How each range is set: ``minmax``, ``percentile`` (the ``percentile``-th percentile of
            the magnitudes, and 100 - it for the minimum) or ``mse`` (the clipping ratio among 20 points in
            [0.5, 1] that minimises each range's squared error).
        percentile: Percentile used by ``clipping: percentile``, in (50, 100].
        where: Name of the config field this spec came from, used in error messages.

    """

    bits: int | None = None
    format: str = "int"
    symmetric: bool = False
    granularity: Granularity | None = None
    group_size: int | None = None
    zero_point: ZeroPoint = "int"
    clip_ratio: float = 1.0
    clipping: Clipping = "minmax"
    percentile: float = 99.9
    where: str = "scheme.weight"

    def __post_init__(self) -> None:
        """Validate the spec; raise ConfigError naming the offending field."""
        if self.format not in FORMATS:
            raise ConfigError(f"{self.where}.format={self.format!r} is unknown; supported: {', '.join(FORMATS)}")
        self._resolve_bits()
        if self.granularity is None:
            object.__setattr__(self, "granularity", "group" if self.format in _BLOCKED else "channel")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"{self.where}.granularity={self.granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}"
            )
        self._check_mx()
        self._check_gguf()
        self._check_codebook()
        self._check_group_size()
        if self.zero_point not in ("int", "float"):
            raise ConfigError(f"{self.where}.zero_point={self.zero_point!r} must be 'int' or 'float'")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"{self.where}.clip_ratio={self.clip_ratio} must be in (0, 1]")
        if self.clipping not in CLIPPINGS:
            raise ConfigError(f"{self.where}.clipping={self.clipping!r} is unknown; use one of {', '.join(CLIPPINGS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"{self.where}.percentile={self.percentile} must be in (50, 100]")

    def _resolve_bits(self) -> None:
        fixed = FIXED_BITS.get(self.format)
        if self.bits is None:
            object.__setattr__(self, "bits", fixed if fixed is not None else FULL_PRECISION_BITS)
            return
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"{self.where}.bits must be an integer, got {self.bits!r}")
        if fixed is not None and self.bits not in (fixed, FULL_PRECISION_BITS):
            raise ConfigError(
                f"{self.where}.bits={self.bits} conflicts with format {self.format!r}, which has {fixed} bits "
                "(leave bits out, or use format int)"
            )
        if self.bits != FULL_PRECISION_BITS and self.bits not in INT_BITS:
            raise ConfigError(f"{self.where}.bits={self.bits} is out of range: use 2..8, or 16 for full precision")

    def _check_mx(self) -> None:
        if self.format not in MX_FORMATS:
            return
        if self.granularity != "group":
            raise ConfigError(
                f"{self.where}.granularity={self.granularity!r}: MX format {self.format!r} uses blocks of "
                f"{MX_BLOCK} along the input dimension; use granularity group (or leave it out)"
            )
        if self.group_size is None:
            object.__setattr__(self, "group_size", MX_BLOCK)
        elif self.group_size != MX_BLOCK:
            raise ConfigError(
                f"{self.where}.group_size={self.group_size}: MX format {self.format!r} uses blocks of exactly "
                f"{MX_BLOCK} (the OCP microscaling spec)"
            )

    def _check_gguf(self) -> None:
        block = BLOCK_TYPES.get(self.format)
        if block is None or not self.enabled:
            return
        name = f"{self.format!r} (llama.cpp {block.ggml})"
        if self.granularity != "group":
            raise ConfigError(f"{self.where}.granularity={self.granularity!r}: {name} is a weight format of blocks "
                              f"of {BLOCK} input columns; use granularity group (or leave it out)")
        if self.group_size is None:
            object.__setattr__(self, "group_size", BLOCK)
        elif self.group_size != BLOCK:
            raise ConfigError(f"{self.where}.group_size={self.group_size}: {name} has blocks of exactly {BLOCK}; "
                              "no GGUF block type has another group size")
        object.__setattr__(self, "symmetric", block.symmetric)
        object.__setattr__(self, "zero_point", "int" if block.symmetric else "float")

    def _check_codebook(self) -> None:
        if self.format != CODEBOOK or not self.enabled:
            return
        if self.granularity != "channel":
            raise ConfigError(f"{self.where}.granularity={self.granularity!r}: format kmeans keeps one codebook per "
                              "output row of a weight; use granularity channel (or leave it out)")
        if self.clipping != "minmax" or self.clip_ratio != 1.0:
            raise ConfigError(f"{self.where}: format kmeans places its centroids by k-means; clipping and clip_ratio "
                              "do not apply")

    @property
    def offset_zero(self) -> bool:
        """Whether ``zero`` is an additive offset (``scale * code + zero``: the GGUF types with a minimum)."""
        block = BLOCK_TYPES.get(self.format)
        return block is not None and not block.symmetric

    @property
    def is_codebook(self) -> bool:
        """Whether the format is a per-row k-means codebook."""
        return self.format == CODEBOOK

    def replace(self, **changes: object) -> QuantSpec:
        """A copy of this spec with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def _check_group_size(self) -> None:
        if self.granularity == "group":
            if self.group_size is None or isinstance(self.group_size, bool) or self.group_size < 1:
                raise ConfigError(f"{self.where}.group_size must be a positive integer with granularity 'group'")
        elif self.group_size is not None:
            raise ConfigError(
                f"{self.where}.group_size={self.group_size} is only valid with granularity 'group' "
                f"(granularity is {self.granularity!r})"
            )

    @property
    def enabled(self) -> bool:
        """Whether this spec quantizes at all (bits below 16)."""
        return self.nbits < FULL_PRECISION_BITS

    @property
    def nbits(self) -> int:
        """The bits, resolved (never None after validation)."""
        return FULL_PRECISION_BITS if self.bits is None else self.bits

    @property
    def maxq(self) -> int:
        """Largest integer code, ``2**bits - 1``."""
        return int(2**self.nbits - 1)

    @property
    def is_int(self) -> bool:
        """Whether the format is the uniform integer grid (scale and zero point)."""
        return self.format == "int"

    def require_granularity(self, allowed: tuple[str, ...]) -> None:
        """Raise ConfigError unless this spec's granularity is one of ``allowed`` (for its role)."""
        if self.enabled and self.granularity not in allowed:
            raise ConfigError(
                f"{self.where}.granularity={self.granularity!r} is not valid here; use one of {', '.join(allowed)}"
            )

    def check_width(self, width: int, module: str) -> None:
        """Check that this spec can quantize a tensor whose input dimension is ``width``.

        Args:
            width: Input features of the module (columns of its (out, in) weight).
            module: Full module name, for the error message.

        Raises:
            ConfigError: If the group size does not divide the width.

        """
        block = BLOCK_TYPES.get(self.format)
        if self.enabled and block is not None and width % block.span:
            raise ConfigError(f"{self.where}.format={self.format!r}: llama.cpp {block.ggml} needs rows that are "
                              f"whole {'super-blocks' if block.span > BLOCK else 'blocks'} of {block.span}; "
                              f"the input width {width} of module {module} is not (leave it in full precision "
                              "with an override, or use a 32-column type)")
        if self.enabled and self.granularity == "group" and self.group_size and width % self.group_size:
            raise ConfigError(
                f"{self.where}.group_size={self.group_size} does not divide the input width {width} "
                f"of module {module}"
            )

    def num_groups(self, width: int) -> int:
        """Number of ranges along the input dimension for a tensor of ``width`` columns."""
        if self.granularity == "group" and self.group_size:
            return width // self.group_size
        return 1
