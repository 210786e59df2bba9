"""The family adapters of ptqlab, as data (module names as in transformers 5.24).

Each decoder layer's linears are grouped by the activation they read, in forward order:

- a group that reads a norm's output folds a per-input-channel scale into that norm (``fold="norm"``);
- ``o_proj`` reads attention's mix of ``v_proj`` rows, and ``down_proj`` reads ``act(gate) * up``, so a
  scale folds into the output rows of ``v_proj`` / ``up_proj`` (``fold="linear"``). With grouped-query
  attention ``v_proj`` is narrower than ``o_proj``'s input: scales must be tied across the query heads
  that share a key/value head;
- nothing absorbs a scale of a group that reads a GELU/ReLU output: an explicit scale op is inserted
  after the activation module that ``prev_op`` names (``fold="scale"``).

Some classes build different layers depending on their config (OPT's post-LayerNorm 350M, Falcon's
four layouts, StableLM's parallel residual); those get one adapter per variant, told apart by
``Adapter.when``. State-space families (Mamba) describe their mixer's linears the same way; they have no
attention and no KV cache (``token_mixer="ssm"``). Mixture-of-experts families (Mixtral, Qwen3-MoE) name
where their fused experts and router are (``Adapter.experts``); each expert's matrices become groups of
their own for the model's expert count (see :mod:`ptqlab.models.experts`).
"""

from __future__ import annotations

from ptqlab.models.adapter import Adapter, FusedExperts, FusedQKV, LinearGroup

_ATTN = "self_attn"


def _llama_like_groups(mlp_norm: str = "post_attention_layernorm") -> tuple[LinearGroup, ...]:
    """Groups of a Llama-style layer: separate q/k/v/o and a gated MLP (gate, up, down)."""
    return (
        LinearGroup("qkv", (f"{_ATTN}.q_proj", f"{_ATTN}.k_proj", f"{_ATTN}.v_proj"), "input_layernorm", "norm"),
        LinearGroup("o", (f"{_ATTN}.o_proj",), f"{_ATTN}.v_proj", "linear"),
        LinearGroup("up_gate", ("mlp.gate_proj", "mlp.up_proj"), mlp_norm, "norm"),
        LinearGroup("down", ("mlp.down_proj",), "mlp.up_proj", "linear"),
    )


def _llama_like(
    family: str,
    cls: str,
    model_type: str,
    norm_kind: str = "rmsnorm",
    mlp_norm: str = "post_attention_layernorm",
    rotation_blocker: str | None = None,
) -> Adapter:
    """Adapter of a Llama-style family whose layers live at ``model.layers``."""
    return Adapter(
        family=family,
        classes=(cls,),
        model_types=(model_type,),
        layers_path="model.layers",
        groups=_llama_like_groups(mlp_norm),
        attention=_ATTN,
        k_proj=f"{_ATTN}.k_proj",
        final_norm="model.norm",
        norm_kind=norm_kind,
        rotation_blocker=rotation_blocker,
    )


LLAMA = _llama_like("llama", "LlamaForCausalLM", "llama")
MISTRAL = _llama_like("mistral", "MistralForCausalLM", "mistral")
QWEN2 = _llama_like("qwen2", "Qwen2ForCausalLM", "qwen2")
QWEN3 = _llama_like("qwen3", "Qwen3ForCausalLM", "qwen3")  # q_norm/k_norm sit after q/k: no effect here
GEMMA = _llama_like("gemma", "GemmaForCausalLM", "gemma", norm_kind="gemma_rmsnorm")
# Gemma2/3: post_attention_layernorm normalises the attention OUTPUT (before the residual add); the MLP
# reads pre_feedforward_layernorm. A rotation of the residual stream would have to pass through those
# output norms, which it cannot (their weights scale the rotated basis).
_SANDWICH = "normalises sublayer outputs before the residual add, so a fused rotation would change its output"
GEMMA2 = _llama_like(
    "gemma2", "Gemma2ForCausalLM", "gemma2", norm_kind="gemma_rmsnorm", mlp_norm="pre_feedforward_layernorm",
    rotation_blocker=_SANDWICH,
)
GEMMA3 = _llama_like(
    "gemma3",
    "Gemma3ForCausalLM",
    "gemma3_text",
    norm_kind="gemma_rmsnorm",
    mlp_norm="pre_feedforward_layernorm",
    rotation_blocker=_SANDWICH,
)

