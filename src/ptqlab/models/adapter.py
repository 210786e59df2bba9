"""Family adapters: what a model family contains, described as data.

An adapter names where the decoder layers, the final norm and each layer's attention module live, the
linears of one decoder layer grouped by the activation they read (for a mixture of experts, where its
fused experts and router are), and what a method may assume of the family (RoPE, the kind of norm,
whether a rotation folds exactly). Methods, the runtime quantizers and
the pipeline read these descriptions; only ``ptqlab.models`` knows a family or a module by its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

FoldKind = Literal["norm", "linear", "scale", "none"]
PrevPart = Literal["v", "up", "lead"]
TokenMixer = Literal["attention", "ssm"]
ConfigCondition = tuple[str, tuple[object, ...]]


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same activation.

    Attributes:
        name: Short role of the group: ``qkv``, ``o``, ``up_gate``, ``down`` (or ``fc1``/``fc2``; ``in``,
            ``x``, ``dt``, ``out`` in a Mamba mixer; ``expert<e>.gate_up``, ``expert<e>.down`` for each
            expert of a mixture of experts).
        linears: Module names relative to the decoder layer, e.g. ``("self_attn.q_proj", ...)``.
        prev_op: Relative name of the op whose output the group reads, or None.
        fold: How a per-input-channel scale folds into ``prev_op``: ``norm`` (its weight, and bias),
            ``linear`` (the output rows of a linear), ``scale`` (nothing can absorb it, e.g. GELU: an
            explicit scale op is inserted after ``prev_op``), or ``none`` (no transform at this group).
        prev_part: When ``prev_op`` is a fused linear, which of its output rows the group reads:
            ``v`` (the value rows of the fused qkv projection, located with ``Adapter.fused_qkv``),
            ``up`` (the second half of a fused ``[gate; up]`` projection, Phi-3, GLM) or ``lead`` (its
            first rows, as many as the group's input width: the time-step rows of Mamba's ``x_proj``
            output ``[dt; B; C]``). None: all its rows.
        called: False when the model never calls the group's linears but multiplies by their weights
            itself (Mamba's ``dt_proj.weight @ dt``). Their input is then observed, and replaced, in the
            rows of ``prev_op``'s output that ``prev_part`` names (see :mod:`ptqlab.models.inputs`).
        routed: True when the group's linears are one expert's of a mixture-of-experts block: they read
            only the tokens the router sends to that expert (possibly none), gathered from all sequences
            of the batch, not every token of each sequence.

    """

    name: str
    linears: tuple[str, ...]
    prev_op: str | None = None
    fold: FoldKind = "none"
    prev_part: PrevPart | None = None
    called: bool = True
    routed: bool = False

    def __post_init__(self) -> None:
        """Check that a group the model does not call says where its input is."""
        if not self.called and self.prev_op is None:
            raise ValueError(f"group {self.name}: linears the model does not call need prev_op (their input)")


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
class FusedExperts:
    """Layout of a mixture-of-experts block whose experts' matrices are stored fused, one 3-D parameter each.

    Expert ``e`` computes ``down[e] @ (act(gate) * up)`` with ``[gate; up] = gate_up[e] @ x`` on the tokens
    the router sends to it, weighted by the router's score (Mixtral, Qwen3-MoE in transformers 5). Each
    expert's two matrices are quantized as linears of their own: :func:`ptqlab.models.experts.expose_experts`
    gives them modules ``<module>.<e>.<gate_up>`` and ``<module>.<e>.<down>`` that view the fused
    parameters, and :func:`ptqlab.models.registry.get_adapter` adds their groups for the model's expert count.

    Attributes:
        module: Relative name of the module holding the fused parameters, e.g. ``mlp.experts``.
        router: Relative name of the router that picks each token's experts (kept in full precision).
        count_attr: Config attribute holding the number of experts.
        gate_up: Name of the fused ``[gate; up]`` parameter, (experts, 2 * ffn, hidden): rows ``[gate; up]``.
        down: Name of the fused down parameter, (experts, hidden, ffn).

    """

    module: str
    router: str
    count_attr: str
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class Adapter:
    """Description of one model family.

    Attributes:
        family: Family name, e.g. ``llama``.
        classes: Model class names (``type(model).__name__``) this adapter serves.
        model_types: ``config.model_type`` values it serves (fallback when the class is unknown).
        layers_path: Dotted path from the causal-LM module to the decoder layer list.
        groups: The linear groups of one decoder layer, in forward order.
        attention: Relative name of a decoder layer's token mixer: its attention module, or the SSM
            mixer of a state-space family.
        k_proj: Relative name of a decoder layer's key projection, or None when keys come out of the
            fused qkv projection (``fused_qkv``).
        final_norm: Dotted path from the causal-LM module to the norm before the LM head, or None.
        fused_qkv: Layout of a fused qkv projection, if the family has one.
        has_rope: Whether attention applies rotary position embeddings.
        norm_kind: ``rmsnorm``, ``layernorm`` or ``gemma_rmsnorm`` (scales by 1 + w).
        rotation_blocker: Why a rotation fused into the weights would change this family's function
            (None: nothing in the family's structure stops it; see :meth:`rotation_refusal`).
        scaling_blocker: Why per-input-channel scaling transforms (SmoothQuant, AWQ) cannot run on this
            family (None: every group they need folds; see :meth:`scaling_refusal`).
        token_mixer: ``attention`` (attention layers with a KV cache) or ``ssm`` (state-space layers,
            Mamba: no attention, no KV cache; see :meth:`attention_refusal`).
        experts: Layout of the layer's fused mixture-of-experts block, or None (a dense MLP). The groups of
            each expert's matrices depend on the config's expert count: ``groups`` lists the others, and the
            adapter :func:`ptqlab.models.registry.get_adapter` returns for a model has them all.
        extra: Free-form notes (e.g. ``variant``, ``residual``) for humans and reports.
        when: Config conditions this adapter needs, as ``(attribute, allowed values)`` pairs; used to
            tell apart variants of one class whose layer structure depends on the config (Falcon, OPT).

    """

    family: str
    classes: tuple[str, ...]
    model_types: tuple[str, ...]
    layers_path: str
    groups: tuple[LinearGroup, ...]
    attention: str = "self_attn"
    k_proj: str | None = None
    final_norm: str | None = None
    fused_qkv: FusedQKV | None = None
    has_rope: bool = True
    norm_kind: str = "rmsnorm"
    rotation_blocker: str | None = None
    scaling_blocker: str | None = None
    token_mixer: TokenMixer = "attention"
    experts: FusedExperts | None = None
    extra: dict[str, str] = field(default_factory=dict)
    when: tuple[ConfigCondition, ...] = ()

    def linear_names(self) -> list[str]:
        """Return every quantizable linear of a decoder layer, in forward order."""
        return [name for group in self.groups for name in group.linears]

    def group_of(self, linear: str) -> LinearGroup:
        """The group that lists ``linear`` (a module name relative to the decoder layer).

        Raises:
            KeyError: No group lists it.

        """
        for group in self.groups:
            if linear in group.linears:
                return group
        raise KeyError(f"{linear} is in no linear group of family {self.family}")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """Return the decoder layers of ``model``."""
        module: nn.Module = model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        if not isinstance(module, nn.ModuleList):
            raise TypeError(f"{self.layers_path} of {type(model).__name__} is not a ModuleList")
        return module

    @property
    def norm_offset(self) -> float:
        """The norms multiply by ``offset + weight``: 1 for Gemma's RMSNorm (``x * (1 + w)``), else 0."""
        return 1.0 if self.norm_kind == "gemma_rmsnorm" else 0.0

    def final_norm_module(self, model: nn.Module) -> nn.Module | None:
        """The norm before the LM head, or None when the family (or this config) has none."""
        if self.final_norm is None:
            return None
        try:
            norm = model.get_submodule(self.final_norm)
        except AttributeError:
            return None
        return norm if isinstance(norm, nn.Module) else None

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The token mixer of every decoder layer (its attention module; the SSM mixer of Mamba)."""
        return [layer.get_submodule(self.attention) for layer in self.layers(model)]

    def rotation_refusal(self) -> str | None:
        """Why a rotation fused into the weights is not exact for this family, or None when it is.

        Rotations fold exactly into pre-norm RMSNorm families: a LayerNorm centres its input (a rotation
        does not commute with that), and a family may normalise elsewhere (``rotation_blocker``).
        """
        if self.rotation_blocker is not None:
            return self.rotation_blocker
        if self.norm_kind not in ("rmsnorm", "gemma_rmsnorm"):
            return (f"uses {self.norm_kind}; rotations fold exactly only into RMSNorm pre-norm families "
                    "(llama, mistral, qwen2, qwen3, gemma, phi3, glm)")
        return None

    def scaling_refusal(self) -> str | None:
        """Why per-channel scaling transforms (SmoothQuant, AWQ) cannot run on this family, or None."""
        return self.scaling_blocker

    def attention_refusal(self) -> str | None:
        """Why this family has no attention and no KV cache to quantize, or None when it has them."""
        if self.token_mixer == "ssm":
            return ("mixes tokens with a state-space model (Mamba): its layers have no attention and no KV cache "
                    "(the recurrent SSM state is not keys and values)")
        return None

    def refinement_refusal(self) -> str | None:
        """Why refiners that train each linear's own weight parameter (ZeroQuant's distillation) cannot run, or None."""
        if self.experts is not None:
            return ("stores each expert's matrices as slices of fused 3-D parameters, and the refiners train a "
                    "weight parameter of each linear's own")
        return None
