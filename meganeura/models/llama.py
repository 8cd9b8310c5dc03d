"""Llama (transformers' `llama`, LlamaForCausalLM: Llama-3.x), op for op; Qwen3 builds on it.

    x = embed[tok]
    per layer i:
      h = rms_norm(x);  q = rope(h @ Wq^T);  k = rope(h @ Wk^T);  v = h @ Wv^T
          (Qwen3: q and k RMS-normalized per head, one weight of head_dim, before RoPE)
      x = x + attn(q, k, v; causal, GQA, scale head_dim^-0.5) @ Wo^T
      x = x + down(silu(h2 @ Wg^T) * (h2 @ Wu^T)),  h2 = rms_norm(x)
    logits = rms_norm(x) @ Wlm^T       (tied: Wlm is the embedding)

RMSNorm `x * rsqrt(mean(x^2) + eps) * w` in fp32, weight as stored. RoPE is half-split over
the whole head, theta `rope_theta`, with llama3's frequency scaling where the config asks for
it. Linear weights stay as checkpoints store them, [out, in]: the graph reads them through
`transpose`, in place. Config fields and their defaults follow transformers' LlamaConfig;
`from_dict` reads both transformers 5's `rope_parameters` and the released config.json form
(`rope_theta`, `rope_scaling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..compiler.formulas import NO_SCALING
from ..compiler.graph import Graph
from ..errors import ConfigError
from . import kv
from .family import Family, Preset, plain_layout
from .kv import Generation
from .layers import gated_mlp, linear
from .specs import WeightSpec, random_stored_weights


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    # llama3's (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings);
    # a factor of 1 scales nothing
    rope_scaling: tuple[float, float, float, int] = NO_SCALING
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048  # positions generation may reach
    pad_token_id: int | None = None  # its embedding row gets no gradient (training)

    qk_norm: ClassVar[bool] = False  # Qwen3: per-head RMSNorm of q and k before RoPE

    def __post_init__(self):
        validate(self)

    @property
    def rope_attrs(self) -> dict:
        """g.rope's llama3 attributes (none without scaling: the rope's defaults)."""
        factor, low, high, original = self.rope_scaling
        if factor == 1.0:
            return {}
        return dict(scale_factor=float(factor), low_freq_factor=float(low),
                    high_freq_factor=float(high), original_limit=int(original))

    def num_parameters(self) -> int:
        return sum(math.prod(s.shape) for s in weight_specs(self).values())


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field {field_name} {msg}")


def _posint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2 ** 31


def _posnum(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def validate(c: LlamaConfig) -> None:
    """Raises ConfigError naming the first field that is out of range."""
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
        _check(_posint(getattr(c, f)), f,
               f"must be a positive integer below 2^31, got {getattr(c, f)!r}")
    _check(c.num_attention_heads % c.num_key_value_heads == 0, "num_key_value_heads",
           f"({c.num_key_value_heads}) must divide num_attention_heads ({c.num_attention_heads})")
    _check(c.head_dim % 2 == 0, "head_dim", f"must be even for half-split RoPE, got {c.head_dim}")
    for f in ("rms_norm_eps", "rope_theta"):
        _check(_posnum(getattr(c, f)), f, f"must be a positive number, got {getattr(c, f)!r}")
    _check(isinstance(c.tie_word_embeddings, bool), "tie_word_embeddings",
           f"must be true or false, got {c.tie_word_embeddings!r}")
    s = c.rope_scaling
    _check(isinstance(s, tuple) and len(s) == 4 and all(_posnum(v) for v in s), "rope_parameters",
           f"(llama3 scaling) must be positive numbers (factor, low_freq_factor, high_freq_factor, "
           f"original_max_position_embeddings), got {s!r}")
    _check(s[0] == 1.0 or (s[1] < s[2] and _posint(s[3])), "rope_parameters",
           f"(llama3) needs low_freq_factor < high_freq_factor and an integer "
           f"original_max_position_embeddings, got {s[1]!r}, {s[2]!r}, {s[3]!r}")


# ---- reading a transformers config --------------------------------------------------------

# transformers' LlamaConfig defaults (head_dim None: hidden_size / num_attention_heads)
DEFAULTS = dict(vocab_size=32_000, hidden_size=4096, intermediate_size=11_008,
                num_hidden_layers=32, num_attention_heads=32, head_dim=None, rms_norm_eps=1e-6,
                tie_word_embeddings=False, max_position_embeddings=2048, pad_token_id=None)
REFUSED = {"attention_bias": "biased attention projections are not supported",
           "mlp_bias": "biased MLP projections are not supported"}


def from_dict(d: dict) -> LlamaConfig:
    """A Llama config from transformers' field names (defaults as in its LlamaConfig)."""
    return read_fields(d, LlamaConfig, DEFAULTS, REFUSED)


