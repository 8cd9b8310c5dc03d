"""The seed's Gemma-4 text decoder, op for op.

embedding -> per layer: RMSNorm -> q, k, v projections -> QK-norm (whole row) ->
RoPE -> causal or sliding-window GQA attention -> o_proj -> residual add ->
RMSNorm -> SwiGLU FFN -> residual add; then final RMSNorm and lm_head.
Weights in the graph are [in, out]; HF checkpoints store linear weights [out, in].
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compiler.graph import Graph
from ..errors import ConfigError
from . import kv
from .family import Family, Preset, plain_layout
from .kv import Generation
from .specs import WeightSpec


@dataclass(frozen=True)
class Gemma4Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window_size: int = 4096
    global_attn_period: int = 4
    global_attn_offset: int = 3
    use_qk_norm: bool = True
    # positions a forward or a generation may reach (the published Gemma-4's 4b and 12b
    # window, 131072): longer inputs are refused, not run into untrained positions
    max_position_embeddings: int = 131_072

    def __post_init__(self):
        validate(self)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_global_layer(self, layer: int) -> bool:
        off = self.global_attn_offset
        return layer >= off and (layer - off) % self.global_attn_period == 0

    def num_parameters(self) -> int:
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 2 * h * self.q_dim + 2 * h * self.kv_dim + 3 * h * f + 2 * h
        per_layer += (self.q_dim + self.kv_dim) if self.use_qk_norm else 0
        return v * h + self.num_hidden_layers * per_layer + h + h * v


_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim", "sliding_window_size",
               "global_attn_period", "max_position_embeddings")


def validate(c: Gemma4Config) -> None:
    """Raises ConfigError naming the first field that is out of range."""
    for f in _INT_FIELDS:
        v = getattr(c, f)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2 ** 31:
            raise ConfigError(f"config field {f} must be a positive integer below 2^31, got {v!r}")
    off = c.global_attn_offset
    if not isinstance(off, int) or isinstance(off, bool) or not 0 <= off < 2 ** 31:
        raise ConfigError(f"config field global_attn_offset must be an integer >= 0, got {off!r}")
    for f in ("rms_norm_eps", "rope_theta"):
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"config field {f} must be a positive number, got {v!r}")
    if not isinstance(c.use_qk_norm, bool):
        raise ConfigError(f"config field use_qk_norm must be true or false, got {c.use_qk_norm!r}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(f"config field num_key_value_heads ({c.num_key_value_heads}) must divide "
                          f"num_attention_heads ({c.num_attention_heads})")
    if c.head_dim % 2:
        raise ConfigError(f"config field head_dim must be even for half-split RoPE, got {c.head_dim}")


PRESETS: dict[str, Gemma4Config] = {
    # The seed's 1b preset has hidden 1856 and 14 heads, which do not divide: its graph cannot
    # be built. meganeura keeps hidden 1856 and sets head_dim = 132 (= 1856 // 14), so the
    # attention width is 14 * 132 = 1848 and q_proj / o_proj map between 1856 and 1848.
    "gemma4_1b": Gemma4Config(262144, 1856, 26, 14, 7, 7424, head_dim=132),
    "gemma4_4b": Gemma4Config(262144, 2560, 34, 20, 10, 10240, head_dim=128),
    "gemma4_12b": Gemma4Config(262144, 3840, 48, 16, 8, 15360, head_dim=240),
    "gemma4_27b": Gemma4Config(262144, 4608, 62, 32, 16, 18432, head_dim=144),
    "small_test": Gemma4Config(64, 32, 4, 2, 2, 64, head_dim=16, sliding_window_size=8),
}

# CLI spelling of the presets.
MODEL_NAMES = {
    "gemma4-small-test": "small_test",
    "gemma4-1b": "gemma4_1b",
    "gemma4-4b": "gemma4_4b",
    "gemma4-12b": "gemma4_12b",
    "gemma4-27b": "gemma4_27b",
}


def config_from_dict(d: dict) -> Gemma4Config:
    """Builds a config from the seed's field names; `head_dim` defaults to hidden / heads."""
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(Gemma4Config)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config field {unknown[0]} (known: {', '.join(sorted(known))})")
    d = dict(d)
    required = [f.name for f in dataclasses.fields(Gemma4Config)
                if f.default is dataclasses.MISSING and f.name != "head_dim"]
    for f in required:
        if f not in d:
            raise ConfigError(f"config field {f} is missing")
    if "head_dim" not in d:  # hidden_size / num_attention_heads, which must be integers first
        h, n = d["hidden_size"], d["num_attention_heads"]
        for f, v in (("hidden_size", h), ("num_attention_heads", n)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2 ** 31:
                raise ConfigError(f"config field {f} must be a positive integer below 2^31, "
                                  f"got {v!r}")
        if h % n:
            raise ConfigError(f"config field head_dim is required: hidden_size {h} is not "
                              f"divisible by num_attention_heads {n}")
        d["head_dim"] = h // n
    return Gemma4Config(**d)


def load_config(path: str | Path) -> Gemma4Config:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {path} is not valid JSON: {e}") from None
    return config_from_dict(d)


def build_graph(g: Graph, config: Gemma4Config, seq_len: int,
                generation: Generation | None = None) -> int:
    """Builds the decoder into `g` and returns the logits node: [seq_len, vocab_size] (a
    prefill or decode step for generation: [1, vocab_size], see models/kv.py)."""
    c = config
    kv.check(seq_len, generation)
    hidden, eps = c.hidden_size, c.rms_norm_eps
    token_ids = g.input_u32("token_ids", (seq_len,))
    pos = kv.positions(g, seq_len, generation)
    embed = g.parameter("model.embed_tokens.weight", (c.vocab_size, hidden))
    x = g.embedding(token_ids, embed)  # x: [S, hidden]
    writes: list[int] = []
    for i in range(c.num_hidden_layers):
        with g.block(f"layer.{i}"):
            x = _layer(g, c, i, x, pos, generation, writes)
    final_w = g.parameter("model.norm.weight", (hidden,))
    x = kv.last_row(g, g.rms_norm(x, final_w, eps), seq_len, generation)
    lm_head = g.parameter("lm_head.weight", (hidden, c.vocab_size))
    logits = g.matmul(x, lm_head)  # logits: [S, vocab]
    g.set_outputs([logits], writes)
    return logits


def _layer(g: Graph, c: Gemma4Config, i: int, x: int, positions: tuple[int, int],
           generation: Generation | None, writes: list[int]) -> int:
    p, eps, hd = f"model.layers.{i}", c.rms_norm_eps, c.head_dim
    pos, limit = positions
    h = g.rms_norm(x, g.parameter(f"{p}.input_layernorm.weight", (c.hidden_size,)), eps)
    q = g.matmul(h, g.parameter(f"{p}.self_attn.q_proj.weight", (c.hidden_size, c.q_dim)))
    k = g.matmul(h, g.parameter(f"{p}.self_attn.k_proj.weight", (c.hidden_size, c.kv_dim)))
    v = g.matmul(h, g.parameter(f"{p}.self_attn.v_proj.weight", (c.hidden_size, c.kv_dim)))
    if c.use_qk_norm:  # over the whole row: q_norm has q_dim weights, k_norm kv_dim
        q = g.rms_norm(q, g.parameter(f"{p}.self_attn.q_norm.weight", (c.q_dim,)), eps)
        k = g.rms_norm(k, g.parameter(f"{p}.self_attn.k_norm.weight", (c.kv_dim,)), eps)
    q = g.rope(q, pos, c.rope_theta, hd, limit=limit)
    k = g.rope(k, pos, c.rope_theta, hd, limit=limit)
    window = None if c.is_global_layer(i) else c.sliding_window_size
    cache = kv.store(g, i, k, v, pos, kv.slots(window, generation), generation)
    writes += cache.writes
    heads = (c.num_attention_heads, c.num_key_value_heads, hd)
    a = kv.attend(g, q, cache, pos, *heads, window, hd ** -0.5, generation)  # a: [S, q_dim]
    x = g.add(x, g.matmul(a, g.parameter(f"{p}.self_attn.o_proj.weight", (c.q_dim, c.hidden_size))))
    h = g.rms_norm(x, g.parameter(f"{p}.post_attention_layernorm.weight", (c.hidden_size,)), eps)
    ffn = c.intermediate_size
    gate = g.matmul(h, g.parameter(f"{p}.mlp.gate_proj.weight", (c.hidden_size, ffn)))
    up = g.matmul(h, g.parameter(f"{p}.mlp.up_proj.weight", (c.hidden_size, ffn)))
    down = g.parameter(f"{p}.mlp.down_proj.weight", (ffn, c.hidden_size))
    return g.add(x, g.matmul(g.swiglu(gate, up), down))  # x: [S, hidden]


def weight_names(config: Gemma4Config) -> list[str]:
    """All parameter names, in the seed's order."""
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.input_layernorm.weight"]
        names += [f"{p}.self_attn.{w}_proj.weight" for w in "qkvo"]
        if config.use_qk_norm:
            names += [f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"]
        names += [f"{p}.post_attention_layernorm.weight"]
        names += [f"{p}.mlp.{w}_proj.weight" for w in ("gate", "up", "down")]
    return names + ["model.norm.weight", "lm_head.weight"]


def transposed_weight_names(config: Gemma4Config) -> list[str]:
    """Linear weights: stored [out, in] in HF checkpoints, [in, out] in the graph."""
    names = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{w}_proj.weight" for w in "qkvo"]
        names += [f"{p}.mlp.{w}_proj.weight" for w in ("gate", "up", "down")]
    return names + ["lm_head.weight"]


def weight_specs(config: Gemma4Config) -> dict[str, WeightSpec]:
    """Every parameter, in graph order: its graph shape ([in, out] for linear weights) and
    whether the checkpoint stores it transposed ([out, in])."""
    transposed = set(transposed_weight_names(config))
    return {n: WeightSpec(s, n in transposed) for n, s in weight_shapes(config).items()}


def random_weights(config: Gemma4Config, seed: int = 0, dtype=torch.float32,
                   device="cpu") -> dict[str, torch.Tensor]:
    """Deterministic random weights in graph layout: the same seed and device give the same values.

    Embedding ~ N(0, 1); a linear [in, out] ~ N(0, 1/in); norm weights ~ 1 + N(0, 0.1^2),
    so activations stay O(1) through any depth.
    """
    out = {}
    for i, (name, shape) in enumerate(weight_shapes(config).items()):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if len(shape) == 1:
            t = 1.0 + 0.1 * t
        elif name != "model.embed_tokens.weight":
            t = t / shape[0] ** 0.5
        out[name] = t.to(dtype)
    return out


def build(config: Gemma4Config, seq_len: int, generation: Generation | None = None) -> Graph:
    g = Graph()
    build_graph(g, config, seq_len, generation)
    return g


def weight_shapes(config: Gemma4Config) -> dict[str, tuple[int, ...]]:
    """Graph-layout ([in, out]) shape of every parameter, in the order build_graph makes them
    (random_weights seeds each by its place)."""
    c = config
    h, q, kv_width, f = c.hidden_size, c.q_dim, c.kv_dim, c.intermediate_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (h, q),
                   f"{p}.self_attn.k_proj.weight": (h, kv_width),
                   f"{p}.self_attn.v_proj.weight": (h, kv_width)}
        if c.use_qk_norm:
            shapes |= {f"{p}.self_attn.q_norm.weight": (q,),
                       f"{p}.self_attn.k_norm.weight": (kv_width,)}
        shapes |= {f"{p}.self_attn.o_proj.weight": (q, h),
                   f"{p}.post_attention_layernorm.weight": (h,),
                   f"{p}.mlp.gate_proj.weight": (h, f), f"{p}.mlp.up_proj.weight": (h, f),
                   f"{p}.mlp.down_proj.weight": (f, h)}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (h, c.vocab_size)}


def summary(c: Gemma4Config) -> str:
    kinds = ["global" if c.is_global_layer(i) else "sliding" for i in range(c.num_hidden_layers)]
    return (f"{c.num_hidden_layers} layers ({kinds.count('global')} global, "
            f"{kinds.count('sliding')} sliding-window {c.sliding_window_size}), hidden "
            f"{c.hidden_size}, heads {c.num_attention_heads}/{c.num_key_value_heads} "
            f"x {c.head_dim}, ffn {c.intermediate_size}, vocab {c.vocab_size}")


FAMILY = Family(
    name="the seed's Gemma-4", config=Gemma4Config, from_dict=config_from_dict,
    # its config.json has the seed's field names and no model_type
    layouts={None: plain_layout(config_from_dict, "seed", "the seed's Gemma-4 (seed field names)")},
    presets=tuple(Preset(name, key, PRESETS[key]) for name, key in MODEL_NAMES.items()),
    build=build, weight_specs=weight_specs, random_weights=random_weights, summary=summary,
    to_dict=dataclasses.asdict)  # the seed's field names, no model_type
