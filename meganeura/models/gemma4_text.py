"""The Gemma-4 text decoder Google published (transformers' `gemma4_text`), op for op.

    x = embed[tok] * sqrt(H)                                  (+ per-layer inputs, PLE)
    per layer i:
      h = rms_norm(x);  q = rope(head_norm(h @ Wq^T));  k = rope(head_norm(h @ Wk^T))
      v = unit_norm(h @ Wv^T)          (full layers with K = V: v = unit_norm(h @ Wk^T))
      (KV-shared layers take k, v of the last earlier layer of their type instead)
      x = x + rms_norm(attn(q, k, v; scale 1, window on sliding layers) @ Wo^T)
      x = x + rms_norm(down(gelu_tanh(h2 @ Wg^T) * (h2 @ Wu^T))),  h2 = rms_norm(x)
        (mixture of experts: x = x + rms_norm(rms_norm(mlp) + rms_norm(experts(x))), below)
      PLE: x = x + rms_norm((gelu_tanh(x @ Wgate^T) * ple_i) @ Wproj^T)
      x = x * layer_scalar
    logits = 30 tanh((rms_norm(x) @ embed^T) / 30)

Sliding layers rotate every frequency of their head_dim (theta 1e4); full layers have
`global_head_dim`-wide heads and "proportional" partial RoPE (theta 1e6, a quarter of
the frequencies, exponents over the full width). Linear weights stay as checkpoints store
them, [out, in]: the graph reads them through `transpose`, in place, and the lm_head is
the embedding itself. Config fields and their defaults follow transformers'
`Gemma4TextConfig`; `from_dict` reads both the released config.json form
(`global_head_dim`, `num_global_key_value_heads`) and transformers >= 5.17's
`per_layer_config`.

With `enable_moe_block` (26B-A4B) each layer keeps its MLP and adds `num_experts` experts
beside it, both reading the residual x after attention:

    route = moe_route((rms_norm(x) * router.scale * H^-0.5) @ Wr^T, per_expert_scale, k)
    e = expert_combine(expert_matmul(glu(expert_matmul(rms_norm_2(x), route, gate_up)),
                                     route, down), route)
    x = x + post_ff(post_ff_1(mlp) + post_ff_2(e))

(softmax over every expert in fp32, the top k renormalized, times the chosen experts'
scale; experts stored [E, 2 I, H] and [E, H, I], read in place.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..compiler.graph import Graph
from ..errors import ConfigError
from . import kv
from .family import Family, Layout, Preset
from .kv import Generation
from .layers import gated_mlp, linear
from .specs import WeightSpec, random_stored_weights

SLIDING, FULL = "sliding_attention", "full_attention"
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    partial: float | None  # "proportional": the share of frequencies that rotate; None: all

    def rotary(self, head_dim: int) -> int:
        """Rotated frequency pairs of a head (the others keep cos 1, sin 0)."""
        if self.partial is None:
            return head_dim // 2
        return int(self.partial * head_dim // 2)


@dataclass(frozen=True)
class Gemma4TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    final_logit_softcapping: float | None = None
    hidden_size_per_layer_input: int = 256
    vocab_size_per_layer_input: int = 262_144
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131_072
    pad_token_id: int | None = 0  # its embedding rows get no gradient (training)
    enable_moe_block: bool = False  # experts beside each layer's MLP (26B-A4B)
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    # per layer, resolved by from_dict: kind, head width, kv heads
    layer_types: tuple[str, ...] = ()
    layer_head_dims: tuple[int, ...] = ()
    layer_kv_heads: tuple[int, ...] = ()
    rope: tuple[tuple[str, RopeSpec], ...] = ()  # (layer type, its RoPE)

    def __post_init__(self):
        validate(self)

    # ---- per layer ----------------------------------------------------------------------

    def is_full(self, i: int) -> bool:
        return self.layer_types[i] == FULL

    @property
    def first_shared(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_kv_consumer(self, i: int) -> bool:
        """The layer reads the K/V of an earlier layer and has no k/v projections."""
        return self.num_kv_shared_layers > 0 and i >= self.first_shared

    def kv_producer(self, i: int) -> int:
        """The last layer before the shared ones with this layer's type (its K/V are reused)."""
        kinds = self.layer_types[:self.first_shared]
        return len(kinds) - 1 - kinds[::-1].index(self.layer_types[i])

    def ffn_width(self, i: int) -> int:
        wide = self.use_double_wide_mlp and self.is_kv_consumer(i)
        return self.intermediate_size * (2 if wide else 1)

    def rope_of(self, i: int) -> tuple[float, int]:
        """(theta, rotated frequency pairs) of layer i."""
        spec = dict(self.rope)[self.layer_types[i]]
        return spec.theta, spec.rotary(self.layer_head_dims[i])

    @property
    def activation(self) -> str:
        return ACTIVATIONS[self.hidden_activation]

    def num_parameters(self) -> int:
        return sum(math.prod(s.shape) for s in weight_specs(self).values())


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field {field_name} {msg}")


