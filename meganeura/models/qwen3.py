"""Qwen3 (transformers' `qwen3`, Qwen3ForCausalLM): Llama's decoder (`llama.py` builds it) with
q and k RMS-normalized per head before RoPE.

    q = rope(head_rms_norm(h @ Wq^T, q_norm));  k = rope(head_rms_norm(h @ Wk^T, k_norm))

q_norm and k_norm hold head_dim weights each, shared by the heads; head_dim is its own field
(128 by default), not hidden / heads. Config fields and their defaults follow transformers'
Qwen3Config. Sliding-window layers (`use_sliding_window`) are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import llama
from .family import Family, Preset, plain_layout


@dataclass(frozen=True)
class Qwen3Config(llama.LlamaConfig):
    qk_norm: ClassVar[bool] = True


# transformers' Qwen3Config defaults
DEFAULTS = dict(vocab_size=151_936, hidden_size=4096, intermediate_size=22_016,
                num_hidden_layers=32, num_attention_heads=32, head_dim=128, rms_norm_eps=1e-6,
                tie_word_embeddings=False, max_position_embeddings=32_768, pad_token_id=None)
REFUSED = {"attention_bias": "biased attention projections are not supported",
           "use_sliding_window": "sliding-window layers are not supported"}


def from_dict(d: dict) -> Qwen3Config:
    """A Qwen3 config from transformers' field names (defaults as in its Qwen3Config)."""
    return llama.read_fields(d, Qwen3Config, DEFAULTS, REFUSED)


def summary(c: Qwen3Config) -> str:
    return llama.describe(c, "Qwen3")


PRESETS: dict[str, Qwen3Config] = {
    "qwen3_8b": Qwen3Config(vocab_size=151_936, hidden_size=4096, intermediate_size=12_288,
                            num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                            head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                            tie_word_embeddings=False, max_position_embeddings=40_960),
}
MODEL_NAMES = {"qwen3-8b": "qwen3_8b"}  # CLI spelling


def to_dict(c: Qwen3Config) -> dict:
    return {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
            **llama.transformers_fields(c)}

FAMILY = Family(
    name="Qwen3", config=Qwen3Config, from_dict=from_dict,
    layouts={"qwen3": plain_layout(from_dict, "qwen3", "Qwen3 decoder (qwen3)")},
    presets=tuple(Preset(name, key, PRESETS[key]) for name, key in MODEL_NAMES.items()),
    build=llama.build, weight_specs=llama.weight_specs, random_weights=llama.random_weights,
    summary=summary, to_dict=to_dict)
