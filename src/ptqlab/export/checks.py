"""Checks every export format shares."""

from __future__ import annotations

from ..errors import ConfigError
from ..pipeline.plan import QuantizationPlan


def refuse_online_rotation(plan: QuantizationPlan, runtime: str) -> None:
    """A rotation that rotates an input online is a forward hook ``runtime`` does not run.

    Raises:
        ConfigError: The recipe has such a rotation.

    """
    for transform in plan.recipe.model_transforms:
        if getattr(getattr(transform, "config", None), "online_down", False):
            raise ConfigError(f"recipe rotation with online_down: true rotates down_proj's input in a forward "
                              f"hook that {runtime} does not run; set online_down: false to export")