def read_fields(d: dict, config_type: type, defaults: dict, refused: dict) -> LlamaConfig:
    """The decoder's config from transformers' fields: `defaults` for those absent or null;
    a `refused` field set true raises ConfigError naming it."""
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
    for f, why in refused.items():
        _check(not d.get(f), f, f"is {d.get(f)!r}: {why}")
    act = d.get("hidden_act", "silu")
    _check(act == "silu", "hidden_act", f"must be silu (a SwiGLU MLP), got {act!r}")
    kw = {k: v if d.get(k) is None else d[k] for k, v in defaults.items()}
    heads = kw["num_attention_heads"]
    kw["num_key_value_heads"] = heads if d.get("num_key_value_heads") is None \
        else d["num_key_value_heads"]
    if kw["head_dim"] is None:  # hidden_size / num_attention_heads, which must be integers first
        for f in ("hidden_size", "num_attention_heads"):
            _check(_posint(kw[f]), f, f"must be a positive integer below 2^31, got {kw[f]!r}")
        _check(kw["hidden_size"] % heads == 0, "head_dim", f"is required: hidden_size "
               f"{kw['hidden_size']} is not divisible by num_attention_heads {heads}")
        kw["head_dim"] = kw["hidden_size"] // heads
    theta, scaling = _rope(d, kw["max_position_embeddings"])
    return config_type(**kw, rope_theta=theta, rope_scaling=scaling)


def _rope(d: dict, max_positions) -> tuple[float, tuple]:
    """(theta, llama3 scaling) from `rope_scaling` (the released form) or `rope_parameters`
    (transformers 5), the theta inside the object first, then the top-level `rope_theta`."""
    where = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    p = d.get(where) or {}
    _check(isinstance(p, dict), where, f"must be an object or null, got {p!r}"[:200])
    theta = p.get("rope_theta", d.get("rope_theta", 10_000.0))
    _check(_posnum(theta), f"{where} rope_theta" if "rope_theta" in p else "rope_theta",
           f"must be a positive number, got {theta!r}")
    partial = p.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    _check(partial == 1.0, "partial_rotary_factor", f"{partial!r}: partial RoPE is not supported")
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return float(theta), NO_SCALING
    _check(kind == "llama3", where, f"has rope_type {kind!r}, which is not supported (default, "
           f"llama3)")
    values = [p.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor")]
    original = p.get("original_max_position_embeddings", max_positions)
    for k, v in zip(("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"), values + [original]):
        _check(_posnum(v), where, f"{k} must be a positive number, got {v!r}")
    return float(theta), (*(float(v) for v in values), original)


# ---- the graph ------------------------------------------------------------------------------


def build_graph(g: Graph, c: LlamaConfig, seq_len: int,
                generation: Generation | None = None) -> int:
    """Builds the decoder into `g` and returns the logits node: [seq_len, vocab_size] (a
    prefill or decode step for generation: [1, vocab_size], see models/kv.py)."""
    kv.check(seq_len, generation)
    hidden = c.hidden_size
    ids = g.input_u32("token_ids", (seq_len,))
    pos = kv.positions(g, seq_len, generation)
    embed = g.parameter("model.embed_tokens.weight", (c.vocab_size, hidden))
    x = g.embedding(ids, embed)  # x: [S, hidden]
    writes: list[int] = []
    for i in range(c.num_hidden_layers):
        with g.block(f"layer.{i}"):
            x = _layer(g, c, i, x, pos, generation, writes)
    x = g.rms_norm(x, g.parameter("model.norm.weight", (hidden,)), c.rms_norm_eps)
    x = kv.last_row(g, x, seq_len, generation)
    head = embed if c.tie_word_embeddings else g.parameter("lm_head.weight", (c.vocab_size, hidden))
    logits = g.matmul(x, g.transpose(head))  # logits: [S, vocab], a tied embedding read in place
    g.set_outputs([logits], writes)
    return logits


def _layer(g: Graph, c: LlamaConfig, i: int, x: int, positions: tuple[int, int],
           generation: Generation | None, writes: list[int]) -> int:
    pre, hidden, hd, eps = f"model.layers.{i}", c.hidden_size, c.head_dim, c.rms_norm_eps
    heads, kvh = c.num_attention_heads, c.num_key_value_heads
    pos, limit = positions
    h = g.rms_norm(x, g.parameter(f"{pre}.input_layernorm.weight", (hidden,)), eps)
    q = linear(g, h, f"{pre}.self_attn.q_proj.weight", heads * hd, hidden)  # q: [S, heads*hd]
    k = linear(g, h, f"{pre}.self_attn.k_proj.weight", kvh * hd, hidden)  # k, v: [S, kvh*hd]
    v = linear(g, h, f"{pre}.self_attn.v_proj.weight", kvh * hd, hidden)
    if c.qk_norm:  # each head normalized over its head_dim, one weight shared by the heads
        q = g.head_rms_norm(q, g.parameter(f"{pre}.self_attn.q_norm.weight", (hd,)), eps, hd)
        k = g.head_rms_norm(k, g.parameter(f"{pre}.self_attn.k_norm.weight", (hd,)), eps, hd)
    q = g.rope(q, pos, c.rope_theta, hd, limit=limit, **c.rope_attrs)
    k = g.rope(k, pos, c.rope_theta, hd, limit=limit, **c.rope_attrs)
    cache = kv.store(g, i, k, v, pos, kv.slots(None, generation), generation)
    writes += cache.writes
    a = kv.attend(g, q, cache, pos, heads, kvh, hd, None, hd ** -0.5, generation)
    x = g.add(x, linear(g, a, f"{pre}.self_attn.o_proj.weight", hidden, heads * hd))
    h = g.rms_norm(x, g.parameter(f"{pre}.post_attention_layernorm.weight", (hidden,)), eps)
    return g.add(x, gated_mlp(g, h, f"{pre}.mlp", hidden, c.intermediate_size, "silu"))


def build(c: LlamaConfig, seq_len: int, generation: Generation | None = None) -> Graph:
    g = Graph()
    build_graph(g, c, seq_len, generation)
    return g


def weight_specs(c: LlamaConfig) -> dict[str, WeightSpec]:
    """Every parameter as the checkpoint stores it (linear weights [out, in], which the graph
    reads transposed, in place), in graph order."""
    h, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
    q, kv_width = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (q, h),
                   f"{p}.self_attn.k_proj.weight": (kv_width, h),
                   f"{p}.self_attn.v_proj.weight": (kv_width, h)}
        if c.qk_norm:
            shapes |= {f"{p}.self_attn.q_norm.weight": (hd,),
                       f"{p}.self_attn.k_norm.weight": (hd,)}
        shapes |= {f"{p}.self_attn.o_proj.weight": (h, q),
                   f"{p}.post_attention_layernorm.weight": (h,),
                   f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
                   f"{p}.mlp.down_proj.weight": (h, f)}
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return {name: WeightSpec(shape, False) for name, shape in shapes.items()}


