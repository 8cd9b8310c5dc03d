"""The model families, their presets, and what a config's family provides.

Two families share the Graph builders: the seed's simplified Gemma-4 (`gemma4.py`) and the
Gemma-4 Google published (`gemma4_text.py`). A config's type says which family it is.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError
from . import gemma4 as seed
from . import gemma4_text as published

PRESETS = {**seed.PRESETS, **published.PRESETS}

# CLI spelling of the presets.
MODEL_NAMES = {
    **seed.MODEL_NAMES,
    "gemma4-e2b": "gemma4_e2b",
    "gemma4-e4b": "gemma4_e4b",
    "gemma4-31b": "gemma4_31b",
}


def family(config) -> ModuleType:
    """The module that builds and names the weights of `config`'s family."""
    if isinstance(config, seed.Gemma4Config):
        return seed
    if isinstance(config, published.Gemma4TextConfig):
        return published
    raise ConfigError(f"not a model config: {type(config).__name__}")


def build(config, seq_len: int, generation=None):
    """The unoptimized graph of `config` at `seq_len` tokens: logits [seq_len, vocab] (with a
    `kv.Generation`, a prefill or decode step over the KV caches, logits [1, vocab])."""
    return family(config).build(config, seq_len, generation)


def weight_specs(config):
    """Parameter name -> WeightSpec (graph shape, stored transposed or not), in graph order."""
    return family(config).weight_specs(config)
