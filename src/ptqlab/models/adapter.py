"""Family adapters: what a decoder layer of each model family contains, described as data.

An adapter names where the decoder layers live and, for one decoder layer, the linears grouped by the
activation they read. Methods and the pipeline read these descriptions; nothing else in ptqlab knows a
family by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

FoldKind = Literal["norm", "linear", "scale", "none"]
WeightLayout = Literal["linear", "conv1d"]
PrevPart = Literal["v", "up"]
ConfigCondition = tuple[str, tuple[object, ...]]


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same activation.

    Attributes:
        name: Short role of the group: ``qkv``, ``o``, ``up_gate``, ``down`` (or ``fc1``/``fc2``).
        linears: Module names relative to the decoder layer, e.g. ``("self_attn.q_proj", ...)``.
        prev_op: Relative name of the op whose output the group reads, or None.
        fold: How a per-input-channel scale folds into ``prev_op``: ``norm`` (its weight, and bias),
            ``linear`` (the output rows of a linear), ``scale`` (nothing can absorb it, e.g. GELU: an
            explicit scale op is inserted after ``prev_op``), or ``none`` (no transform at this group).
        prev_part: When ``prev_op`` is a fused linear, which of its output rows the group reads:
            ``v`` (the value rows of the fused qkv projection, located with ``Adapter.fused_qkv``) or
            ``up`` (the second half of a fused ``[gate; up]`` projection, Phi-3). None: all its rows.

    """

    name: str
    linears: tuple[str, ...]
    prev_op: str | None = None
    fold: FoldKind = "none"
    prev_part: PrevPart | None = None


@dataclass(frozen=True)
class FusedQKV:
    """Head layout of a fused query/key/value projection.

    The output rows hold ``H`` query heads, ``K`` key heads and ``K`` value heads of ``head_dim`` rows
    each, with ``H = config.num_attention_heads`` and ``K`` given by ``kv_heads_attr``/``multi_query``.

    Attributes:
        module: Relative name of the fused linear.
        interleaved: True when rows are grouped per key/value head as ``[q of the H/K query heads of the
            group, k, v]``: ``[q_h, k_h, v_h]`` per head when K = H (BLOOM, NeoX, Falcon-RW), several
            query heads per group in Falcon's new decoder architecture. False when all queries come
            first, then all keys, then all values (GPT-2, Phi-3, Falcon-7B).
        kv_heads_attr: Config attribute holding K; None when K = H (or 1 under ``multi_query``).
        multi_query: True when one key head and one value head serve all query heads (Falcon-7B).

    """

    module: str
    interleaved: bool
    kv_heads_attr: str | None = None
    multi_query: bool = False


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
        extra: Free-form notes (e.g. ``variant``, ``residual``) for humans and reports.
        when: Config conditions this adapter needs, as ``(attribute, allowed values)`` pairs; used to
            tell apart variants of one class whose layer structure depends on the config (Falcon, OPT).

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
    when: tuple[ConfigCondition, ...] = ()

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