def _posint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2 ** 31


def validate(c: Gemma4TextConfig) -> None:
    """Raises ConfigError naming the first field that is out of range or not supported."""
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
              "vocab_size_per_layer_input", "max_position_embeddings"):
        _check(_posint(getattr(c, f)), f,
               f"must be a positive integer below 2^31, got {getattr(c, f)!r}")
    for f in ("hidden_size_per_layer_input", "num_kv_shared_layers"):
        v = getattr(c, f)
        _check(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 31, f,
               f"must be an integer >= 0, got {v!r}")
    _check(_posnum(c.rms_norm_eps), "rms_norm_eps", f"must be a positive number, got {c.rms_norm_eps!r}")
    _check(c.final_logit_softcapping is None or _posnum(c.final_logit_softcapping),
           "final_logit_softcapping", f"must be a positive number or null, got "
           f"{c.final_logit_softcapping!r}")
    for f in ("attention_k_eq_v", "use_double_wide_mlp", "tie_word_embeddings",
              "enable_moe_block"):
        _check(isinstance(getattr(c, f), bool), f, f"must be true or false, got {getattr(c, f)!r}")
    _check(c.hidden_activation in ACTIVATIONS, "hidden_activation",
           f"must be one of {', '.join(ACTIVATIONS)}, got {c.hidden_activation!r}")
    if c.enable_moe_block:
        for f in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            _check(_posint(getattr(c, f)), f, f"must be a positive integer with enable_moe_block, "
                                              f"got {getattr(c, f)!r}")
        _check(c.top_k_experts <= c.num_experts, "top_k_experts",
               f"({c.top_k_experts}) must not exceed num_experts ({c.num_experts})")
        _check(c.num_experts <= 1024, "num_experts",
               f"({c.num_experts}): the expert kernels rank a token's experts in one "
               f"[experts, experts] comparison, at most 1024 experts")
    n = c.num_hidden_layers
    _check(len(c.layer_types) == n and all(t in (SLIDING, FULL) for t in c.layer_types),
           "layer_types", f"must list {n} entries of {SLIDING} or {FULL}")
    _check(len(c.layer_head_dims) == n and all(_posint(h) and h % 2 == 0 for h in c.layer_head_dims),
           "head_dim", "must be even and positive on every layer (head_dim, global_head_dim)")
    for i, kvh in enumerate(c.layer_kv_heads):
        _check(_posint(kvh) and c.num_attention_heads % kvh == 0, "num_key_value_heads",
               f"of layer {i} ({kvh!r}) must divide num_attention_heads ({c.num_attention_heads})")
    _check(len(c.layer_kv_heads) == n, "num_key_value_heads", f"must be given for {n} layers")
    ropes = dict(c.rope)
    for kind in set(c.layer_types):
        _check(isinstance(ropes.get(kind), RopeSpec), "rope_parameters", f"has no entry for {kind}")
    _check(c.num_kv_shared_layers < n, "num_kv_shared_layers",
           f"({c.num_kv_shared_layers}) must leave at least one layer computing its own K/V")
    if c.num_kv_shared_layers:
        kinds = set(c.layer_types[:c.first_shared])
        for i in range(c.first_shared, n):
            _check(c.layer_types[i] in kinds, "num_kv_shared_layers",
                   f": layer {i} ({c.layer_types[i]}) shares K/V, but no earlier layer of its "
                   f"type computes them")


