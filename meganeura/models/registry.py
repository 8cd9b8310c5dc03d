"""The model families, in one table, and everything derived from it.

Each family is one module exporting a `Family` (models/family.py: its config, how it reads
a checkpoint's config.json, its presets, its graph, its weights' names and layouts):

    the seed's Gemma-4      gemma4.py        config.json without model_type (the seed's fields)
    published Gemma-4       gemma4_text.py   gemma4_text, gemma4 (the multimodal layout)
    Llama                   llama.py         llama
    Qwen3                   qwen3.py         qwen3 (llama.py's decoder with per-head q/k norm)

The command line's `--model` choices, `from_pretrained`'s reading of a checkpoint (by its
`model_type`), `PRESETS` / `MODEL_NAMES` and `family(config)` all come from `FAMILIES`.
"""

from __future__ import annotations

import math

from ..errors import ConfigError, InputError
from . import gemma4, gemma4_text, llama, qwen3
from .family import Family, Layout

FAMILIES: tuple[Family, ...] = (gemma4.FAMILY, gemma4_text.FAMILY, llama.FAMILY, qwen3.FAMILY)

PRESETS = {p.key: p.config for f in FAMILIES for p in f.presets}  # key -> config
MODEL_NAMES = {p.name: p.key for f in FAMILIES for p in f.presets}  # --model NAME -> key
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}  # config.json model_type -> family
_BY_CONFIG = {f.config: f for f in FAMILIES}


def _unique(what: str, values: list) -> None:
    """The table's names, keys, model types and config classes each name one thing."""
    dup = sorted({repr(v) for v in values if values.count(v) > 1})
    if dup:
        raise RuntimeError(f"models.registry: {what} {dup[0]} is declared twice")


_unique("preset name", [p.name for f in FAMILIES for p in f.presets])
_unique("preset key", [p.key for f in FAMILIES for p in f.presets])
_unique("model_type", [t for f in FAMILIES for t in f.model_types])
_unique("config class", [f.config for f in FAMILIES])


def family(config) -> Family:
    """The family of `config`, by its exact type."""
    f = _BY_CONFIG.get(type(config))
    if f is None:
        raise ConfigError(f"not a model config: {type(config).__name__}")
    return f


def build(config, seq_len: int, generation=None):
    """The unoptimized graph of `config` at `seq_len` tokens: logits [seq_len, vocab] (with a
    `kv.Generation`, a prefill or decode step over the KV caches, logits [1, vocab]).
    One rule for every use: no graph reaches past the model's max_position_embeddings."""
    f = family(config)
    limit = config.max_position_embeddings
    if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > limit:
        raise InputError(f"{seq_len} tokens: the model has {limit} positions "
                         f"(max_position_embeddings)")
    return f.build(config, seq_len, generation)


def weight_specs(config):
    """Parameter name -> WeightSpec (graph shape, stored transposed or not), in graph order."""
    return family(config).weight_specs(config)


def num_parameters(config) -> int:
    return sum(math.prod(s.shape) for s in weight_specs(config).values())


def read_config(d, source) -> Layout:
    """A config.json object read by the family its `model_type` names (see FAMILIES)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config {source} must be a JSON object")
    kind = d.get("model_type")
    if not isinstance(kind, (str, type(None))) or kind not in BY_MODEL_TYPE:
        known = ", ".join(str(t) for t in BY_MODEL_TYPE if t is not None)
        raise ConfigError(f"config {source}: model_type {kind!r} is not supported ({known}, or "
                          f"the seed's fields without model_type)")
    return BY_MODEL_TYPE[kind].layouts[kind](d, source)