PHI3 = Adapter(
    family="phi3",
    classes=("Phi3ForCausalLM",),
    model_types=("phi3",),
    layers_path="model.layers",
    groups=(
        LinearGroup("qkv", (f"{_ATTN}.qkv_proj",), "input_layernorm", "norm"),
        LinearGroup("o", (f"{_ATTN}.o_proj",), f"{_ATTN}.qkv_proj", "linear", prev_part="v"),
        LinearGroup("up_gate", ("mlp.gate_up_proj",), "post_attention_layernorm", "norm"),
        # gate_up_proj's rows are [gate; up]: down reads up * act(gate), so a scale folds into the up half.
        LinearGroup("down", ("mlp.down_proj",), "mlp.gate_up_proj", "linear", prev_part="up"),
    ),
    attention=_ATTN,
    final_norm="model.norm",
    fused_qkv=FusedQKV(f"{_ATTN}.qkv_proj", interleaved=False, kv_heads_attr="num_key_value_heads"),
)


def _fused_mlp_groups(mlp_norm: str = "post_attention_layernorm") -> tuple[LinearGroup, ...]:
    """Groups of a layer with separate q/k/v/o and a fused ``[gate; up]`` MLP projection (GLM)."""
    return (
        LinearGroup("qkv", (f"{_ATTN}.q_proj", f"{_ATTN}.k_proj", f"{_ATTN}.v_proj"), "input_layernorm", "norm"),
        LinearGroup("o", (f"{_ATTN}.o_proj",), f"{_ATTN}.v_proj", "linear"),
        LinearGroup("up_gate", ("mlp.gate_up_proj",), mlp_norm, "norm"),
        # gate_up_proj's rows are [gate; up] (chunk(2)): down reads up * act(gate), so a scale folds into up.
        LinearGroup("down", ("mlp.down_proj",), "mlp.gate_up_proj", "linear", prev_part="up"),
    )


def _glm(family: str, cls: str, model_type: str, rotation_blocker: str | None = None) -> Adapter:
    """GLM / GLM-4: Llama-style attention (q/k/v biases by default) and a fused ``[gate; up]`` MLP."""
    return Adapter(
        family=family,
        classes=(cls,),
        model_types=(model_type,),
        layers_path="model.layers",
        groups=_fused_mlp_groups(),
        attention=_ATTN,
        k_proj=f"{_ATTN}.k_proj",
        final_norm="model.norm",
        rotation_blocker=rotation_blocker,
        extra={"rope": "partial (rope_parameters.partial_rotary_factor, 0.5 by default), interleaved pairs"},
    )


GLM = _glm("glm", "GlmForCausalLM", "glm")
# GLM-4 adds post_self_attn_layernorm / post_mlp_layernorm on the sublayer outputs (the MLP still reads
# post_attention_layernorm): the same sandwich as Gemma2/3.
GLM4 = _glm("glm4", "Glm4ForCausalLM", "glm4", rotation_blocker=_SANDWICH)