def _posnum(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# ---- reading a transformers config --------------------------------------------------------

_DEFAULTS = {f.name: f.default for f in Gemma4TextConfig.__dataclass_fields__.values()
             if f.name not in ("layer_types", "layer_head_dims", "layer_kv_heads", "rope")}
_DEFAULT_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                 FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                        "rope_theta": 1_000_000.0}}


def from_dict(d: dict) -> Gemma4TextConfig:
    """A text config from transformers' field names (defaults as in Gemma4TextConfig)."""
    if not isinstance(d, dict):
        raise ConfigError(f"text config must be a JSON object, got {type(d).__name__}")
    if d.get("attention_bias"):
        raise ConfigError("config field attention_bias: biased projections are not supported")
    if d.get("use_bidirectional_attention") == "all":
        raise ConfigError("config field use_bidirectional_attention: 'all' (bidirectional text "
                          "attention) is not supported; meganeura runs the causal decoder")
    kw = {k: d.get(k, v) for k, v in _DEFAULTS.items()}
    n = kw["num_hidden_layers"]
    _check(_posint(n), "num_hidden_layers", f"must be a positive integer below 2^31, got {n!r}")
    kinds = d.get("layer_types")
    if kinds is None:  # five sliding layers, then one full
        kinds = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    _check(isinstance(kinds, list) and len(kinds) == n, "layer_types",
           f"must be a list of {n} layer types, got {kinds!r}"[:200])
    kinds = list(kinds)
    if kinds and kinds[-1] == SLIDING:
        kinds[-1] = FULL  # as transformers does: the last layer always attends globally
    head_dims, kv_heads = _per_layer(d, kinds, kw)
    return Gemma4TextConfig(**kw, layer_types=tuple(kinds), layer_head_dims=head_dims,
                            layer_kv_heads=kv_heads, rope=_rope(d, kinds))


def _per_layer(d: dict, kinds: list, kw: dict) -> tuple[tuple, tuple]:
    """Head width and kv heads of every layer: transformers >= 5.17 writes them as
    per_layer_config overrides; released configs give global_head_dim (default 512) and
    num_global_key_value_heads (applied, as transformers does, only with attention_k_eq_v)."""
    hd, kvh = kw["head_dim"], kw["num_key_value_heads"]
    heads = [hd] * len(kinds)
    kvs = [kvh] * len(kinds)
    overrides = d.get("per_layer_config")
    if overrides is not None:
        _check(isinstance(overrides, dict), "per_layer_config", "must be an object of layer overrides")
        for key, o in overrides.items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"config field per_layer_config: key {key!r} is not a layer "
                                  f"index") from None
            _check(0 <= i < len(kinds) and isinstance(o, dict), "per_layer_config",
                   f"entry {key!r} must name a layer and hold an object")
            unknown = set(o) - {"head_dim", "num_key_value_heads"}
            _check(not unknown, "per_layer_config",
                   f"of layer {i} overrides {sorted(unknown)}, which is not supported")
            heads[i] = o.get("head_dim", heads[i])
            kvs[i] = o.get("num_key_value_heads", kvs[i])
        return tuple(heads), tuple(kvs)
    global_hd = d.get("global_head_dim", 512)
    global_kv = d.get("num_global_key_value_heads")
    for i, kind in enumerate(kinds):
        if kind == FULL:
            heads[i] = global_hd
            if global_kv is not None and kw["attention_k_eq_v"]:
                kvs[i] = global_kv
    return tuple(heads), tuple(kvs)