def random_weights(c: LlamaConfig, seed: int = 0, dtype=torch.float32,
                   device="cpu") -> dict[str, torch.Tensor]:
    """Deterministic random weights, stored layout: linear [out, in] ~ N(0, 1/in), the
    embedding ~ N(0, 1/hidden) (tied, it is the lm_head too: logits O(1)), norm weights
    ~ 1 + N(0, 0.1^2)."""
    return random_stored_weights(weight_specs(c), seed, dtype, device)


# ---- the family -----------------------------------------------------------------------------


def describe(c: LlamaConfig, name: str) -> str:
    """The command line's summary of a Llama-shaped config, under the family's name."""
    factor, low, high, original = c.rope_scaling
    rope = f"RoPE theta {c.rope_theta:g}" + (
        f" with llama3 scaling (factor {factor:g}, frequency factors {low:g}-{high:g}, original "
        f"{original} positions)" if factor != 1.0 else "")
    return (f"{name}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, heads "
            f"{c.num_attention_heads}/{c.num_key_value_heads} x {c.head_dim}"
            f"{' with per-head q/k norm' if c.qk_norm else ''}, ffn {c.intermediate_size}, vocab "
            f"{c.vocab_size}, {rope}, {'tied' if c.tie_word_embeddings else 'untied'} lm_head, "
            f"{c.max_position_embeddings} positions")


def summary(c: LlamaConfig) -> str:
    return describe(c, "Llama")


_LLAMA3 = dict(vocab_size=128_256, rms_norm_eps=1e-5, rope_theta=500_000.0,
               max_position_embeddings=131_072)
PRESETS: dict[str, LlamaConfig] = {
    "llama_3_2_1b": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                rope_scaling=(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
                                **_LLAMA3),
    "llama_3_1_8b": LlamaConfig(hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                rope_scaling=(8.0, 1.0, 4.0, 8192), tie_word_embeddings=False,
                                **_LLAMA3),
}

MODEL_NAMES = {"llama-3.2-1b": "llama_3_2_1b", "llama-3.1-8b": "llama_3_1_8b"}  # CLI spelling


def transformers_fields(c: LlamaConfig) -> dict:
    """transformers' LlamaConfig / Qwen3Config fields of a config (the inverse of from_dict)."""
    factor, low, high, original = c.rope_scaling
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if factor != 1.0:
        rope |= {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                 "high_freq_factor": high, "original_max_position_embeddings": original}
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                tie_word_embeddings=c.tie_word_embeddings, hidden_act="silu",
                rope_parameters=rope)


def to_dict(c: LlamaConfig) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            **transformers_fields(c)}

FAMILY = Family(
    name="Llama", config=LlamaConfig, from_dict=from_dict,
    layouts={"llama": plain_layout(from_dict, "llama", "Llama decoder (llama)")},
    presets=tuple(Preset(name, key, PRESETS[key]) for name, key in MODEL_NAMES.items()),
    build=build, weight_specs=weight_specs, random_weights=random_weights, summary=summary,
    to_dict=to_dict)