def _stablelm(parallel: bool) -> Adapter:
    """StableLM: LayerNorm, partial RoPE, optional q/k/v biases; sequential or parallel residual."""
    qkv = (f"{_ATTN}.q_proj", f"{_ATTN}.k_proj", f"{_ATTN}.v_proj")
    o = LinearGroup("o", (f"{_ATTN}.o_proj",), f"{_ATTN}.v_proj", "linear")
    down = LinearGroup("down", ("mlp.down_proj",), "mlp.up_proj", "linear")
    if parallel:
        # x + attn(ln(x)) + mlp(ln(x)): attention and MLP read the same input_layernorm output (no second norm).
        groups: tuple[LinearGroup, ...] = (
            LinearGroup("qkv_up_gate", (*qkv, "mlp.gate_proj", "mlp.up_proj"), "input_layernorm", "norm"),
            o,
            down,
        )
    else:
        groups = (
            LinearGroup("qkv", qkv, "input_layernorm", "norm"),
            o,
            LinearGroup("up_gate", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm"),
            down,
        )
    return Adapter(
        family="stablelm",
        classes=("StableLmForCausalLM",),
        model_types=("stablelm",),
        layers_path="model.layers",
        groups=groups,
        attention=_ATTN,
        k_proj=f"{_ATTN}.k_proj",  # with qk_layernorm, pre-RoPE keys are quantized before k_layernorm
        final_norm="model.norm",
        norm_kind="layernorm",
        extra={"variant": "parallel-residual" if parallel else "sequential", "rope": "partial"},
        when=(("use_parallel_residual", (parallel,)),),
    )


STABLELM = _stablelm(parallel=False)
STABLELM_PARALLEL = _stablelm(parallel=True)


def _moe(family: str, cls: str, model_type: str, count_attr: str) -> Adapter:
    """A Llama-style attention layer with a sparse mixture-of-experts MLP: router ``mlp.gate``, experts fused."""
    qkv = (f"{_ATTN}.q_proj", f"{_ATTN}.k_proj", f"{_ATTN}.v_proj")
    return Adapter(
        family=family,
        classes=(cls,),
        model_types=(model_type,),
        layers_path="model.layers",
        groups=(
            LinearGroup("qkv", qkv, "input_layernorm", "norm"),
            LinearGroup("o", (f"{_ATTN}.o_proj",), f"{_ATTN}.v_proj", "linear"),
        ),  # the experts' groups are added for the config's expert count (Adapter.experts)
        attention=_ATTN,
        k_proj=f"{_ATTN}.k_proj",
        final_norm="model.norm",
        experts=FusedExperts(module="mlp.experts", router="mlp.gate", count_attr=count_attr),
        rotation_blocker=(
            "has a router that reads the normalised residual stream outside the linear groups, and the fused "
            "rotation rotates only the groups' linears"
        ),
        scaling_blocker=(
            "feeds post_attention_layernorm's output to the router and to every expert (each reading only its "
            "routed tokens), so a scale folded into that norm would change the routing and be shared by all "
            "experts, which the scaling transforms, folding one group at a time, do not do"
        ),
        extra={"mlp": "sparse mixture of experts; the router stays in full precision"},
    )


MIXTRAL = _moe("mixtral", "MixtralForCausalLM", "mixtral", "num_local_experts")
# Qwen3-MoE can make some layers dense (mlp_only_layers, decoder_sparse_step): an adapter describes one layer
# structure for all layers, so only the all-sparse layout of the released models is served (a dense layer
# is refused when the experts are exposed).
QWEN3_MOE = _moe("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", "num_experts")

_MIXER = "mixer"
_SSM_NOTES = {"state": "recurrent SSM state and conv window, not a KV cache"}

# Mamba: in_proj -> [x; z]; x -> depthwise causal conv1d -> SiLU -> x_proj -> [dt; B; C]; dt_proj's weight
# multiplies dt (the mixer never calls dt_proj); the selective scan's output, gated by SiLU(z), -> out_proj.
MAMBA = Adapter(
    family="mamba",
    classes=("MambaForCausalLM",),
    model_types=("mamba",),
    layers_path="backbone.layers",
    groups=(
        LinearGroup("in", (f"{_MIXER}.in_proj",), "norm", "norm"),
        LinearGroup("x", (f"{_MIXER}.x_proj",)),  # reads SiLU(conv1d(x)): nothing absorbs a scale
        LinearGroup("dt", (f"{_MIXER}.dt_proj",), f"{_MIXER}.x_proj", "linear", prev_part="lead", called=False),
        LinearGroup("out", (f"{_MIXER}.out_proj",)),  # reads scan(x) * SiLU(z): nothing absorbs a scale
    ),
    attention=_MIXER,
    final_norm="backbone.norm_f",
    has_rope=False,
    token_mixer="ssm",
    rotation_blocker=(
        "has linears inside each SSM mixer (x_proj after the depthwise conv1d, dt_proj) that neither read nor "
        "write the residual stream, and the fused rotation handles only linears that do one or the other"
    ),
    scaling_blocker=(
        "has no op before x_proj (it reads SiLU of the depthwise conv1d) or out_proj (it reads the SSM output "
        "gated by SiLU(z)) that can absorb a per-channel scale"
    ),
    extra=_SSM_NOTES,
)

# Mamba-2: in_proj -> [z; xBC; dt]; xBC -> conv1d -> SiLU -> SSD scan; a gated RMSNorm (norm(y * SiLU(z)),
# weight last) feeds out_proj, so a scale of out_proj's input folds into that norm's weight.
MAMBA2 = Adapter(
    family="mamba2",
    classes=("Mamba2ForCausalLM",),
    model_types=("mamba2",),
    layers_path="backbone.layers",
    groups=(
        LinearGroup("in", (f"{_MIXER}.in_proj",), "norm", "norm"),
        LinearGroup("out", (f"{_MIXER}.out_proj",), f"{_MIXER}.norm", "norm"),
    ),
    attention=_MIXER,
    final_norm="backbone.norm_f",
    has_rope=False,
    token_mixer="ssm",
    rotation_blocker=(
        "has a gated RMSNorm inside each mixer before out_proj, and the fused rotation takes every norm a "
        "linear reads for a norm of the residual stream"
    ),
    extra=_SSM_NOTES,
)


def _opt(pre_norm: bool) -> Adapter:
    """OPT: pre-LayerNorm (125M, 1.3B and larger) or post-LayerNorm (350M) layers."""
    attn = "self_attn"
    qkv_linears = (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")
    if pre_norm:
        qkv = LinearGroup("qkv", qkv_linears, "self_attn_layer_norm", "norm")
        fc1 = LinearGroup("fc1", ("fc1",), "final_layer_norm", "norm")
    else:
        # Post-LN: q/k/v read the residual stream (the previous layer's final_layer_norm output, outside
        # this layer); fc1 reads self_attn_layer_norm, applied after the attention residual add.
        qkv = LinearGroup("qkv", qkv_linears, None, "none")
        fc1 = LinearGroup("fc1", ("fc1",), "self_attn_layer_norm", "norm")
    return Adapter(
        family="opt",
        classes=("OPTForCausalLM",),
        model_types=("opt",),
        layers_path="model.decoder.layers",
        groups=(
            qkv,
            LinearGroup("o", (f"{attn}.out_proj",), f"{attn}.v_proj", "linear"),
            fc1,
            # ReLU is positively homogeneous, but like the SmoothQuant/AWQ references we do not fold
            # through it.
            LinearGroup("fc2", ("fc2",), "activation_fn", "scale"),
        ),
        attention=attn,
        k_proj=f"{attn}.k_proj",
        final_norm="model.decoder.final_layer_norm",
        has_rope=False,
        norm_kind="layernorm",
        extra={"variant": "pre-ln" if pre_norm else "post-ln"},
        when=(("do_layer_norm_before", (pre_norm,)),),
    )


OPT = _opt(pre_norm=True)
OPT_POST_LN = _opt(pre_norm=False)

BLOOM = Adapter(
    family="bloom",
    classes=("BloomForCausalLM",),
    model_types=("bloom",),
    layers_path="transformer.h",
    groups=(
        LinearGroup("qkv", ("self_attention.query_key_value",), "input_layernorm", "norm"),
        LinearGroup("o", ("self_attention.dense",), "self_attention.query_key_value", "linear", prev_part="v"),
        LinearGroup("fc1", ("mlp.dense_h_to_4h",), "post_attention_layernorm", "norm"),
        LinearGroup("fc2", ("mlp.dense_4h_to_h",), "mlp.gelu_impl", "scale"),
    ),
    attention="self_attention",
    final_norm="transformer.ln_f",
    fused_qkv=FusedQKV("self_attention.query_key_value", interleaved=True),
    has_rope=False,  # ALiBi
    norm_kind="layernorm",
)

GPT2 = Adapter(
    family="gpt2",
    classes=("GPT2LMHeadModel",),
    model_types=("gpt2",),
    layers_path="transformer.h",
    groups=(
        LinearGroup("qkv", ("attn.c_attn",), "ln_1", "norm"),
        LinearGroup("o", ("attn.c_proj",), "attn.c_attn", "linear", prev_part="v"),
        LinearGroup("fc1", ("mlp.c_fc",), "ln_2", "norm"),
        LinearGroup("fc2", ("mlp.c_proj",), "mlp.act", "scale"),
    ),
    attention="attn",
    final_norm="transformer.ln_f",
    fused_qkv=FusedQKV("attn.c_attn", interleaved=False),
    has_rope=False,  # learned absolute positions
    norm_kind="layernorm",
)

GPT_NEOX = Adapter(
    family="gpt_neox",
    classes=("GPTNeoXForCausalLM",),
    model_types=("gpt_neox",),
    layers_path="gpt_neox.layers",
    groups=(
        LinearGroup("qkv", ("attention.query_key_value",), "input_layernorm", "norm"),
        LinearGroup("o", ("attention.dense",), "attention.query_key_value", "linear", prev_part="v"),
        # With use_parallel_residual (the default, Pythia) the MLP reads post_attention_layernorm(x) of
        # the layer INPUT x, in parallel with attention; without it, of x + attention(x). Either way
        # fc1 reads post_attention_layernorm's output.
        LinearGroup("fc1", ("mlp.dense_h_to_4h",), "post_attention_layernorm", "norm"),
        LinearGroup("fc2", ("mlp.dense_4h_to_h",), "mlp.act", "scale"),
    ),
    attention="attention",
    final_norm="gpt_neox.final_layer_norm",
    fused_qkv=FusedQKV("attention.query_key_value", interleaved=True),
    norm_kind="layernorm",
    extra={"residual": "parallel when config.use_parallel_residual, else sequential"},
)

_FALCON_QKV = "self_attention.query_key_value"
_FALCON_O = LinearGroup("o", ("self_attention.dense",), _FALCON_QKV, "linear", prev_part="v")
_FALCON_FC2 = LinearGroup("fc2", ("mlp.dense_4h_to_h",), "mlp.act", "scale")


def _falcon(
    variant: str,
    groups: tuple[LinearGroup, ...],
    fused: FusedQKV,
    when: tuple[tuple[str, tuple[object, ...]], ...],
    has_rope: bool = True,
) -> Adapter:
    """One of the Falcon layouts (the class is the same, the layer depends on the config)."""
    return Adapter(
        family="falcon",
        classes=("FalconForCausalLM",),
        model_types=("falcon",),
        layers_path="transformer.h",
        groups=groups,
        attention="self_attention",
        final_norm="transformer.ln_f",
        fused_qkv=fused,
        has_rope=has_rope,
        norm_kind="layernorm",
        extra={"variant": variant},
        when=when,
    )


def _falcon_shared_norm_groups(norm: str) -> tuple[LinearGroup, ...]:
    """Parallel attention with one norm: q/k/v and fc1 read the SAME norm output: one group."""
    shared = LinearGroup("qkv_fc1", (_FALCON_QKV, "mlp.dense_h_to_4h"), norm, "norm")
    return (shared, _FALCON_O, _FALCON_FC2)


def _falcon_two_norm_groups(attn_norm: str, mlp_norm: str) -> tuple[LinearGroup, ...]:
    """Attention and MLP read two different norms (parallel with two norms, or sequential)."""
    return (
        LinearGroup("qkv", (_FALCON_QKV,), attn_norm, "norm"),
        _FALCON_O,
        LinearGroup("fc1", ("mlp.dense_h_to_4h",), mlp_norm, "norm"),
        _FALCON_FC2,
    )


# Falcon-7B: parallel attention, one input_layernorm, multi-query ([q heads..., k, v]).
FALCON = _falcon(
    "parallel-multi-query",
    _falcon_shared_norm_groups("input_layernorm"),
    FusedQKV(_FALCON_QKV, interleaved=False, multi_query=True),
    when=(
        ("new_decoder_architecture", (False,)),
        ("parallel_attn", (True,)),
        ("multi_query", (True,)),
        ("alibi", (False,)),
    ),
)
# Falcon-40B/180B: new decoder architecture, ln_attn and ln_mlp (num_ln_in_parallel_attn None means 2);
# fused rows grouped per KV head: [q of the group's heads, k, v].
FALCON_NEW = _falcon(
    "new-architecture-2ln",
    _falcon_two_norm_groups("ln_attn", "ln_mlp"),
    FusedQKV(_FALCON_QKV, interleaved=True, kv_heads_attr="num_kv_heads"),
    when=(
        ("new_decoder_architecture", (True,)),
        ("parallel_attn", (True,)),
        ("num_ln_in_parallel_attn", (2, None)),
        ("alibi", (False,)),
    ),
)
# Falcon2-11B: new decoder architecture with a single input_layernorm shared by attention and MLP.
FALCON_NEW_1LN = _falcon(
    "new-architecture-1ln",
    _falcon_shared_norm_groups("input_layernorm"),
    FusedQKV(_FALCON_QKV, interleaved=True, kv_heads_attr="num_kv_heads"),
    when=(
        ("new_decoder_architecture", (True,)),
        ("parallel_attn", (True,)),
        ("num_ln_in_parallel_attn", (1,)),
        ("alibi", (False,)),
    ),
)
# Falcon-RW: sequential (not parallel) layers, ALiBi, full multi-head ([q_h, k_h, v_h] per head).
FALCON_RW = _falcon(
    "rw-sequential-alibi",
    _falcon_two_norm_groups("input_layernorm", "post_attention_layernorm"),
    FusedQKV(_FALCON_QKV, interleaved=True),
    when=(
        ("new_decoder_architecture", (False,)),
        ("parallel_attn", (False,)),
        ("multi_query", (False,)),
        ("alibi", (True,)),
    ),
    has_rope=False,
)

ADAPTERS: tuple[Adapter, ...] = (
    LLAMA,
    MISTRAL,
    QWEN2,
    QWEN3,
    OPT,
    OPT_POST_LN,
    BLOOM,
    GPT2,
    GPT_NEOX,
    FALCON,
    FALCON_NEW,
    FALCON_NEW_1LN,
    FALCON_RW,
    GEMMA,
    GEMMA2,
    GEMMA3,
    PHI3,
    GLM,
    GLM4,
    STABLELM,
    STABLELM_PARALLEL,
    MAMBA,
    MAMBA2,
    MIXTRAL,
    QWEN3_MOE,
)