def _rope(d: dict, kinds: list) -> tuple:
    params = d.get("rope_parameters") or _DEFAULT_ROPE
    _check(isinstance(params, dict), "rope_parameters", "must be an object by layer type")
    out = {}
    for kind in sorted(set(kinds)):
        p = params.get(kind)
        _check(isinstance(p, dict), "rope_parameters", f"has no object for {kind}")
        rope_type = p.get("rope_type", "default")
        theta = p.get("rope_theta", 10_000.0)
        _check(_posnum(theta), "rope_parameters", f"{kind}.rope_theta must be positive, got {theta!r}")
        if rope_type == "default":
            out[kind] = RopeSpec(float(theta), None)
        elif rope_type == "proportional":
            factor = p.get("factor", 1.0)
            _check(factor == 1.0, "rope_parameters", f"{kind}.factor {factor!r} is not supported yet")
            partial = p.get("partial_rotary_factor", 1.0)
            _check(_posnum(partial) and partial <= 1, "rope_parameters",
                   f"{kind}.partial_rotary_factor must be in (0, 1], got {partial!r}")
            out[kind] = RopeSpec(float(theta), float(partial))
        else:
            raise ConfigError(f"config field rope_parameters: {kind}.rope_type {rope_type!r} is "
                              f"not supported (default, proportional)")
    return tuple(out.items())


# The released sizes, as transformers' Gemma4TextConfig fields (from its conversion script);
# random weights unless a checkpoint is loaded.
PRESET_FIELDS: dict[str, dict] = {
    "gemma4_e2b": dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                       num_attention_heads=8, num_key_value_heads=1,
                       layer_types=([SLIDING] * 4 + [FULL]) * 7, num_kv_shared_layers=20,
                       use_double_wide_mlp=True, final_logit_softcapping=30.0),
    "gemma4_e4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
                       num_attention_heads=8, num_key_value_heads=2,
                       layer_types=([SLIDING] * 5 + [FULL]) * 7, num_kv_shared_layers=18,
                       final_logit_softcapping=30.0),
    "gemma4_31b": dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=60,
                       num_attention_heads=32, num_key_value_heads=16,
                       num_global_key_value_heads=4, attention_k_eq_v=True,
                       hidden_size_per_layer_input=0, layer_types=([SLIDING] * 5 + [FULL]) * 10,
                       sliding_window=1024, max_position_embeddings=262_144,
                       final_logit_softcapping=30.0),
    # 128 experts of 704 beside a 2112-wide MLP: 25.2e9 parameters, 3.8e9 read a token
    "gemma4_26b_a4b": dict(hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                           num_attention_heads=16, num_key_value_heads=8,
                           num_global_key_value_heads=2, attention_k_eq_v=True,
                           hidden_size_per_layer_input=0,
                           layer_types=([SLIDING] * 5 + [FULL]) * 5, sliding_window=1024,
                           max_position_embeddings=262_144, final_logit_softcapping=30.0,
                           enable_moe_block=True, num_experts=128, top_k_experts=8,
                           moe_intermediate_size=704),
}
PRESETS: dict[str, Gemma4TextConfig] = {k: from_dict(v) for k, v in PRESET_FIELDS.items()}


def preset_fields(key: str, layers: int | None = None) -> dict:
    """A preset's transformers fields, optionally cut to its first `layers` layers (their
    types kept; KV sharing, where the preset has it, kept to the same share of the layers):
    a model of the same widths that fits where the whole one does not (an fp32 check)."""
    fields = dict(PRESET_FIELDS[key])
    n = fields["num_hidden_layers"]
    if layers is None or layers == n:
        return fields
    if not 0 < layers <= n:
        raise ConfigError(f"layers must be in [1, {n}] for {key}, got {layers}")
    fields["num_hidden_layers"] = layers
    fields["layer_types"] = list(fields["layer_types"][:layers])
    if fields.get("num_kv_shared_layers"):
        fields["num_kv_shared_layers"] = fields["num_kv_shared_layers"] * layers // n
    return fields


