"""The rotation method's options; the matrices are in :mod:`ptqlab.quant.rotation`, the phase in the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..quant.rotation import Rotation, hadamard, random_orthogonal, random_rotation, split_power_of_two

__all__ = ["Rotation", "RotationConfig", "hadamard", "random_orthogonal", "random_rotation", "split_power_of_two"]


@dataclass(frozen=True)
class RotationConfig:
    """Options of the rotation.

    Attributes:
        seed: Seed of the random signs and orthogonal factors.
        online_down: Also rotate the input of ``down_proj`` online (weights rotated to match).
        kv: Quantize cached keys in a per-head Hadamard basis (needs ``scheme.kv_cache``).

    """

    seed: int = 0
    online_down: bool = True
    kv: bool = False

    def __post_init__(self) -> None:
        """Check the options."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"rotation.seed={self.seed!r} must be an integer")
