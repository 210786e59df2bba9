"""Family adapters: what a decoder layer of each model family contains, described as data.

An adapter names where the decoder layers live and, for one decoder layer, the linears grouped by the
activation they read. Methods and the pipeline read these descriptions; nothing else in ptqlab knows a
family by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

FoldKind = Literal["norm", "linear", "none"]
WeightLayout = Literal["linear", "conv1d"]


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same activation.

    Attributes:
        name: Short role of the group: ``qkv``, ``o``, ``up_gate``, ``down`` (or ``fc1``/``fc2``).
        linears: Module names relative to the decoder layer, e.g. ``("self_attn.q_proj", ...)``.
        prev_op: Relative name of the op whose output the group reads, or None.
        fold: How a per-input-channel scale folds into ``prev_op``: ``norm`` (its weight, and bias),
            ``linear`` (the output rows of a linear), or ``none`` (nothing can absorb it, e.g. GELU).
    """

    name: str
    linears: tuple[str, ...]
    prev_op: str | None = None
    fold: FoldKind = "none"


@dataclass(frozen=True)
class FusedQKV:
    """Head layout of a fused query/key/value projection.

    Attributes:
        module: Relative name of the fused linear.
        interleaved: True when heads are stored as ``[q_h, k_h, v_h]`` per head (BLOOM, NeoX),
            False when all queries come first, then keys, then values (GPT-2, Phi-3, Falcon).
    """

    module: str
    interleaved: bool


@dataclass(frozen=True)
class Adapter:
    """Description of one model family.

    Attributes:
        family: Family name, e.g. ``llama``.
        classes: Model class names (``type(model).__name__``) this adapter serves.
        model_types: ``config.model_type`` values it serves (fallback when the class is unknown).
        layers_path: Dotted path from the causal-LM module to the decoder layer list.
        groups: The linear groups of one decoder layer, in forward order.
        weight_layout: ``linear`` (weight is (out, in)) or ``conv1d`` (GPT-2's (in, out)).
        fused_qkv: Layout of a fused qkv projection, if the family has one.
        has_rope: Whether attention applies rotary position embeddings.
        norm_kind: ``rmsnorm``, ``layernorm`` or ``gemma_rmsnorm`` (scales by 1 + w).
    """

    family: str
    classes: tuple[str, ...]
    model_types: tuple[str, ...]
    layers_path: str
    groups: tuple[LinearGroup, ...]
    weight_layout: WeightLayout = "linear"
    fused_qkv: FusedQKV | None = None
    has_rope: bool = True
    norm_kind: str = "rmsnorm"
    extra: dict[str, str] = field(default_factory=dict)

    def linear_names(self) -> list[str]:
        """Return every quantizable linear of a decoder layer, in forward order."""
        return [name for group in self.groups for name in group.linears]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """Return the decoder layers of ``model``."""
        module: nn.Module = model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        if not isinstance(module, nn.ModuleList):
            raise TypeError(f"{self.layers_path} of {type(model).__name__} is not a ModuleList")
        return module