# ---- the graph ------------------------------------------------------------------------------


def build_graph(g: Graph, c: Gemma4TextConfig, seq_len: int,
                generation: Generation | None = None) -> int:
    """Builds the decoder into `g` and returns the logits node: [seq_len, vocab_size] (a
    prefill or decode step for generation: [1, vocab_size], see models/kv.py)."""
    kv.check(seq_len, generation)
    hidden, eps = c.hidden_size, c.rms_norm_eps
    ids = g.input_u32("token_ids", (seq_len,))
    pos = kv.positions(g, seq_len, generation)
    embed = g.parameter("model.embed_tokens.weight", (c.vocab_size, hidden))
    x = g.scale(g.embedding(ids, embed), math.sqrt(hidden))  # x: [S, hidden]
    ple = _per_layer_inputs(g, c, ids, x) if c.hidden_size_per_layer_input else None
    shared: dict[str, kv.KV] = {}  # layer type -> K/V of its producer
    writes: list[int] = []
    for i in range(c.num_hidden_layers):
        p = c.hidden_size_per_layer_input
        ple_i = g.slice_cols(ple, i * p, p) if ple is not None else None  # a view, outside the layer
        with g.block(f"layer.{i}"):
            x = _layer(g, c, i, x, ple_i, pos, generation, shared, writes)
    x = kv.last_row(g, g.rms_norm(x, g.parameter("model.norm.weight", (hidden,)), eps), seq_len,
                    generation)
    head = embed if c.tie_word_embeddings else g.parameter("lm_head.weight", (c.vocab_size, hidden))
    logits = g.matmul(x, g.transpose(head))  # logits: [S, vocab], the embedding read in place
    if c.final_logit_softcapping is not None:
        logits = g.softcap(logits, c.final_logit_softcapping)
    g.set_outputs([logits], writes)
    return logits


def _per_layer_inputs(g: Graph, c: Gemma4TextConfig, ids: int, x: int) -> int:
    """(RMSNorm_P(x @ Wpm^T * H^-0.5) + E_ple[tok] * sqrt(P)) * 2^-0.5: [S, layers * P]."""
    p, n, eps = c.hidden_size_per_layer_input, c.num_hidden_layers, c.rms_norm_eps
    table = g.parameter("model.embed_tokens_per_layer.weight", (c.vocab_size_per_layer_input, n * p))
    tok = g.scale(g.embedding(ids, table), math.sqrt(p))
    proj = g.scale(linear(g, x, "model.per_layer_model_projection.weight", n * p, c.hidden_size),
                   c.hidden_size ** -0.5)
    proj = g.head_rms_norm(proj, g.parameter("model.per_layer_projection_norm.weight", (p,)), eps, p)
    return g.scale(g.add(proj, tok), 2.0 ** -0.5)


