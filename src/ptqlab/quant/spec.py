"""QuantSpec: what a quantized tensor looks like (bits, format, granularity, symmetry, zero point)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

Granularity = Literal["tensor", "channel", "group"]
ZeroPoint = Literal["int", "float"]

FULL_PRECISION_BITS = 16
INT_BITS = range(2, 9)
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
FORMATS: tuple[str, ...] = ("int",)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        bits: 2..8, or 16 for full precision (no quantization at all).
        format: Number format; ``int`` (uniform integer grid).
        symmetric: Symmetric signed grid around 0, or asymmetric min-max grid with a zero point.
        granularity: ``tensor`` (one range), ``channel`` (one range per output row) or ``group``
            (one range per ``group_size`` consecutive input columns of each row).
        group_size: Width of a group along the input dimension (granularity ``group`` only).
        zero_point: ``int`` (GPTQ-style integer zero point; the grid contains 0) or ``float``
            (zero point kept in floating point; the grid spans exactly [min, max]).
        clip_ratio: Factor applied to the range before choosing the scale (1.0 = plain min-max).
        where: Name of the config field this spec came from, used in error messages.

    """

    bits: int = FULL_PRECISION_BITS
    format: str = "int"
    symmetric: bool = False
    granularity: Granularity = "channel"
    group_size: int | None = None
    zero_point: ZeroPoint = "int"
    clip_ratio: float = 1.0
    where: str = "scheme.weight"

    def __post_init__(self) -> None:
        """Validate the spec; raise ConfigError naming the offending field."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"{self.where}.bits must be an integer, got {self.bits!r}")
        if self.bits != FULL_PRECISION_BITS and self.bits not in INT_BITS:
            raise ConfigError(f"{self.where}.bits={self.bits} is out of range: use 2..8, or 16 for full precision")
        if self.format not in FORMATS:
            raise ConfigError(f"{self.where}.format={self.format!r} is unknown; supported: {', '.join(FORMATS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"{self.where}.granularity={self.granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}"
            )
        self._check_group_size()
        if self.zero_point not in ("int", "float"):
            raise ConfigError(f"{self.where}.zero_point={self.zero_point!r} must be 'int' or 'float'")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"{self.where}.clip_ratio={self.clip_ratio} must be in (0, 1]")

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
        return self.bits < FULL_PRECISION_BITS

    @property
    def maxq(self) -> int:
        """Largest integer code, ``2**bits - 1``."""
        return int(2**self.bits - 1)

    def check_width(self, width: int, module: str) -> None:
        """Check that this spec can quantize a tensor whose input dimension is ``width``.

        Args:
            width: Input features of the module (columns of its (out, in) weight).
            module: Full module name, for the error message.

        Raises:
            ConfigError: If the group size does not divide the width.

        """
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