def _layer(g: Graph, c: Gemma4TextConfig, i: int, x: int, ple_i: int | None,
           positions: tuple[int, int], generation: Generation | None, shared: dict,
           writes: list[int]) -> int:
    pre, eps, hidden = f"model.layers.{i}", c.rms_norm_eps, c.hidden_size
    hd, kvh, heads = c.layer_head_dims[i], c.layer_kv_heads[i], c.num_attention_heads
    theta, rotary = c.rope_of(i)
    pos, limit = positions
    window = None if c.is_full(i) else c.sliding_window

    def norm(t: int, name: str) -> int:
        return g.rms_norm(t, g.parameter(f"{pre}.{name}.weight", (hidden,)), eps)

    h = norm(x, "input_layernorm")
    q = linear(g, h, f"{pre}.self_attn.q_proj.weight", heads * hd, hidden)
    q = g.head_rms_norm(q, g.parameter(f"{pre}.self_attn.q_norm.weight", (hd,)), eps, hd)
    q = g.rope(q, pos, theta, hd, rotary, limit)
    if c.is_kv_consumer(i):
        cache = shared[c.layer_types[i]]
    else:
        k_raw = linear(g, h, f"{pre}.self_attn.k_proj.weight", kvh * hd, hidden)
        if c.attention_k_eq_v and c.is_full(i):
            v_raw = k_raw  # V is K's projection
        else:
            v_raw = linear(g, h, f"{pre}.self_attn.v_proj.weight", kvh * hd, hidden)
        k = g.head_rms_norm(k_raw, g.parameter(f"{pre}.self_attn.k_norm.weight", (hd,)), eps, hd)
        k = g.rope(k, pos, theta, hd, rotary, limit)
        v = g.unit_rms_norm(v_raw, eps, hd)
        cache = kv.store(g, i, k, v, pos, kv.slots(window, generation), generation)
        writes += cache.writes
        if c.num_kv_shared_layers and i == c.kv_producer(i):
            shared[c.layer_types[i]] = cache
    a = kv.attend(g, q, cache, pos, heads, kvh, hd, window, 1.0, generation)  # a: [S, heads*hd]
    x = g.add(x, norm(linear(g, a, f"{pre}.self_attn.o_proj.weight", hidden, heads * hd),
                      "post_attention_layernorm"))
    h = norm(x, "pre_feedforward_layernorm")
    m = gated_mlp(g, h, f"{pre}.mlp", hidden, c.ffn_width(i), c.activation)
    if c.enable_moe_block:
        m = g.add(norm(m, "post_feedforward_layernorm_1"),
                  norm(_experts(g, c, pre, x), "post_feedforward_layernorm_2"))
    x = g.add(x, norm(m, "post_feedforward_layernorm"))
    if ple_i is not None:
        p = c.hidden_size_per_layer_input
        gated = g.glu(linear(g, x, f"{pre}.per_layer_input_gate.weight", p, hidden), ple_i,
                      c.activation)
        x = g.add(x, norm(linear(g, gated, f"{pre}.per_layer_projection.weight", hidden, p),
                          "post_per_layer_input_norm"))
    return g.scale_by(x, g.parameter(f"{pre}.layer_scalar", (1,)))  # x: [S, hidden]


def _experts(g: Graph, c: Gemma4TextConfig, pre: str, x: int) -> int:
    """The experts' half of a layer's feed-forward, on the residual x: [S, hidden]."""
    hidden, eps, e, width = c.hidden_size, c.rms_norm_eps, c.num_experts, c.moe_intermediate_size
    r = g.scale(g.rms_norm(x, g.parameter(f"{pre}.router.scale", (hidden,)), eps), hidden ** -0.5)
    logits = linear(g, r, f"{pre}.router.proj.weight", e, hidden)
    route = g.moe_route(logits, g.parameter(f"{pre}.router.per_expert_scale", (e,)),
                        c.top_k_experts)
    h = g.rms_norm(x, g.parameter(f"{pre}.pre_feedforward_layernorm_2.weight", (hidden,)), eps)
    gate_up = g.expert_matmul(h, route, g.parameter(f"{pre}.experts.gate_up_proj",
                                                    (e, 2 * width, hidden)))
    act = g.glu(g.slice_cols(gate_up, 0, width), g.slice_cols(gate_up, width, width),
                c.activation)
    y = g.expert_matmul(act, route, g.parameter(f"{pre}.experts.down_proj", (e, hidden, width)))
    return g.expert_combine(y, route)


def build(c: Gemma4TextConfig, seq_len: int, generation: Generation | None = None) -> Graph:
    g = Graph()
    build_graph(g, c, seq_len, generation)
    return g


def weight_specs(c: Gemma4TextConfig) -> dict[str, WeightSpec]:
    """Every parameter as the checkpoint stores it (linear weights [out, in], which the graph
    reads transposed, in place), in graph order."""
    h, p, n = c.hidden_size, c.hidden_size_per_layer_input, c.num_hidden_layers
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h)}
    if p:
        shapes |= {"model.embed_tokens_per_layer.weight": (c.vocab_size_per_layer_input, n * p),
                   "model.per_layer_model_projection.weight": (n * p, h),
                   "model.per_layer_projection_norm.weight": (p,)}
    for i in range(n):
        shapes |= _layer_shapes(c, i)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    # layer scalars are buffers in transformers: not trained
    return {name: WeightSpec(shape, False, not name.endswith(".layer_scalar"))
            for name, shape in shapes.items()}


def _layer_shapes(c: Gemma4TextConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Layer i's parameters in the order _layer makes them."""
    pre, h, hd = f"model.layers.{i}", c.hidden_size, c.layer_head_dims[i]
    q, kv_width, ffn = c.num_attention_heads * hd, c.layer_kv_heads[i] * hd, c.ffn_width(i)
    s = {f"{pre}.input_layernorm.weight": (h,), f"{pre}.self_attn.q_proj.weight": (q, h),
         f"{pre}.self_attn.q_norm.weight": (hd,)}
    if not c.is_kv_consumer(i):
        s[f"{pre}.self_attn.k_proj.weight"] = (kv_width, h)
        if not (c.attention_k_eq_v and c.is_full(i)):
            s[f"{pre}.self_attn.v_proj.weight"] = (kv_width, h)
        s[f"{pre}.self_attn.k_norm.weight"] = (hd,)
    s |= {f"{pre}.self_attn.o_proj.weight": (h, q), f"{pre}.post_attention_layernorm.weight": (h,),
          f"{pre}.pre_feedforward_layernorm.weight": (h,), f"{pre}.mlp.gate_proj.weight": (ffn, h),
          f"{pre}.mlp.up_proj.weight": (ffn, h), f"{pre}.mlp.down_proj.weight": (h, ffn)}
    if c.enable_moe_block:
        e, w = c.num_experts, c.moe_intermediate_size
        s |= {f"{pre}.post_feedforward_layernorm_1.weight": (h,), f"{pre}.router.scale": (h,),
              f"{pre}.router.proj.weight": (e, h), f"{pre}.router.per_expert_scale": (e,),
              f"{pre}.pre_feedforward_layernorm_2.weight": (h,),
              f"{pre}.experts.gate_up_proj": (e, 2 * w, h),
              f"{pre}.experts.down_proj": (e, h, w),
              f"{pre}.post_feedforward_layernorm_2.weight": (h,)}
    s[f"{pre}.post_feedforward_layernorm.weight"] = (h,)
    if c.hidden_size_per_layer_input:
        p = c.hidden_size_per_layer_input
        s |= {f"{pre}.per_layer_input_gate.weight": (p, h),
              f"{pre}.per_layer_projection.weight": (h, p),
              f"{pre}.post_per_layer_input_norm.weight": (h,)}
    s[f"{pre}.layer_scalar"] = (1,)
    return s


def random_weights(c: Gemma4TextConfig, seed: int = 0, dtype=torch.float32,
                   device="cpu") -> dict[str, torch.Tensor]:
    """Deterministic random weights, stored layout: the same seed and device give the same values.

    Linear [out, in] ~ N(0, 1/in); embeddings ~ N(0, 1/width) (they are scaled by
    sqrt(width) on the way in); norm weights and layer scalars ~ 1 + N(0, 0.1^2), except
    q_norm and k_norm, scaled by hd^-1/4 (see `qk_norm_scale`); so activations stay O(1)
    through any depth and the logits are not all capped.
    """
    return random_stored_weights(weight_specs(c), seed, dtype, device, qk_norm_scale)


def qk_norm_scale(name: str, head_dim: int) -> float:
    """The scale random q_norm / k_norm weights need: attention here has scale 1.0 on
    normalized q and k, so with weights near one the scores have a standard deviation of
    sqrt(head_dim) (16 at 256) and the softmax picks one key by a hair's breadth, a network
    whose logits change wholesale with the last bit of rounding. hd^-1/4 on each makes the
    scores O(1), as trained weights keep them."""
    return head_dim ** -0.25 if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0


# ---- the family -----------------------------------------------------------------------------


def summary(c: Gemma4TextConfig) -> str:
    n = c.num_hidden_layers
    full = [i for i in range(n) if c.is_full(i)]
    shared = sum(c.is_kv_consumer(i) for i in range(n))
    heads = f"{c.num_attention_heads}/{c.num_key_value_heads} x {c.head_dim}"
    if full:
        heads += f" (full: {c.num_attention_heads}/{c.layer_kv_heads[full[0]]} x " \
                 f"{c.layer_head_dims[full[0]]})"
    return (f"published Gemma-4, {n} layers ({len(full)} full, {n - len(full)} sliding-window "
            f"{c.sliding_window}), hidden {c.hidden_size}, heads {heads}, ffn "
            f"{c.intermediate_size}, vocab {c.vocab_size}, per-layer inputs "
            f"{c.hidden_size_per_layer_input or 'none'}, {shared} layers sharing K/V"
            f"{', K = V on full layers' if c.attention_k_eq_v else ''}"
            f"{_moe_summary(c)}, logit soft-cap "
            f"{c.final_logit_softcapping}")


def _moe_summary(c: Gemma4TextConfig) -> str:
    if not c.enable_moe_block:
        return ""
    return (f", {c.num_experts} experts of {c.moe_intermediate_size} (top {c.top_k_experts}) "
            f"beside each MLP")


def _text_layout(d: dict, source: str) -> Layout:
    """Gemma4ForCausalLM: the decoder's weights under `model.`."""
    return Layout(from_dict(d), "gemma4_text", None, ("Gemma-4 text decoder (gemma4_text)",))


def _multimodal_layout(d: dict, source: str) -> Layout:
    """Gemma4ForConditionalGeneration: `text_config` nested, the text weights under
    `model.language_model.`; the vision and audio towers are not loaded."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"config {source}: model_type gemma4 needs a text_config object")
    # the multimodal model ties its lm_head by its own (top-level) flag, as transformers does
    text = {**text, "tie_word_embeddings": d.get("tie_word_embeddings", True)}
    towers = [t for t in ("vision", "audio") if d.get(f"{t}_config")]
    note = "Gemma-4 multimodal checkpoint (gemma4): its text decoder is loaded" + (
        f"; the {' and '.join(towers)} tower{'s' * (len(towers) > 1)} "
        f"{'are' if len(towers) > 1 else 'is'} skipped" if towers else "")
    return Layout(from_dict(text), "gemma4", _nested, (note,))


def _nested(name: str) -> str:
    return "model.language_model." + name[len("model."):] if name.startswith("model.") else name


def to_dict(c: Gemma4TextConfig) -> dict:
    """A preset's config.json (its transformers fields); other configs come from checkpoints,
    whose config.json save_pretrained copies."""
    for key, preset in PRESETS.items():
        if preset == c:
            return {"model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"],
                    **PRESET_FIELDS[key]}
    raise ConfigError("a published Gemma-4 config is written back only as one of the presets "
                      f"({', '.join(PRESETS)}) or as the checkpoint it was read from")


FAMILY = Family(
    name="published Gemma-4", config=Gemma4TextConfig, from_dict=from_dict,
    layouts={"gemma4_text": _text_layout, "gemma4": _multimodal_layout},
    presets=tuple(Preset(key.replace("_", "-"), key, c) for key, c in PRESETS.items()),
    build=build, weight_specs=weight_specs, random_weights=random_weights, summary=summary,
    to_dict=to_dict)
